"""The SSH transport, the ssh provider and the testing helpers, against a real sshd.

The sshd is OpenSSH started on 127.0.0.1 by ``vmexec.testing.sshd.SSHServer``; nothing
leaves this machine. Without an sshd binary the tests skip, except under CI (``CI`` set)
where a missing sshd is a failure: CI installs openssh-server.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vmexec.errors import ConfigError, HostKeyError, TransportError
from vmexec.providers.ssh import SSHProvider, parse_host
from vmexec.testing.proxy import TCPProxy
from vmexec.testing.sshd import SSHServer
from vmexec.transports.ssh import SSHTransport, open_ssh_transport

PY = shlex.quote(sys.executable)
# Generous bound for things that should be immediate; only reached when something hangs.
PROMPT = 10.0


def connect(sshd: SSHServer, command: str = "cat", **overrides: Any) -> SSHTransport:
    options: dict[str, Any] = dict(
        key_filename=sshd.client_key,
        known_hosts=sshd.known_hosts,
        host_key_policy="reject",
        command=command,
        timeout=PROMPT,
    )
    options.update(overrides)
    return open_ssh_transport(sshd.host, sshd.port, sshd.user, **options)


def in_thread(fn: Callable[[], Any], timeout: float = PROMPT) -> Any:
    """Run ``fn`` in a thread and return its result; fail (never hang) after ``timeout``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{fn} still blocked after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def read_exactly(t: SSHTransport, n: int) -> bytes:
    def go() -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = t.read(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    return in_thread(go)  # type: ignore[no-any-return]


def read_to_eof(t: SSHTransport) -> bytes:
    def go() -> bytes:
        buf = bytearray()
        while chunk := t.read(65536):
            buf += chunk
        return bytes(buf)

    return in_thread(go)  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float = PROMPT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        threading.Event().wait(0.01)


def parked_in(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is currently inside a call to ``function``."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> str:
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", passphrase, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return str(path)


def ssh_fingerprint(pub: Path | str) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


# --- the transport ----------------------------------------------------------------------


@pytest.mark.ssh
def test_cat_echoes_bytes(sshd: SSHServer) -> None:
    t = connect(sshd)
    try:
        assert t.label == sshd.host_string
        t.write(b"hello\x00world")
        assert read_exactly(t, 11) == b"hello\x00world"
        # More than one channel window's worth in flight: flow control must not stall.
        payload = os.urandom(3 * 1024 * 1024)
        echoed = {}
        reader = threading.Thread(
            target=lambda: echoed.setdefault("data", read_exactly(t, len(payload)))
        )
        reader.start()
        for i in range(0, len(payload), 100_000):
            t.write(payload[i : i + 100_000])
        reader.join(PROMPT)
        assert echoed["data"] == payload
    finally:
        t.close()


@pytest.mark.ssh
def test_event_loop_transport_sends_one_packet_per_write(sshd: SSHServer) -> None:
    # asyncssh pads every packet with an empty SSH_MSG_IGNORE (a CBC countermeasure);
    # vmexec's ciphers do not need it and OpenSSH's server echoes fine without it: a
    # frame costs one encrypted packet and one socket write, not two.
    from vmexec.providers.ssh import parse_host
    from vmexec.transports import aio
    from vmexec.transports.ssh_async import open_async_ssh

    user, host, port = parse_host(sshd.host_string)
    aio.hold()
    try:
        t = aio.run(open_async_ssh(host, port, user, key_filename=sshd.client_key,
                                   known_hosts=sshd.known_hosts, timeout=PROMPT,
                                   command="cat")).result(PROMPT)
        received: list[bytes] = []
        got = threading.Event()

        def on_data(data: bytes) -> None:
            received.append(data)
            if sum(map(len, received)) >= 5 * 6:
                got.set()

        t.start(on_data, lambda reason: got.set())
        socket_transport = t._conn._transport
        plain_write = socket_transport.write
        writes: list[int] = []
        socket_transport.write = lambda data: (writes.append(len(data)), plain_write(data))
        for i in range(5):
            t.write(b"frame%d" % i)
            time.sleep(0.05)  # one packet each: writes in a row would be coalesced
        assert got.wait(PROMPT)
        assert b"".join(received) == b"frame0frame1frame2frame3frame4"
        assert len(writes) == 5, writes
        t.close()
        t.join(PROMPT)
    finally:
        aio.release()


@pytest.mark.ssh
def test_python_command_streams_and_diagnostics(sshd: SSHServer) -> None:
    code = (
        "import sys; line = sys.stdin.readline(); sys.stdout.write(line.upper()); "
        "sys.stdout.flush(); sys.stderr.write('to-stderr'); sys.exit(3)"
    )
    t = connect(sshd, f"{PY} -c {shlex.quote(code)}")
    try:
        t.write(b"ping\n")
        assert read_to_eof(t) == b"PING\n"
        wait_for(lambda: "status 3" in t.diagnostics() and "to-stderr" in t.diagnostics())
        assert t.exit_status == 3
        # Once sshd has closed the channel (just after the exit status), writes fail
        # with a message saying why.
        errors: list[TransportError] = []

        def write_fails() -> bool:
            try:
                t.write(b"too late\n")
            except TransportError as exc:
                errors.append(exc)
            return bool(errors)

        wait_for(write_fails)
        assert "remote command has ended" in str(errors[0])
        assert "to-stderr" in str(errors[0])
    finally:
        t.close()


@pytest.mark.ssh
def test_stderr_tail_is_bounded(sshd: SSHServer) -> None:
    code = "import sys; sys.stderr.write('a' * 200000 + 'THE-END'); sys.stderr.flush()"
    t = connect(sshd, f"{PY} -c {shlex.quote(code)}")
    try:
        assert read_to_eof(t) == b""
        # The exit status can arrive while the stderr reader is still draining: wait
        # for both.
        wait_for(lambda: "status 0" in t.diagnostics() and "THE-END" in t.diagnostics())
        diag = t.diagnostics()
        assert diag.count("a") <= 8192
    finally:
        t.close()


@pytest.mark.ssh
def test_close_unblocks_read_and_is_idempotent(sshd: SSHServer) -> None:
    t = connect(sshd)
    result: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: result.setdefault("data", t.read(100)))
    reader.start()
    # The reader must be parked inside read() before close() for this to test anything.
    wait_for(lambda: parked_in(reader, "recv"))
    t.close()
    reader.join(PROMPT)
    assert not reader.is_alive()
    assert result["data"] == b""
    t.close()
    with pytest.raises(TransportError, match="closed"):
        t.write(b"x")


@pytest.mark.ssh
def test_close_unblocks_a_write_stalled_on_flow_control(sshd: SSHServer) -> None:
    # `sleep` never reads stdin: once the SSH window and the pipe are full, the writer
    # blocks until close() wakes it.
    t = connect(sshd, "sleep 60")
    outcome: dict[str, BaseException] = {}

    def writer() -> None:
        try:
            for _ in range(200):
                t.write(b"x" * 100_000)
        except TransportError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_for(lambda: parked_in(thread, "_wait_for_send_window"))
    t.close()
    thread.join(PROMPT)
    assert not thread.is_alive(), "write() still blocked after close()"
    assert "closed" in str(outcome["error"])


# --- host keys --------------------------------------------------------------------------


@pytest.mark.ssh
def test_unknown_host_key_is_refused_with_the_fix(sshd: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("# nothing yet\n")
    with pytest.raises(HostKeyError) as info:
        connect(sshd, known_hosts=str(known))
    msg = str(info.value)
    assert f"{sshd.user}@127.0.0.1:{sshd.port}" in msg
    assert ssh_fingerprint(f"{sshd.host_key}.pub") in msg
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known}" in msg
    assert 'host_key_policy="accept-new"' in msg
    assert known.read_text() == "# nothing yet\n"


@pytest.mark.ssh
def test_accept_new_saves_the_key(sshd: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "new-dir" / "known_hosts"
    t = connect(sshd, known_hosts=str(known), host_key_policy="accept-new", command="echo ok")
    try:
        assert read_to_eof(t) == b"ok\n"
    finally:
        t.close()
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_public_key()}\n"
    # OpenSSH itself finds the entry...
    found = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(known)],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    # ...and now the strict policy accepts the host.
    connect(sshd, known_hosts=str(known), command="true").close()


@pytest.mark.ssh
def test_hashed_known_hosts_entries_match(sshd: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(Path(sshd.known_hosts).read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert "|1|" in known.read_text()
    connect(sshd, known_hosts=str(known), command="true").close()


def test_known_hosts_is_read_as_openssh_writes_it(tmp_path: Path) -> None:
    """transports.hostkeys reads known_hosts without an SSH library: patterns, negations,
    hashed names, @revoked; unreadable lines (and @cert-authority) are skipped."""
    import base64
    import hashlib
    import hmac

    from vmexec.transports import hostkeys

    def blob(*parts: bytes) -> bytes:
        return b"".join(len(p).to_bytes(4, "big") + p for p in parts)

    ed = blob(b"ssh-ed25519", bytes(range(32)))
    ec = blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" + bytes(64))
    rsa = blob(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + bytes(range(1, 129)))
    salt = bytes(20)
    hashed = "|1|{}|{}".format(
        base64.b64encode(salt).decode(),
        base64.b64encode(hmac.new(salt, b"[10.0.0.9]:2222", hashlib.sha1).digest()).decode())
    b64 = {k: base64.b64encode(v).decode() for k, v in (("ed", ed), ("ec", ec), ("rsa", rsa))}
    known = tmp_path / "known_hosts"
    known.write_text("\n".join([
        f"host1,Host2 ssh-ed25519 {b64['ed']}",                          # 1
        f"*.example.com,!bad.example.com ecdsa-sha2-nistp256 {b64['ec']}",  # 2
        f"{hashed} rsa-sha2-512 {b64['rsa']}",                           # 3: ssh-rsa
        f"@revoked * ssh-rsa {b64['rsa']}",                              # 4
        f"@cert-authority * ssh-ed25519 {b64['ed']}",
        "host1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA",                   # truncated
        f"host1 ssh-dss {b64['ed']}",                                     # unknown type
        f"host1 ssh-ed25519 {b64['rsa']}",                                # type mismatch
        f"|1|garbage|zzz ssh-ed25519 {b64['ed']}",                        # bad hash
        "# a comment", "", "host1",
    ]) + "\n")

    def lines(host: str, port: int = 22) -> list[tuple[str, int, bool]]:
        keys = hostkeys.known_host_keys(str(known), host, port)
        found = hostkeys.KnownHosts.load(str(known)).lookup(hostkeys.lookup_name(host, port))
        assert [(k.key_type, k.blob, k.revoked) for k in found] == keys
        return [(k.key_type, k.lineno, k.revoked) for k in found]

    assert lines("HOST2") == [("ssh-ed25519", 1, False), ("ssh-rsa", 4, True)]
    assert lines("a.example.com") == [("ecdsa-sha2-nistp256", 2, False), ("ssh-rsa", 4, True)]
    assert lines("bad.example.com") == [("ssh-rsa", 4, True)]
    assert lines("10.0.0.9", 2222) == [("ssh-rsa", 3, False), ("ssh-rsa", 4, True)]

    def offer(kind: str, key: bytes) -> None:
        hostkeys.check_offered_host_key(kind, key, known_hosts=str(known), host="host1",
                                        port=22, user="u", policy="reject")

    offer("ssh-ed25519", ed)
    with pytest.raises(HostKeyError, match="@revoked"):
        offer("ssh-rsa", rsa)
    with pytest.raises(HostKeyError, match="CHANGED"):
        offer("ecdsa-sha2-nistp256", ec)


@pytest.mark.ssh
@pytest.mark.parametrize("policy", ["reject", "accept-new"])
@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_changed_host_key_is_always_refused(
    sshd: SSHServer, tmp_path: Path, policy: str, kind: str
) -> None:
    other = keygen(tmp_path / "other", kind)
    key_type, key_b64 = Path(f"{other}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    before = known.read_text()
    with pytest.raises(HostKeyError) as info:
        connect(sshd, known_hosts=str(known), host_key_policy=policy)
    msg = str(info.value)
    assert "CHANGED" in msg
    assert ssh_fingerprint(f"{other}.pub") in msg
    assert ssh_fingerprint(f"{sshd.host_key}.pub") in msg
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}" in msg
    assert known.read_text() == before


# --- authentication ---------------------------------------------------------------------


@pytest.mark.ssh
@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_client_key_types(sshd: SSHServer, tmp_path: Path, kind: str) -> None:
    key = keygen(tmp_path / f"id_{kind}", kind)
    sshd.authorize(f"{key}.pub")
    t = connect(sshd, key_filename=key, command="echo ok")
    try:
        assert read_to_eof(t) == b"ok\n"
    finally:
        t.close()


@pytest.mark.ssh
def test_default_key_and_known_hosts_come_from_home(
    sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dot_ssh = tmp_path / ".ssh"
    dot_ssh.mkdir()
    (dot_ssh / "id_ed25519").write_bytes(Path(sshd.client_key).read_bytes())
    (dot_ssh / "id_ed25519").chmod(0o600)
    (dot_ssh / "known_hosts").write_text(Path(sshd.known_hosts).read_text())
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    t = connect(sshd, key_filename=None, known_hosts=None, command="echo ok")
    try:
        assert read_to_eof(t) == b"ok\n"
    finally:
        t.close()
    (dot_ssh / "id_ed25519").unlink()
    with pytest.raises(TransportError, match="no SSH key"):
        connect(sshd, key_filename=None, known_hosts=None)


@pytest.mark.ssh
def test_unauthorized_key_says_authorized_keys(sshd: SSHServer, tmp_path: Path) -> None:
    key = keygen(tmp_path / "stranger")
    with pytest.raises(TransportError) as info:
        connect(sshd, key_filename=key)
    assert not isinstance(info.value, HostKeyError)
    assert "authorized_keys" in str(info.value)
    assert sshd.host_string in str(info.value)


@pytest.mark.ssh
def test_passphrase_key_is_refused_without_prompting(sshd: SSHServer, tmp_path: Path) -> None:
    key = keygen(tmp_path / "locked", passphrase="secret words")
    with pytest.raises(TransportError, match="passphrase"):
        in_thread(lambda: connect(sshd, key_filename=key))


# --- unreachable servers ----------------------------------------------------------------


def test_closed_port_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        open_ssh_transport(
            "127.0.0.1", port, "nobody", key_filename=None, known_hosts=None,
            command="true", timeout=5.0,
        )
    assert time.monotonic() - start < 5.0
    assert f"nobody@127.0.0.1:{port}" in str(info.value)
    assert "sshd running" in str(info.value)


@pytest.fixture
def silent_server() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket that accepts into the kernel backlog and never answers."""
    held: list[socket.socket] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s, held
        for c in held:
            c.close()


def test_blackholed_port_times_out(
    silent_server: tuple[socket.socket, list[socket.socket]], tmp_path: Path
) -> None:
    server, _ = silent_server
    port = server.getsockname()[1]
    key = keygen(tmp_path / "k")
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        in_thread(
            lambda: open_ssh_transport(
                "127.0.0.1", port, "nobody", key_filename=key, known_hosts=None,
                command="true", timeout=1.0,
            ),
        )
    assert time.monotonic() - start < 10 * 1.0
    assert "timed out after 1 s" in str(info.value)


def test_banner_then_silence_times_out(
    silent_server: tuple[socket.socket, list[socket.socket]], tmp_path: Path
) -> None:
    """A server that says hello and then stalls in the key exchange is bounded too."""
    server, held = silent_server
    port = server.getsockname()[1]

    def answer_once() -> None:
        conn, _ = server.accept()
        held.append(conn)
        conn.sendall(b"SSH-2.0-OpenSSH_9.9 stalled\r\n")

    threading.Thread(target=answer_once, daemon=True).start()
    key = keygen(tmp_path / "k")
    start = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        in_thread(
            lambda: open_ssh_transport(
                "127.0.0.1", port, "nobody", key_filename=key, known_hosts=None,
                command="true", timeout=1.0,
            ),
        )
    assert time.monotonic() - start < 10 * 1.0


# --- the proxy --------------------------------------------------------------------------


def test_proxy_forwards_and_closes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with TCPProxy("127.0.0.1", server.getsockname()[1]) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=PROMPT)
            upstream, _ = server.accept()
            upstream.settimeout(PROMPT)
            client.sendall(b"up")
            assert upstream.recv(10) == b"up"
            upstream.sendall(b"down")
            assert client.recv(10) == b"down"
            assert proxy.cut() == 1
            # Both ends see the connection die (EOF or reset), promptly.
            for end in (client, upstream):
                try:
                    assert end.recv(10) == b""
                except ConnectionResetError:
                    pass
            client.close()
            upstream.close()
        proxy.close()  # idempotent


@pytest.mark.ssh
def test_proxy_cut_breaks_a_live_ssh_session(sshd: SSHServer) -> None:
    with TCPProxy(sshd.host, sshd.port) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=PROMPT)
        # Host and port name the real server for the host-key lookup; bytes go via sock.
        t = connect(sshd, sock=sock)
        try:
            t.write(b"before")
            assert read_exactly(t, 6) == b"before"
            outcome: dict[str, Any] = {}

            def reader() -> None:
                try:
                    outcome["data"] = t.read(100)
                except TransportError as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            assert proxy.cut() == 1
            thread.join(PROMPT)
            assert not thread.is_alive(), "read() still blocked after the network was cut"
            assert outcome.get("data") == b"" or "error" in outcome
            if "error" in outcome:
                assert sshd.host_string in str(outcome["error"])
            with pytest.raises(TransportError):
                t.write(b"after")
        finally:
            t.close()


# --- parse_host -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("alice@example.com:2222", ("alice", "example.com", 2222)),
        ("alice@example.com", ("alice", "example.com", 22)),
        ("example.com", (None, "example.com", 22)),
        ("example.com:2200", (None, "example.com", 2200)),
        ("10.0.0.7", (None, "10.0.0.7", 22)),
        ("bob@[::1]:2222", ("bob", "::1", 2222)),
        ("[fe80::1]", (None, "fe80::1", 22)),
        ("::1", (None, "::1", 22)),
        ("ci_user@host-1.internal", ("ci_user", "host-1.internal", 22)),
    ],
)
def test_parse_host(spec: str, expected: tuple[Any, str, int]) -> None:
    user, host, port = parse_host(spec, default_user="me")
    assert (user, host, port) == (expected[0] or "me", expected[1], expected[2])


def test_parse_host_default_user_is_local_user() -> None:
    import getpass

    assert parse_host("h")[0] == getpass.getuser()


@pytest.mark.parametrize(
    "spec",
    ["", "  ", "@host", "user@", "host:", "host:0", "host:65536", "host:ssh",
     "u@[::1", "[::1]2222", "::1:2222x", "a b", "host/path", "-oProxyCommand=x",
     "u@h:22:33"],
)
def test_parse_host_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host(spec)
    assert repr(spec) in str(info.value)
    assert "user@host:port" in str(info.value)


# --- SSHProvider ------------------------------------------------------------------------


def test_provider_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one host"):
        SSHProvider(hosts=[])
    with pytest.raises(ConfigError, match="at least one host"):
        SSHProvider(8)
    with pytest.raises(ConfigError, match="does not take option.*machines.*hosts="):
        SSHProvider(8, hosts=["h"], machines=2)
    with pytest.raises(ConfigError, match="list of strings"):
        SSHProvider(hosts="me@h")
    with pytest.raises(ConfigError, match="'bad host'"):
        SSHProvider(hosts=["ok", "bad host"])
    missing = tmp_path / "no_such_key"
    with pytest.raises(ConfigError, match=f"ssh_key.*{missing}"):
        SSHProvider(hosts=["h"], ssh_key=str(missing))
    with pytest.raises(ConfigError, match="host_key_policy.*'auto'"):
        SSHProvider(hosts=["h"], host_key_policy="auto")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="slots_per_host"):
            SSHProvider(hosts=["h"], slots_per_host=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="connect_timeout"):
        SSHProvider(hosts=["h"], connect_timeout=0)
    with pytest.raises(ConfigError, match="python"):
        SSHProvider(hosts=["h"], python="")
    # ConfigError is a ValueError, so plain `except ValueError` code keeps working.
    with pytest.raises(ValueError):
        SSHProvider(hosts=[])


def test_provider_launch_hands_out_each_host_once() -> None:
    provider = SSHProvider(hosts=["a@h1:2222", "h2", "u@[::1]:22"], slots_per_host=4)
    records = provider.launch(1)
    assert [r.label for r in records] == ["a@h1:2222", f"{parse_host('h2')[0]}@h2:22", "u@[::1]:22"]
    assert {r.provider for r in records} == {"ssh"}
    assert {r.slots for r in records} == {4}
    assert {r.state for r in records} == {"pending"}
    assert len({r.id for r in records}) == 3
    assert provider.launch(10) == []
    assert provider.describe() == records
    provider.terminate(records[:1])
    assert provider.describe() == records[1:]
    provider.terminate()
    assert provider.describe() == []
    assert not provider.can_replace()
    assert SSHProvider(hosts=["h"]).launch(1)[0].slots == 0  # 0: the host's CPU count


@pytest.mark.ssh
def test_provider_connect_runs_the_agent_command(sshd: SSHServer, tmp_path: Path) -> None:
    # A stand-in "python" that prints its arguments, in a directory with a space, shows
    # both the command line and its quoting.
    fake_dir = tmp_path / "my python"
    fake_dir.mkdir()
    fake = fake_dir / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    provider = SSHProvider(
        hosts=[sshd.host_string],
        ssh_key=sshd.client_key,
        known_hosts=sshd.known_hosts,
        python=str(fake),
        connect_timeout=PROMPT,
    )
    [record] = provider.launch(1)
    assert record.label == sshd.host_string
    t = provider.connect(record, timeout=PROMPT)
    try:
        assert read_to_eof(t) == b"-m vmexec.agent\n"
    finally:
        t.close()


@pytest.mark.ssh
def test_provider_connect_unknown_host_key(sshd: SSHServer, tmp_path: Path) -> None:
    provider = SSHProvider(
        hosts=[sshd.host_string], ssh_key=sshd.client_key,
        known_hosts=str(tmp_path / "empty"),
    )
    [record] = provider.launch(1)
    with pytest.raises(HostKeyError):
        provider.connect(record, timeout=PROMPT)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.ssh
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_host(sshd: SSHServer, tmp_path: Path) -> None:
    # `sshd` only proves the binary works; this test needs its own server on ::1.
    with SSHServer(tmp_path / "sshd6", host="::1") as server6:
        assert server6.host_string.startswith(f"{server6.user}@[::1]:")
        provider = SSHProvider(
            hosts=[server6.host_string], ssh_key=server6.client_key,
            known_hosts=server6.known_hosts, python="/bin/echo",
        )
        [record] = provider.launch(1)
        t = provider.connect(record, timeout=PROMPT)
        try:
            assert read_to_eof(t) == b"-m vmexec.agent\n"
        finally:
            t.close()
