"""A real OpenSSH server on loopback, for testing the SSH path without any remote machine.

Owns: generating a host key and a client key with ``ssh-keygen``, writing an
``sshd_config`` confined to a work directory, running ``sshd -D`` on a free port of
127.0.0.1, waiting until it answers with an SSH banner, and stopping it (with the
sessions it forked). Nothing here needs root, except that ``PermitRootLogin`` is on
because test containers often run as root.

Use it as a context manager::

    with SSHServer(tmp_path) as sshd:
        provider = SSHProvider(hosts=[sshd.host_string], ssh_key=sshd.client_key,
                               known_hosts=sshd.known_hosts, python=sys.executable)

Remote sessions get sshd's minimal environment (no PYTHONPATH, a default PATH): run the
agent with an absolute interpreter path (``python=sys.executable``), or pass ``env=`` to
set variables in every session.

Must not import: paramiko, the scheduler or executor (only the standard library and
psutil), so that it can test any SSH client.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import socket
import subprocess
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Mapping, Optional, Union

import psutil

__all__ = ["SSHServer", "SSHServerError", "sshd_available", "find_sshd", "free_port",
           "COMMON_CONFIG", "read_banner", "config_ok", "tail"]

log = logging.getLogger(__name__)

#: Seconds ``SSHServer`` waits for sshd to answer before giving up.
START_TIMEOUT = 15.0

#: sshd_config lines every test sshd shares (also the local cloud's fake VMs): key
#: logins only, no PAM (rarely set up in containers), no StrictModes (work directories
#: live under /tmp), no DNS, banners or X11.
COMMON_CONFIG = (
    "PubkeyAuthentication yes",
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "UsePAM no",
    "StrictModes no",
    "UseDNS no",
    "PrintMotd no",
    "PrintLastLog no",
    "X11Forwarding no",
    "LogLevel VERBOSE",
)


class SSHServerError(RuntimeError):
    """The test sshd could not be set up or did not start; the message has its log tail."""


def find_sshd() -> Optional[str]:
    """Return the absolute path of the ``sshd`` binary, or None."""
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    for candidate in ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def sshd_available() -> Optional[str]:
    """Return why an ``SSHServer`` cannot run here, or None when it can.

    Meant for skip messages: ``pytest.skip(reason)`` when this is not None.
    """
    if os.name != "posix":
        return "the OpenSSH test server needs a POSIX system"
    if find_sshd() is None:
        return "no sshd binary: install OpenSSH's server (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "no ssh-keygen binary: install OpenSSH (apt-get install openssh-client)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (it may be taken later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SSHServer:
    """An OpenSSH ``sshd`` listening on loopback, configured inside ``workdir``.

    Args:
        workdir: directory for keys, config, pid file and log (created if missing).
        host: address to listen on (default 127.0.0.1; "::1" for IPv6).
        port: port to listen on (default: a free one).
        env: variables set in every session (sshd's ``SetEnv``), e.g. PYTHONPATH.
        extra_config: additional sshd_config lines.
        start: start immediately (default); otherwise call ``start()``.

    Attributes:
        host, port, user: where and as whom to connect.
        client_key: path of an ed25519 private key that may log in (its ``.pub`` is in
            ``authorized_keys``).
        known_hosts: path of a known_hosts file that pins this server's host key.
        host_string: ``"user@host:port"``, as ``SSHProvider(hosts=[...])`` takes it.

    Raises:
        SSHServerError: sshd or ssh-keygen is missing, or sshd failed to start.
    """

    def __init__(
        self,
        workdir: Union[str, os.PathLike[str]],
        *,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        extra_config: Optional[list[str]] = None,
        start: bool = True,
    ) -> None:
        reason = sshd_available()
        if reason is not None:
            raise SSHServerError(reason)
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.user = getpass.getuser()
        self.env = dict(env or {})
        self.extra_config = list(extra_config or [])
        self.sshd_path = find_sshd() or "sshd"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = str(self.workdir / "client_ed25519")
        self.authorized_keys = str(self.workdir / "authorized_keys")
        self.known_hosts = str(self.workdir / "known_hosts")
        self.config_path = self.workdir / "sshd_config"
        self.log_path = self.workdir / "sshd.log"
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._make_keys()
        if start:
            self.start()

    # --- public ----------------------------------------------------------------------

    @property
    def host_string(self) -> str:
        """``user@host:port`` with IPv6 hosts in brackets."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{shown}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        """The sshd listener's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start sshd and wait until it sends its SSH banner.

        Raises:
            SSHServerError: sshd exited or did not answer within ``START_TIMEOUT``.
        """
        if self._proc is not None:
            return
        # sshd refuses to run without its privilege-separation directory, which only
        # the openssh-server package's service unit would otherwise create.
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except PermissionError:
            pass  # not root: sshd runs without privilege separation and needs no dir
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            self._write_config()
            try:
                self._launch()
                return
            except SSHServerError:
                # Another process may have taken the "free" port between our probe
                # and sshd's bind; try a new one.
                if attempt + 1 == attempts or "Address already in use" not in self.log_text():
                    raise

    def stop(self) -> None:
        """Stop sshd and any sessions it forked (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_tree(proc)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def log_text(self) -> str:
        """Everything sshd logged so far (LogLevel VERBOSE)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def authorize(self, public_key_path: Union[str, os.PathLike[str]]) -> None:
        """Allow logins with another key (appends its ``.pub`` to authorized_keys)."""
        text = Path(public_key_path).read_text().strip()
        with open(self.authorized_keys, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def host_public_key(self) -> str:
        """The server's host key as ``"ssh-ed25519 AAAA..."``."""
        parts = Path(f"{self.host_key}.pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    def __enter__(self) -> SSHServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self._proc is not None else "stopped"
        return f"<SSHServer {self.host_string} {state}>"

    # --- internals -------------------------------------------------------------------

    def _make_keys(self) -> None:
        for path in (self.host_key, Path(self.client_key)):
            if not path.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmexec-test",
                      "-f", str(path)])
        # Keys must not be group/world readable or ssh tools refuse them.
        os.chmod(self.host_key, 0o600)
        os.chmod(self.client_key, 0o600)
        if not Path(self.authorized_keys).exists():
            self.authorize(f"{self.client_key}.pub")

    def _write_config(self) -> None:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            *COMMON_CONFIG,
            # Test containers run as root.
            "PermitRootLogin yes",
            # Tests open many connections at once, including deliberately failing ones.
            "MaxStartups 200",
            "MaxSessions 100",
            "LoginGraceTime 30",
        ]
        if self.env:
            settings = " ".join(f'"{k}={v}"' for k, v in self.env.items())
            lines.append(f"SetEnv {settings}")
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")
        # OpenSSH >= 9.8 throttles addresses that fail to log in; failure tests would
        # then lock 127.0.0.1 out. Older versions reject the option, so probe it.
        probe = self.config_path.with_suffix(".probe")
        probe.write_text(self.config_path.read_text() + "PerSourcePenalties no\n")
        if config_ok(self.sshd_path, probe):
            self.config_path.write_text(probe.read_text())
        probe.unlink()
        checked = subprocess.run(
            [self.sshd_path, "-t", "-f", str(self.config_path)],
            capture_output=True, text=True, timeout=30,
        )
        if checked.returncode != 0:
            raise SSHServerError(
                f"sshd rejects the generated config {self.config_path}: "
                f"{checked.stderr.strip() or checked.stdout.strip()}"
            )
        with open(self.known_hosts, "w", encoding="utf-8") as f:
            shown = f"[{self.host}]:{self.port}"
            f.write(f"{shown} {self.host_public_key()}\n")

    def _launch(self) -> None:
        self.log_path.write_text("")
        cmd = [self.sshd_path, "-D", "-E", str(self.log_path), "-f", str(self.config_path)]
        log.debug("starting %s", " ".join(cmd))
        # Own session: a Ctrl-C aimed at the test run must not race our own shutdown.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self._proc = proc
        # If the owner forgets stop(), do not leave sshd behind at interpreter exit.
        self._finalizer = weakref.finalize(self, _kill_tree, proc)
        reason = wait_banner(proc, self.host, self.port, START_TIMEOUT)
        if reason is None:
            log.debug("sshd %s is up", self.host_string)
            return
        status = proc.returncode if reason == "exited" else None
        self.stop()
        if status is not None:
            raise SSHServerError(
                f"sshd exited with status {status} on {self.host}:{self.port}"
                f"; its log says:\n{tail(self.log_text())}"
            )
        raise SSHServerError(
            f"sshd on {self.host}:{self.port} did not answer with an SSH banner within "
            f"{START_TIMEOUT:g} s ({reason}); its log says:\n{tail(self.log_text())}"
        )


def wait_banner(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float
                ) -> Optional[str]:
    """Wait until the sshd ``proc`` answers on ``host:port`` with an SSH banner.

    Returns:
        None once it does; else why not: ``"exited"`` (``proc.returncode`` says how),
        or the last probe's error when ``timeout`` seconds ran out.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        banner = read_banner(host, port, max(0.05, deadline - time.monotonic()))
        if isinstance(banner, bytes) and banner.startswith(b"SSH-"):
            return None
        last_error = str(banner)
        try:
            # Doubles as a short pause between probes that wakes at once on exit.
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            pass
    return "exited" if proc.poll() is not None else last_error


def read_banner(host: str, port: int, timeout: float) -> Union[bytes, str]:
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 2.0)) as s:
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def config_ok(sshd: str, path: Path) -> bool:
    result = subprocess.run([sshd, "-t", "-f", str(path)], capture_output=True, timeout=30)
    return result.returncode == 0


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise SSHServerError(f"{' '.join(cmd)} failed: {exc.stderr.strip()}") from exc


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Terminate sshd and the per-connection sshd processes it forked."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in [proc, *children]:
        try:
            p.terminate()
        except (ProcessLookupError, psutil.Error):
            pass
    reap(proc)
    _gone, alive = psutil.wait_procs(children, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def reap(proc: "subprocess.Popen[bytes]", timeout: float = 5.0) -> None:
    """Wait for ``proc`` (told to end) to exit; SIGKILL it if it takes over ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
