"""SSH on the shared I/O loop (asyncssh): the agent's channel, for fleets of any size.

Owns opening an SSH connection on ``transports.aio``'s loop — bounded connect pool,
retry with backoff while a host refuses (still booting, or sshd's ``MaxStartups``
dropping excess handshakes), host-key pinning, public-key login, ``exec`` — and
exposing the channel as a push ``Transport`` whose callbacks run on the loop.

Why not paramiko here: a ``paramiko.Transport`` *is* a thread (plus the reader and
stderr threads vmexec adds), and each one wakes on a 0.1 s socket timeout even when
idle. At a thousand machines that is three thousand threads and measurable idle CPU
(docs/scale.md has the figures). asyncssh keeps every connection on one event loop:
no thread, no timer and no wake-up per idle machine. paramiko stays the library for
short blocking sessions (``transports.ssh``: boot probes, installs, tests).

Host keys are checked by the same code as ``transports.ssh`` (``transports.hostkeys``:
known_hosts parsing, ``reject``/``accept-new`` policies, the messages), and errors are
translated here, in ``_translate``, the one place that knows asyncssh's exception types.

asyncssh is imported here and nowhere else in vmexec.
Must not import: providers, scheduler, executor, protocol.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
import threading
import time
from typing import Any, Callable, Optional

import asyncssh

from vmexec.errors import ConfigError, HostKeyError, TransportError
from vmexec.transports import aio
from vmexec.transports.base import Transport
from vmexec.transports.hostkeys import (
    HOST_KEY_POLICIES,
    check_offered_host_key,
    format_address,
    known_host_keys,
)
from vmexec.transports.ssh import SSH_CIPHERS, STDERR_TAIL_BYTES, check_key_file

__all__ = ["AsyncSSHTransport", "open_async_ssh", "CONNECT_CONCURRENCY"]

log = logging.getLogger(__name__)

#: SSH handshakes in progress at once, process-wide. Each costs a key exchange of
#: client CPU (a few ms) and a file descriptor; more at once only queues them in the
#: kernel. Machines beyond this wait their turn without holding anything.
CONNECT_CONCURRENCY = 64
# Backoff while a host refuses or drops the connection before its banner: first
# retry soon (a machine finishing boot), then slower, never slower than this.
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0


_semaphore: Optional[asyncio.Semaphore] = None
_semaphore_loop: Optional[asyncio.AbstractEventLoop] = None
_client_keys: dict[str, Any] = {}
_client_keys_lock = threading.Lock()
_quiet = False


def _connect_slots() -> asyncio.Semaphore:
    global _semaphore, _semaphore_loop
    loop = asyncio.get_running_loop()
    if _semaphore is None or _semaphore_loop is not loop:  # one per loop (restarted
        _semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)  # after a release)
        _semaphore_loop = loop
        _raise_open_file_limit()
    return _semaphore


def _raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (at most 65536).

    Each machine holds one socket. macOS starts processes at 256 open files and many
    Linux desktops at 1024: a fleet of 2000 would fail at machine 1000 with EMFILE
    although the hard limit allows far more.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.debug("raised the open-file limit from %d to %d", soft, wanted)
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-file limit: %s", exc)


def _quiet_asyncssh_log() -> None:
    # asyncssh logs every connection at INFO; vmexec reports failures once, as errors
    # it raises, and a thousand "Connected to SSH server" lines help nobody.
    global _quiet
    if not _quiet:
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
        _quiet = True


class AsyncSSHTransport(Transport):
    """A push ``Transport`` over one SSH exec channel on the shared I/O loop.

    Built by ``open_async_ssh``. Callbacks given to ``start`` run on the loop thread
    (``shared_thread`` is True): they must not block. ``write`` and ``close`` may be
    called from any thread; they post to the loop and return at once.
    """

    shared_thread = True

    def __init__(self, label: str) -> None:
        self.label = label
        self._conn: Any = None
        self._chan: Any = None
        self._closed = False
        self._ended = threading.Event()  # the channel is gone (either side)
        self._lost: Optional[BaseException] = None
        self._exit_status: Optional[int] = None
        self._stderr = bytearray()
        # Before start(): bytes are kept here (and read() may take them).
        self._early = bytearray()
        self._early_cond = threading.Condition()
        self._on_data: Optional[Callable[[bytes], None]] = None
        self._on_closed: Optional[Callable[[str], None]] = None
        self._eof = False

    # --- the Transport interface ----------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue ``data`` for the agent's stdin (never blocks).

        Raises:
            TransportError: the connection is closed or lost.
        """
        if self._closed or self._ended.is_set():
            raise TransportError(self._why_gone("write to"))
        aio.post(self._write_on_loop, data)

    def _write_on_loop(self, data: bytes) -> None:
        chan = self._chan
        if chan is None or self._ended.is_set():
            return
        try:
            chan.write(data)
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            self._gone(exc)

    def read(self, max_bytes: int) -> bytes:
        """Blocking read, for use before ``start`` (tests, one-shot commands)."""
        with self._early_cond:
            while not self._early and not self._eof:
                self._early_cond.wait()
            data = bytes(self._early[:max_bytes])
            del self._early[:max_bytes]
        if not data and self._lost is not None and not self._closed:
            raise TransportError(self._why_gone("read from"))
        return data

    def start(self, on_data: Callable[[bytes], None], on_closed: Callable[[str], None]) -> None:
        def begin() -> None:
            with self._early_cond:
                early, self._early = bytes(self._early), bytearray()
                self._on_data, self._on_closed = on_data, on_closed
                ended = self._eof
            if early:
                on_data(early)
            if ended:
                on_closed(self._end_reason())

        aio.post(begin)

    def close(self) -> None:
        """Close the channel and the connection (idempotent, any thread)."""
        if self._closed:
            return
        self._closed = True
        aio.post(self._close_on_loop)

    def _close_on_loop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        else:
            self._ended.set()

    def join(self, timeout: Optional[float] = None) -> None:
        self._ended.wait(timeout)

    def diagnostics(self) -> str:
        parts = []
        tail = bytes(self._stderr).decode("utf-8", "replace").rstrip()
        if tail:
            parts.append(tail)
        if self._exit_status is not None and self._exit_status != -1:
            parts.append(f"remote command exited with status {self._exit_status}")
        if self._lost is not None:
            parts.append(f"connection lost: {_describe(self._lost)}")
        return "\n".join(parts)

    # --- called on the loop by the session ----------------------------------------
    def _received(self, data: bytes) -> None:
        on_data = self._on_data
        if on_data is not None:
            on_data(data)
            return
        with self._early_cond:
            if self._on_data is None:
                self._early += data
                self._early_cond.notify_all()
                return
        self._on_data(data)  # start() raced in between

    def _received_stderr(self, data: bytes) -> None:
        # Bounded: an agent printing a traceback in a loop must not grow memory.
        self._stderr += data
        excess = len(self._stderr) - STDERR_TAIL_BYTES
        if excess > 0:
            del self._stderr[:excess]

    def _gone(self, exc: Optional[BaseException]) -> None:
        if self._ended.is_set():
            return
        if exc is not None and self._lost is None and not self._closed:
            self._lost = exc
        if self._chan is not None:
            status = self._chan.get_exit_status()
            self._exit_status = status
        with self._early_cond:
            self._eof = True
            self._early_cond.notify_all()
            on_closed = self._on_closed
        self._ended.set()
        if self._conn is not None:
            self._conn.close()  # the agent's channel ended: the connection has no use
        if on_closed is not None:
            on_closed(self._end_reason())

    def _end_reason(self) -> str:
        if self._closed:
            return "the connection was closed by this client"
        if self._lost is not None:
            return (f"the SSH connection broke ({_describe(self._lost)}); the network "
                    "dropped, the machine went away or sshd was restarted")
        return "the agent closed the connection"

    def _why_gone(self, verb: str) -> str:
        if self._closed:
            return f"SSH transport to {self.label} is closed"
        return f"cannot {verb} {self.label}: {self._end_reason()}"


class _AgentSession(asyncssh.SSHClientSession):  # type: ignore[misc]
    """Feeds one exec channel's events to its ``AsyncSSHTransport`` (on the loop)."""

    def __init__(self, transport: AsyncSSHTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes, datatype: Any) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._transport._received_stderr(data)
        else:
            self._transport._received(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._transport._gone(exc)


class _Client(asyncssh.SSHClient):  # type: ignore[misc]
    """Checks the server's host key with vmexec's known_hosts rules."""

    def __init__(self, known_hosts: Optional[str], host: str, port: int, user: str,
                 policy: str) -> None:
        self._args = (known_hosts, host, port, user, policy)
        self.host_key_error: Optional[BaseException] = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
        known_hosts, host, port, user, policy = self._args
        try:
            check_offered_host_key(key.get_algorithm(), key.public_data,
                                   known_hosts=known_hosts, host=host, port=port, user=user,
                                   policy=policy)
        except HostKeyError as exc:
            self.host_key_error = exc
            return False
        return True


def _load_client_key(path: str) -> Any:
    with _client_keys_lock:
        key = _client_keys.get(path)
        if key is None:
            check_key_file(path)  # vmexec's message for a passphrase, a bad file, ...
            key = _client_keys[path] = asyncssh.read_private_key(path)
        return key


async def open_async_ssh(host: str, port: int, user: str, *, key_filename: Optional[str],
                         known_hosts: Optional[str], host_key_policy: str = "reject",
                         command: str, timeout: float, label: Optional[str] = None,
                         retry_refused: bool = True) -> AsyncSSHTransport:
    """Connect to ``user@host:port`` on the I/O loop and run ``command``; a coroutine.

    Each attempt (TCP connect, key exchange, login, ``exec``) is bounded by
    ``timeout``, counted once a slot of the connect pool is free: waiting behind a
    thousand other machines is not the host's fault. While the host refuses the TCP
    connection or drops it before its banner (booting; sshd's ``MaxStartups``), it is
    retried with exponential backoff and jitter for up to ``timeout`` after the first
    attempt, holding no slot while it waits.

    Args: as ``transports.ssh.open_ssh_transport``.

    Returns:
        The transport; bytes the agent sends before ``start`` are kept.

    Raises:
        HostKeyError: the host key is unknown (policy ``"reject"``) or has changed.
        TransportError: anything else failed; the message names the step to take.
    """
    if host_key_policy not in HOST_KEY_POLICIES:
        raise ConfigError(
            f"host_key_policy must be one of {HOST_KEY_POLICIES}, not {host_key_policy!r}")
    _quiet_asyncssh_log()
    address = format_address(user, host, port)
    key = _load_client_key(key_filename) if key_filename is not None else None
    loop = asyncio.get_running_loop()
    trusted = [asyncssh.import_public_key(f"{kind} {_b64(blob)}")
               for kind, blob, revoked in known_host_keys(known_hosts, host, port)
               if not revoked and _importable(kind)]
    delay = _BACKOFF_FIRST
    stage = "waiting for a connect slot"
    attempts = 0
    first_attempt: Optional[float] = None
    while True:
        client = _Client(known_hosts, host, port, user, host_key_policy)
        transport = AsyncSSHTransport(label or address)
        try:
            # Time spent waiting for a slot is this client's queue, not the host's
            # slowness: ``timeout`` counts from the first attempt.
            async with _connect_slots():
                started = loop.time()
                if first_attempt is None:
                    first_attempt = started
                stage = "connecting"
                attempts += 1
                conn = await asyncio.wait_for(asyncssh.connect(
                    host, port, username=user, config=None,
                    client_factory=lambda: client,
                    client_keys=[key] if key is not None else (),
                    agent_path=None if key is not None else (),
                    known_hosts=lambda h, a, p: (trusted, [], []),
                    encryption_algs=SSH_CIPHERS, compression_algs=None,
                    keepalive_interval=0, connect_timeout=timeout,
                    login_timeout=timeout), timeout)
                stage = f"starting the command {command!r}"
                try:
                    chan, _ = await asyncio.wait_for(conn.create_session(
                        lambda: _AgentSession(transport), command, encoding=None),
                        max(0.001, started + timeout - loop.time()))
                except BaseException:
                    conn.abort()
                    raise
                _set_nodelay(conn)
                _skip_ignore_padding(conn)
                transport._conn, transport._chan = conn, chan
                return transport
        except (ConnectionRefusedError, ConnectionResetError, asyncssh.ConnectionLost) as exc:
            assert first_attempt is not None
            if not retry_refused or loop.time() + delay - first_attempt >= timeout:
                raise _translate(exc, address, stage, timeout, client, key_filename,
                                 attempts) from None
        except Exception as exc:
            raise _translate(exc, address, stage, timeout, client, key_filename,
                             attempts) from None
        # Backoff outside the pool: a booting machine must not hold a slot.
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(_BACKOFF_MAX, delay * 2)


def _b64(blob: bytes) -> str:
    import base64

    return base64.b64encode(blob).decode("ascii")


def _importable(kind: str) -> bool:
    return kind.startswith(("ssh-", "ecdsa-", "sk-"))


def _set_nodelay(conn: Any) -> None:
    # Frames are small and latency-bound: Nagle plus delayed ACKs would add ~40 ms.
    sock = conn.get_extra_info("socket")
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _skip_ignore_padding(conn: Any) -> None:
    """Stop asyncssh sending an empty SSH_MSG_IGNORE in front of every packet.

    asyncssh inserts one before each encrypted packet, a countermeasure against
    chosen-plaintext attacks on CBC ciphers. vmexec negotiates only AEAD and CTR ciphers
    (``SSH_CIPHERS``), where it protects nothing, and OpenSSH never sends them; each
    one costs an encryption and a socket write on the client and a decryption on the
    server: a third of the client's I/O time per task round trip. Only that empty
    IGNORE is dropped, and only after authentication.
    """
    send_packet = conn.send_packet
    padding = asyncssh.packet.String(b"")

    def send_without_padding(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == asyncssh.constants.MSG_IGNORE and args == (padding,):
            return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = send_without_padding


# --- error translation: the one place that knows asyncssh's exceptions ------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "the TCP connection was reset"
    if isinstance(exc, asyncssh.ConnectionLost):
        return "the other end closed the TCP connection"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _translate(exc: BaseException, where: str, stage: str, timeout: float, client: _Client,
               key_filename: Optional[str], attempts: int) -> TransportError:
    """Turn a failure while connecting into a TransportError that says what to do."""
    if isinstance(exc, TransportError):
        return exc
    if client.host_key_error is not None:
        return client.host_key_error  # type: ignore[return-value]
    retried = f" (tried {attempts} times in {timeout:g} s)" if attempts > 1 else ""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, socket.timeout)):
        return TransportError(
            f"timed out after {timeout:g} s {stage} ({where}): is the host up and "
            "reachable, and is sshd (not another service) listening on that port? A "
            "firewall that drops packets looks like this; raise connect_timeout if the "
            "machine is just slow")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            f"connection refused by {where}{retried}: is sshd running on the host? check "
            "the port")
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot resolve the host name of {where} ({exc}): check it")
    if isinstance(exc, asyncssh.PermissionDenied):
        key = key_filename or "the ssh-agent and default keys"
        pub = f"{key}.pub" if key_filename and os.path.exists(f"{key}.pub") else \
            "its public half"
        return TransportError(
            f"authentication failed for {where} with {key}: is the public key ({pub}) in "
            "the user's ~/.ssh/authorized_keys on the host, and is the user name right? "
            f"({exc.reason})")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyError(f"the SSH host key of {where} could not be verified: {exc.reason}")
    if isinstance(exc, asyncssh.KeyExchangeFailed):
        return TransportError(
            f"{where} and vmexec share no SSH algorithm ({exc.reason}): upgrade the host's "
            "OpenSSH")
    if isinstance(exc, asyncssh.ChannelOpenError):
        return TransportError(
            f"{where} refused to open a session ({exc.reason}): check MaxSessions and "
            "ForceCommand in the host's sshd_config")
    if isinstance(exc, (ConnectionResetError, asyncssh.ConnectionLost, asyncssh.Error)):
        return TransportError(
            f"{where} closed the connection while {stage}{retried} ({_describe(exc)}): "
            "check the host's sshd log (journalctl -u ssh), its MaxStartups and AllowUsers "
            "settings")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return TransportError(
            f"cannot connect to {where}: this process has too many open files ({exc}); "
            "each machine needs one. Raise the limit (`ulimit -n 65536`, or the hard "
            "limit in /etc/security/limits.conf) or use fewer machines")
    if isinstance(exc, OSError):
        return TransportError(f"cannot connect to {where} while {stage}: {exc}")
    return TransportError(f"unexpected error {stage} ({where}): {_describe(exc)}")


def connect_blocking(**kwargs: Any) -> AsyncSSHTransport:
    """``open_async_ssh`` for a caller on an ordinary thread (blocks until connected)."""
    started = time.monotonic()
    transport = aio.run(open_async_ssh(**kwargs)).result()
    log.debug("ssh %s: connected in %.3f s", transport.label, time.monotonic() - started)
    return transport
