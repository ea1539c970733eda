"""The SSH transport: an exec channel running the agent on a remote machine (paramiko).

Owns opening an SSH connection (TCP connect, banner, key exchange, host-key check,
public-key authentication, ``exec``), all bounded by one deadline, and exposing the
channel as a ``Transport``: ``read`` is the command's stdout, ``write`` its stdin, and a
small background thread keeps the last few KB of its stderr for ``diagnostics()``.

Every paramiko and socket error is translated into ``TransportError`` by ``_translate``,
the one place that knows paramiko's exception types, so callers see one error type
(``HostKeyError`` for a refused host key) whose message names ``user@host:port`` and the
next step.

Host keys follow OpenSSH's ``StrictHostKeyChecking``: ``"reject"`` (= ``yes``) refuses a
host whose key is not in known_hosts, ``"accept-new"`` records an unknown key and
carries on. A key that differs from a known one is refused under every policy. The
known_hosts file and the policies are ``transports.hostkeys``'s (shared with the
asyncssh transport); this module only hands it the key the server offered.

paramiko is imported here and nowhere else in vmexec.
Must not import: providers, scheduler, executor, protocol.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import paramiko

from vmexec.errors import ConfigError, TransportError
from vmexec.transports.base import Transport
from vmexec.transports.hostkeys import (
    DEFAULT_KNOWN_HOSTS,
    HOST_KEY_POLICIES,
    KnownHosts,
    KnownKey,
    check_host_key,
    check_offered_host_key,
    fingerprint_blob,
    format_address,
    known_host_keys,
    lookup_name,
)

__all__ = [
    "SSHTransport",
    "open_ssh_transport",
    "HOST_KEY_POLICIES",
    "DEFAULT_KNOWN_HOSTS",
    "format_address",
    "fingerprint",
    # Host keys live in transports.hostkeys; importable from here as before.
    "known_host_keys",
    "check_offered_host_key",
    "check_key_file",
]

log = logging.getLogger(__name__)

#: How much of the remote command's stderr ``diagnostics()`` keeps (the tail).
STDERR_TAIL_BYTES = 8192

# Default key files tried, in OpenSSH's order, when no key is given.
_DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")

# known_hosts key type -> host-key algorithms that prove possession of such a key.
_KEY_ALGORITHMS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}

_PARAMIKO_LOG = "paramiko.transport.vmexec"

#: The SSH ciphers vmexec prefers, fastest first: AES-GCM (hardware AES on x86 and ARM),
#: then ChaCha20-Poly1305 and AES-CTR for servers without it. AEAD or CTR only: no CBC.
#: Both SSH clients (this one, ``ssh_async``) and the fleet simulator's server use them.
SSH_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
               "chacha20-poly1305@openssh.com", "aes128-ctr")


def fingerprint(key: paramiko.PKey) -> str:
    """Return the OpenSSH-style fingerprint of a public key (``SHA256:...``)."""
    return fingerprint_blob(key.asbytes())


class SSHTransport(Transport):
    """A ``Transport`` over one SSH session channel running the agent command.

    Built by ``open_ssh_transport``; not meant to be constructed directly.

    Threading: one thread reads, writes are serialised by the caller, ``close`` may be
    called from any thread and unblocks a pending ``read`` (paramiko closes the
    channel's buffers, which wakes the reader).
    """

    def __init__(
        self, ssh: paramiko.Transport, channel: paramiko.Channel, label: str
    ) -> None:
        self.label = label
        self._ssh = ssh
        self._chan = channel
        self._closed = False
        self._close_lock = threading.Lock()
        # Bounded tail of stderr: an agent printing a traceback must not grow memory
        # without limit, and the end of it is what explains a failure.
        self._stderr = bytearray()
        self._stderr_lock = threading.Lock()
        # stderr must be drained even if nobody asks for it: stdout and stderr share
        # the channel's flow-control window, so unread stderr would stall stdout.
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name=f"vmexec-ssh-stderr {label}", daemon=True
        )
        self._lost: Optional[BaseException] = None
        self._stderr_thread.start()

    # --- the Transport interface -------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send all of ``data`` to the remote command's stdin.

        Raises:
            TransportError: the channel or the connection is closed or broken.
        """
        try:
            self._chan.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._broken("write to", exc) from exc

    def read(self, max_bytes: int) -> bytes:
        """Return up to ``max_bytes`` of the remote command's stdout; ``b""`` at EOF.

        Raises:
            TransportError: the connection dropped (rather than the command ending).
        """
        try:
            data: bytes = self._chan.recv(max_bytes)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._broken("read from", exc) from exc
        if not data and not self._closed and not self._chan.eof_received:
            # The channel ended without the command's EOF: the TCP connection or the
            # SSH session died. Say so instead of a quiet EOF. (Not is_active():
            # paramiko wakes readers before it clears that flag.)
            raise self._broken("read from", self._transport_exception())
        return data

    def close(self) -> None:
        """Close the channel and the SSH connection (idempotent, any thread)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._chan.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("closing channel to %s: %s", self.label, exc)
        finally:
            self._ssh.close()

    def diagnostics(self) -> str:
        """The tail of the remote command's stderr, its exit status and any link error."""
        said = self._remote_said()
        parts = [said] if said else []
        if self._lost is not None:
            parts.append(f"connection lost: {_describe(self._lost)}")
        return "\n".join(parts)

    # --- extras --------------------------------------------------------------------

    @property
    def cipher(self) -> str:
        """The negotiated cipher (for diagnostics and benchmarks)."""
        return str(self._ssh.remote_cipher)

    @property
    def exit_status(self) -> Optional[int]:
        """The remote command's exit status once it has ended (-1 if it sent none, e.g.
        killed by a signal or the connection dropped), else None."""
        if self._chan.exit_status_ready():
            return int(self._chan.recv_exit_status())
        return None

    def _remote_said(self) -> str:
        parts = []
        if self._chan.exit_status_ready() and threading.current_thread() is not \
                self._stderr_thread:
            # The exit status can overtake the last stderr bytes (another thread reads
            # them): give the reader a moment, so the message ends with the real cause.
            self._stderr_thread.join(timeout=0.5)
        with self._stderr_lock:
            tail = bytes(self._stderr)
        if tail:
            parts.append(tail.decode("utf-8", "replace").rstrip())
        status = self.exit_status
        if status is not None and status != -1:
            parts.append(f"remote command exited with status {status}")
        elif status == -1 and self._ssh.is_active():
            # A closed channel with no status: the command was killed by a signal.
            parts.append("remote command ended without an exit status (killed by a signal?)")
        return "\n".join(parts)

    def _drain_stderr(self) -> None:
        while True:
            try:
                chunk = self._chan.recv_stderr(4096)
            except (OSError, EOFError, paramiko.SSHException):
                return
            if not chunk:
                return
            with self._stderr_lock:
                self._stderr += chunk
                excess = len(self._stderr) - STDERR_TAIL_BYTES
                if excess > 0:
                    del self._stderr[:excess]

    def _transport_exception(self) -> Optional[BaseException]:
        if self._lost is None:
            # get_exception() hands the saved exception out once; keep it.
            self._lost = self._ssh.get_exception()
        return self._lost

    def _broken(self, verb: str, exc: Optional[BaseException]) -> TransportError:
        if self._closed:
            return TransportError(f"SSH transport to {self.label} is closed")
        # The transport thread's exception is the root cause; exc is often only
        # "Socket is closed", a consequence of it.
        lost = self._transport_exception()
        if lost is not None:
            msg = (
                f"cannot {verb} {self.label}: the SSH connection broke ({_describe(lost)}); "
                "the network dropped, the machine went away or sshd was restarted"
            )
        elif self._chan.eof_received or self.exit_status is not None:
            msg = f"cannot {verb} {self.label}: the remote command has ended"
        else:
            reason = f" ({_describe(exc)})" if exc is not None else ""
            msg = (
                f"cannot {verb} {self.label}: the server closed the session{reason}; "
                "check the host's sshd log"
            )
        diag = self._remote_said()
        if diag:
            msg += f"\nremote said:\n{diag}"
        return TransportError(msg)


@dataclass
class _Attempt:
    """State of one connection attempt, shared with the deadline watchdog."""

    address: str
    timeout: float
    stage: str = "connecting"
    timed_out: bool = False
    key_filename: Optional[str] = None
    ssh: Optional[paramiko.Transport] = None
    sock: Any = None
    # Set under `lock` by whichever comes first: the watchdog expiring, or the
    # connection sequence finishing. Timer.cancel() cannot stop a watchdog that has
    # already started running, so the two must agree on who won.
    settled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def open_ssh_transport(
    host: str,
    port: int,
    user: str,
    *,
    key_filename: Optional[str],
    known_hosts: Optional[str],
    host_key_policy: str = "reject",
    command: str,
    timeout: float,
    label: Optional[str] = None,
    sock: Any = None,
) -> SSHTransport:
    """Connect to ``user@host:port``, verify its host key, authenticate and run ``command``.

    The whole sequence (TCP connect, SSH banner, key exchange, authentication, opening
    the channel and starting the command) is bounded by ``timeout``.

    Args:
        host: host name or address (IPv6 without brackets).
        port: SSH port.
        user: remote user name.
        key_filename: private key to authenticate with (ed25519, ecdsa or rsa, not
            passphrase-protected). ``None`` tries the ssh-agent and the default
            ``~/.ssh/id_*`` keys instead. No password is ever asked for.
        known_hosts: known_hosts file to check the host key against (default
            ``~/.ssh/known_hosts``); missing means empty.
        host_key_policy: ``"reject"`` refuses a host whose key is unknown;
            ``"accept-new"`` appends an unknown key to ``known_hosts``. A key that
            differs from a known one is always refused.
        command: the remote command line, run by the remote user's shell.
        timeout: seconds for the whole connection sequence.
        label: name used in messages and logs (default ``user@host:port``).
        sock: an already connected socket (or socket-like object) to the SSH server
            to use instead of connecting to ``host:port``, e.g. through a proxy;
            ``host`` and ``port`` are then used only for the host-key lookup.

    Returns:
        The connected ``SSHTransport``.

    Raises:
        HostKeyError: the host key is unknown (policy ``"reject"``) or has changed.
        TransportError: anything else failed; the message names the step to take.
        ConfigError: ``host_key_policy`` is not one of ``HOST_KEY_POLICIES``.
    """
    if host_key_policy not in HOST_KEY_POLICIES:
        raise ConfigError(
            f"host_key_policy must be one of {HOST_KEY_POLICIES}, not {host_key_policy!r}"
        )
    address = format_address(user, host, port)
    attempt = _Attempt(address=address, timeout=timeout, key_filename=key_filename)
    deadline = time.monotonic() + timeout
    known_hosts_path = os.path.expanduser(known_hosts or DEFAULT_KNOWN_HOSTS)
    # A key that cannot be used fails here, before any network traffic.
    key = _load_key(key_filename) if key_filename is not None else None

    # One watchdog bounds every step: some paramiko waits (exec_command's reply)
    # have no timeout of their own, and a host that accepts TCP but never speaks
    # must not hang the caller. Closing the socket/transport wakes whatever waits.
    watchdog = threading.Timer(timeout, _expire, args=(attempt,))
    watchdog.daemon = True
    watchdog.start()
    started = time.monotonic()
    try:
        try:
            if sock is None:
                attempt.sock = sock = socket.create_connection(
                    (host, port), timeout=max(0.001, deadline - time.monotonic())
                )
            else:
                attempt.sock = sock
            _set_nodelay(sock)

            attempt.stage = "waiting for the SSH banner and key exchange"
            ssh = paramiko.Transport(sock)
            ssh.set_log_channel(_quiet_paramiko_log())
            attempt.ssh = ssh
            if attempt.timed_out:  # the watchdog fired before ssh existed
                raise socket.timeout()
            remaining = max(0.001, deadline - time.monotonic())
            ssh.banner_timeout = ssh.handshake_timeout = remaining
            ssh.auth_timeout = remaining
            known = KnownHosts.load(known_hosts_path)
            name = lookup_name(host, port)
            known_keys = known.lookup(name)
            _prefer_known_key_types(ssh, known_keys)
            _prefer_fast_ciphers(ssh)
            done = threading.Event()
            ssh.start_client(event=done)
            if not done.wait(max(0.001, deadline - time.monotonic())):
                raise socket.timeout()
            if not ssh.is_active():
                raise ssh.get_exception() or paramiko.SSHException("negotiation failed")

            attempt.stage = "checking the host key"
            server_key = ssh.get_remote_server_key()
            check_host_key(
                server_key.get_name(),
                server_key.asbytes(),
                known_keys,
                lookup_name=name,
                host=host,
                port=port,
                address=address,
                path=known_hosts_path,
                policy=host_key_policy,
            )

            attempt.stage = "authenticating"
            _authenticate(ssh, user, key, attempt)

            attempt.stage = "opening a session channel"
            channel = ssh.open_session(timeout=max(0.001, deadline - time.monotonic()))
            attempt.stage = f"starting the command {command!r}"
            channel.exec_command(command)
        except TransportError:  # already ours (host key, key file): keep its message
            raise
        except Exception as exc:  # translated, never swallowed: re-raised below
            raise _translate(exc, attempt) from exc
    except BaseException:
        _discard(attempt)
        raise
    finally:
        watchdog.cancel()
    with attempt.lock:
        expired, attempt.settled = attempt.settled, True
    if expired:
        # The watchdog fired just as the last step finished and closed the transport.
        _discard(attempt)
        raise _translate(socket.timeout(), attempt)
    transport = SSHTransport(ssh, channel, label or address)
    log.debug(
        "ssh %s: connected in %.3f s (%s), running %r",
        address,
        time.monotonic() - started,
        ssh.remote_cipher,
        command,
    )
    return transport


# --- for other SSH clients --------------------------------------------------------
# ``transports.ssh_async`` loads keys with asyncssh but checks a key file first with
# this one, for vmexec's messages (a passphrase, a missing file, an unusable key).


def check_key_file(path: str) -> None:
    """Raise ``TransportError`` naming the fix when ``path`` is not a usable private key."""
    _load_key(path)


# --- connection steps ------------------------------------------------------------


class _DemoteToDebug(logging.Filter):
    """Re-level paramiko's records to DEBUG.

    paramiko logs every failure at ERROR with a traceback from its own thread, and
    connection chatter at INFO. vmexec reports each failure once, as the TransportError
    it raises, so those records would only repeat it (and print, via logging's
    last-resort handler, in programs that never configured logging).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.msg = f"[paramiko {record.levelname}] {record.msg}"
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


@functools.lru_cache(maxsize=None)
def _quiet_paramiko_log() -> str:
    # A child of paramiko's usual logger, so `logging.getLogger("paramiko")` handlers
    # still see the records, at DEBUG. Set up on first use, not at import.
    logging.getLogger(_PARAMIKO_LOG).addFilter(_DemoteToDebug())
    return _PARAMIKO_LOG


def _set_nodelay(sock: Any) -> None:
    # Frames are small and latency-bound: without TCP_NODELAY, Nagle's algorithm and
    # delayed ACKs add up to ~40 ms to a request/reply round trip.
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _expire(attempt: _Attempt) -> None:
    with attempt.lock:
        if attempt.settled:
            return  # connected just in time: the connection is the caller's now
        attempt.settled = attempt.timed_out = True
    _discard(attempt)


def _discard(attempt: _Attempt) -> None:
    if attempt.ssh is not None:
        attempt.ssh.close()
    if attempt.sock is not None and hasattr(attempt.sock, "close"):
        try:
            attempt.sock.close()
        except OSError:
            pass


def _prefer_fast_ciphers(ssh: paramiko.Transport) -> None:
    # AES-GCM encrypts and authenticates in one pass; with many small frames it cuts
    # ~15% off a loopback round trip against paramiko's default aes128-ctr + HMAC.
    options = ssh.get_security_options()
    first = tuple(c for c in SSH_CIPHERS if c in options.ciphers)
    options.ciphers = first + tuple(c for c in options.ciphers if c not in first)


def _prefer_known_key_types(ssh: paramiko.Transport, known: list[KnownKey]) -> None:
    # Like OpenSSH: ask first for the host-key types we already know, so a server with
    # several host keys proves the one we can check instead of presenting a new type.
    known = [k for k in known if not k.revoked]
    if not known:
        return
    options = ssh.get_security_options()
    wanted: list[str] = []
    for entry in known:
        for algorithm in _KEY_ALGORITHMS.get(entry.key_type, (entry.key_type,)):
            if algorithm in options.key_types and algorithm not in wanted:
                wanted.append(algorithm)
    if wanted:
        options.key_types = tuple(wanted) + tuple(
            k for k in options.key_types if k not in wanted
        )


def _authenticate(
    ssh: paramiko.Transport, user: str, key: Optional[paramiko.PKey], attempt: _Attempt
) -> None:
    if key is not None:
        ssh.auth_publickey(user, key)
        return
    # No key given: the ssh-agent's keys, then the default key files, as `ssh` would.
    # Never a password prompt: nobody is there to answer it.
    candidates: list[tuple[str, paramiko.PKey]] = []
    try:
        candidates += [("ssh-agent key", k) for k in paramiko.Agent().get_keys()]
    except paramiko.SSHException as exc:
        log.debug("ssh-agent not usable: %s", exc)
    for name in _DEFAULT_KEY_FILES:
        path = os.path.expanduser(name)
        if os.path.exists(path):
            try:
                candidates.append((path, _load_key(path)))
            except TransportError as exc:
                log.debug("skipping %s: %s", path, exc)
    if not candidates:
        raise TransportError(
            f"no SSH key to log in to {attempt.address}: pass ssh_key='path/to/key', or "
            "create ~/.ssh/id_ed25519 (ssh-keygen -t ed25519) and add its .pub to the "
            "host's authorized_keys"
        )
    last: Optional[BaseException] = None
    for name, key in candidates:
        try:
            ssh.auth_publickey(user, key)
            return
        except paramiko.BadAuthenticationType:
            raise
        except paramiko.AuthenticationException as exc:
            log.debug("ssh %s: %s refused", attempt.address, name)
            last = exc
    attempt.key_filename = ", ".join(name for name, _ in candidates)
    assert last is not None
    raise last


def _load_key(path: str) -> paramiko.PKey:
    expanded = os.path.expanduser(path)
    try:
        return paramiko.PKey.from_path(expanded)
    except (paramiko.PasswordRequiredException, TypeError):
        # cryptography signals "encrypted but no password given" with a TypeError.
        raise TransportError(
            f"the SSH key {path} is protected by a passphrase and vmexec never prompts: "
            "use a key without one (ssh-keygen -t ed25519 -N ''), or load it into "
            "ssh-agent and pass no key"
        ) from None
    except FileNotFoundError:
        raise TransportError(f"SSH key file {path} does not exist: check ssh_key") from None
    except (OSError, ValueError, paramiko.SSHException) as exc:
        raise TransportError(
            f"cannot load the SSH key {path} ({exc}): it must be an OpenSSH or PEM "
            "private key of type ed25519, ecdsa or rsa"
        ) from exc


# --- error translation: the one place that knows paramiko's exceptions -------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the other end closed the TCP connection"
    if isinstance(exc, ConnectionResetError):
        return "the TCP connection was reset"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _translate(exc: BaseException, attempt: _Attempt) -> TransportError:
    """Turn any failure while connecting into a TransportError that says what to do."""
    where = attempt.address
    if isinstance(exc, TransportError):
        return exc
    if attempt.timed_out or isinstance(exc, (socket.timeout, TimeoutError)):
        return TransportError(
            f"timed out after {attempt.timeout:g} s {attempt.stage} ({where}): is the "
            "host up and reachable, and is sshd (not another service) listening on that "
            "port? A firewall that drops packets looks like this; raise connect_timeout "
            "if the machine is just slow"
        )
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            f"connection refused by {where}: is sshd running on the host? check the port"
        )
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot resolve the host name of {where} ({exc}): check it")
    if isinstance(exc, paramiko.BadAuthenticationType):
        return TransportError(
            f"{where} does not accept public-key logins (it allows: "
            f"{', '.join(exc.allowed_types) or 'nothing'}): enable PubkeyAuthentication "
            "in the host's sshd_config"
        )
    if isinstance(exc, paramiko.AuthenticationException):
        key = attempt.key_filename or "the key"
        pub = f"{key}.pub" if os.path.exists(f"{key}.pub") else "its public half"
        return TransportError(
            f"authentication failed for {where} with {key}: is the public key ({pub}) "
            "in the user's ~/.ssh/authorized_keys on the host, and is the user name "
            f"right? ({exc})"
        )
    if isinstance(exc, paramiko.ChannelException):
        return TransportError(
            f"{where} refused to open a session ({exc.text}): check MaxSessions and "
            "ForceCommand in the host's sshd_config"
        )
    if isinstance(exc, paramiko.IncompatiblePeer):
        return TransportError(
            f"{where} and paramiko share no SSH algorithm ({exc}): upgrade the host's "
            "OpenSSH or paramiko"
        )
    if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
        return TransportError(
            f"{where} did not send an SSH banner ({exc}): is that port an SSH server? "
            "check the port"
        )
    if isinstance(exc, (EOFError, ConnectionResetError, paramiko.SSHException)):
        return TransportError(
            f"{where} closed the connection while {attempt.stage} ({_describe(exc)}): "
            "check the host's sshd log (journalctl -u ssh), its MaxStartups and "
            "AllowUsers settings"
        )
    if isinstance(exc, OSError) and exc.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
    ):
        return TransportError(f"{where} is unreachable ({exc}): check the address and network")
    if isinstance(exc, OSError):
        return TransportError(f"cannot connect to {where} while {attempt.stage}: {exc}")
    return TransportError(
        f"unexpected error {attempt.stage} ({where}): {_describe(exc)}"
    )
