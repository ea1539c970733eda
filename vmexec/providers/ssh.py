"""The ``ssh`` provider: machines the user already has, reached over SSH.

Owns: parsing and validating the host list and SSH options (eagerly, with
``ConfigError``), handing out one ``MachineRecord`` per host, and opening an
``SSHTransport`` that runs ``<python> -m vmexec.agent`` on it. It creates and destroys
nothing: ``terminate`` only forgets machines, and the agent exits by itself when its
stream closes.

Must not import: paramiko (only through ``vmexec.transports.ssh``), the scheduler or the
executor.
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import math
import os
import re
import shlex
import threading
from typing import Any, Optional, Sequence

from vmexec.errors import ConfigError
from vmexec.providers.base import MachineRecord, MachineState, Provider
from vmexec.transports.base import Transport
from vmexec.transports.ssh import HOST_KEY_POLICIES, format_address, open_ssh_transport
from vmexec.transports.ssh_async import open_async_ssh

__all__ = ["SSHProvider", "parse_host", "HOST_FORMS"]

log = logging.getLogger(__name__)

#: The accepted spellings of a host, for error messages.
HOST_FORMS = '"host", "host:port", "user@host", "user@host:port" or "user@[ipv6]:port"'

_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*\$?$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def parse_host(spec: str, default_user: Optional[str] = None) -> tuple[str, str, int]:
    """Split a host string into ``(user, host, port)``.

    Accepts ``"host"``, ``"host:port"``, ``"user@host"``, ``"user@host:port"``, and IPv6
    addresses in brackets (``"user@[::1]:2222"``, ``"[fe80::1]"``) or bare without a
    port (``"::1"``).

    Args:
        spec: the host string.
        default_user: user when the string names none (default: the local user name).

    Returns:
        ``(user, host, port)``; IPv6 hosts come back without brackets; port defaults
        to 22.

    Raises:
        ConfigError: the string is not one of the forms above (the message names it).
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"hosts: cannot parse {spec!r} ({why}); expected {HOST_FORMS}")

    if not isinstance(spec, str):
        raise ConfigError(f"hosts: each host must be a string like {HOST_FORMS}, not {spec!r}")
    text = spec.strip()
    if not text or any(c.isspace() for c in text):
        raise bad("empty or contains spaces")
    user: Optional[str] = None
    if "@" in text:
        user, _, text = text.rpartition("@")
        if not _USER_RE.match(user):
            raise bad(f"bad user name {user!r}")
    port_text: Optional[str] = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise bad("missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise bad(f"unexpected {rest!r} after ']'")
            port_text = rest[1:]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME_RE.match(host):
                raise bad(f"{host!r} is not an address") from None
    elif text.count(":") > 1:
        # Bare IPv6 (as `ssh ::1` accepts it); a port needs the bracket form.
        host = text
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad("an IPv6 address with a port must be written [address]:port") from None
    else:
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if not _HOSTNAME_RE.match(host):
            raise bad(f"{host!r} is not a host name or address")
    port = 22
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise bad(f"port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    return (user or default_user or getpass.getuser(), host, port)


class SSHProvider(Provider):
    """Machines the user already has, each running one agent reached over SSH.

    Args:
        max_workers: the executor's slot target (passed by the executor): the number of
            concurrent calls, as in ``ProcessPoolExecutor``. Without ``slots_per_host``
            the hosts share it evenly (in the order listed: ``max_workers=4`` on one
            host runs 4 calls at once whatever its CPU count; hosts beyond
            ``max_workers`` are not used). None: each host gets its CPU count.
        hosts: the machines, as ``"user@host:port"`` (user and port optional; IPv6 as
            ``"user@[::1]:2222"``). The default user is the local user name.
        ssh_key: private key file to log in with (ed25519, ecdsa or rsa, no
            passphrase). None: the ssh-agent and ``~/.ssh/id_*`` keys.
        known_hosts: known_hosts file pinning the hosts' keys (default
            ``~/.ssh/known_hosts``).
        python: the interpreter to run the agent with on each host (a name on the
            remote PATH or an absolute path).
        host_key_policy: ``"reject"`` refuses hosts whose key is not in known_hosts;
            ``"accept-new"`` records unknown keys on first contact. A changed key is
            always refused.
        slots_per_host: task slots per host (the total is still capped at
            ``max_workers``); None: the host's share of ``max_workers``, or when that
            is None too, the host's CPU count as its agent reports it.
        connect_timeout: seconds for each SSH connection (connect, handshake, login).

    Raises:
        ConfigError: an option is wrong; the message names it and the fix.
    """

    name = "ssh"
    poweroff_on_watchdog = False

    def __init__(
        self,
        max_workers: Optional[int] = None,
        *,
        hosts: Optional[Sequence[str]] = None,
        ssh_key: Optional[str] = None,
        known_hosts: Optional[str] = None,
        python: str = "python3",
        host_key_policy: str = "reject",
        slots_per_host: Optional[int] = None,
        connect_timeout: float = 15.0,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigError(
                f"provider 'ssh' does not take option(s) {', '.join(sorted(unknown))}: it "
                "accepts hosts=, ssh_key=, known_hosts=, python=, host_key_policy=, "
                "slots_per_host= and connect_timeout="
            )
        # The executor's slot target; the scheduler enforces it, a host list is fixed.
        self.max_workers = max_workers
        if isinstance(hosts, str):
            raise ConfigError(
                f"hosts must be a list of strings, not one string: hosts=[{hosts!r}]"
            )
        if hosts is None or len(hosts) == 0:
            raise ConfigError(
                'provider="ssh" needs at least one host: hosts=["user@host:port", ...]'
            )
        self.hosts = [parse_host(h) for h in hosts]
        if ssh_key is not None:
            path = os.path.expanduser(os.fspath(ssh_key))
            if not os.path.isfile(path):
                raise ConfigError(
                    f"ssh_key: no key file at {path}: pass the path of a private key "
                    "(e.g. ~/.ssh/id_ed25519), or None to use ssh-agent and the default keys"
                )
            ssh_key = path
        self.ssh_key = ssh_key
        self.known_hosts = os.path.expanduser(os.fspath(known_hosts)) if known_hosts else None
        if not isinstance(python, str) or not python.strip():
            raise ConfigError(
                f"python must name the remote interpreter (e.g. 'python3' or "
                f"'/usr/bin/python3.11'), not {python!r}"
            )
        self.python = python
        if host_key_policy not in HOST_KEY_POLICIES:
            raise ConfigError(
                f"host_key_policy must be 'reject' (the default: hosts must be in "
                f"known_hosts) or 'accept-new' (trust a host's key on first contact), "
                f"not {host_key_policy!r}"
            )
        self.host_key_policy = host_key_policy
        if slots_per_host is not None and (
            isinstance(slots_per_host, bool)
            or not isinstance(slots_per_host, int)
            or slots_per_host < 1
        ):
            raise ConfigError(
                f"slots_per_host must be a positive integer, or None for each host's CPU "
                f"count, not {slots_per_host!r}"
            )
        self.slots_per_host = slots_per_host
        self._slots = self._plan_slots(max_workers, slots_per_host, len(self.hosts))
        if (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or not math.isfinite(connect_timeout)
            or connect_timeout <= 0
        ):
            raise ConfigError(
                f"connect_timeout must be a positive number of seconds, not {connect_timeout!r}"
            )
        self.connect_timeout = float(connect_timeout)
        self._lock = threading.Lock()
        self._next = 0
        self._records: dict[str, MachineRecord] = {}

    # --- Provider verbs ------------------------------------------------------------------

    def launch(self, slots_wanted: int) -> list[MachineRecord]:
        """Hand out every host not handed out yet (they already exist; nothing starts).

        Args:
            slots_wanted: ignored: a static host costs nothing to connect to.

        Returns:
            One pending record per remaining host that has slots (``slots`` 0 means
            "the host's CPU count"); ``[]`` once every host has been handed out.
        """
        with self._lock:
            new = []
            for index in range(self._next, len(self.hosts)):
                if self._slots[index] is None:
                    continue  # more hosts than max_workers: this one has no share
                user, host, port = self.hosts[index]
                label = format_address(user, host, port)
                record = MachineRecord(
                    id=f"ssh-{index}",
                    label=label,
                    slots=self._slots[index] or 0,
                    provider=self.name,
                    state=MachineState.PENDING,
                    address=host,
                )
                self._records[record.id] = record
                new.append(record)
            self._next = len(self.hosts)
        return new

    @staticmethod
    def _plan_slots(max_workers: Optional[int], slots_per_host: Optional[int],
                    hosts: int) -> list[Optional[int]]:
        """Slots of each host: a number, 0 for "its CPU count", None for "not used".

        ``max_workers`` is the number of concurrent calls (ProcessPoolExecutor's
        meaning), so without ``slots_per_host`` it is spread over the hosts, not capped
        by their CPU counts.
        """
        if slots_per_host is not None or not isinstance(max_workers, int) \
                or isinstance(max_workers, bool) or max_workers < 1:
            return [slots_per_host or 0] * hosts
        share, extra = divmod(max_workers, hosts)
        plan = [share + (1 if index < extra else 0) for index in range(hosts)]
        if share == 0:
            log.info("max_workers=%d is less than the %d hosts listed: using the first %d, "
                     "one slot each", max_workers, hosts, max_workers)
        return [slots or None for slots in plan]

    def connect(self, record: MachineRecord, timeout: float) -> Transport:
        """Open an SSH session on ``record``'s host running the agent.

        Args:
            record: a record returned by ``launch``.
            timeout: the most seconds to spend; the connection is also bounded by
                ``connect_timeout``.

        Returns:
            The ``SSHTransport``; the agent speaks the protocol on it.

        Raises:
            HostKeyError: the host's key is unknown (policy "reject") or changed.
            TransportError: the host could not be reached or logged in to.
        """
        return open_ssh_transport(**self._ssh_arguments(record, timeout))

    connects_async = True

    async def connect_async(self, record: MachineRecord, timeout: float) -> Transport:
        """``connect`` on the shared I/O loop (asyncssh): no thread per host.

        A host that refuses the connection (rebooting; sshd's ``MaxStartups``) is
        retried with backoff within ``connect_timeout``.
        """
        return await open_async_ssh(**self._ssh_arguments(record, timeout))

    def _ssh_arguments(self, record: MachineRecord, timeout: float) -> dict[str, Any]:
        """What either SSH library needs to start the agent on ``record``'s host."""
        user, host, port = self._host_of(record)
        return {"host": host, "port": port, "user": user, "key_filename": self.ssh_key,
                "known_hosts": self.known_hosts, "host_key_policy": self.host_key_policy,
                "command": self.agent_command(),
                "timeout": max(0.001, min(timeout, self.connect_timeout)),
                "label": record.label}

    def agent_command(self) -> str:
        """The remote command line that starts the agent."""
        return f"{shlex.quote(self.python)} -m vmexec.agent"

    def describe(self) -> list[MachineRecord]:
        """The hosts handed out and not terminated."""
        with self._lock:
            return [r for r in self._records.values() if r.state != MachineState.TERMINATED]

    def terminate(self, records: Optional[list[MachineRecord]] = None) -> None:
        """Forget ``records`` (all when None). Nothing remote is touched: each agent
        exits when its SSH stream is closed."""
        with self._lock:
            chosen = list(self._records.values()) if records is None else records
            for record in chosen:
                record.state = MachineState.TERMINATED

    def can_replace(self) -> bool:
        """A lost static host cannot be replaced by another."""
        return False

    def __repr__(self) -> str:
        return f"<SSHProvider {len(self.hosts)} host(s)>"

    def _host_of(self, record: MachineRecord) -> tuple[str, str, int]:
        try:
            index = int(record.id.split("-", 1)[1])
            return self.hosts[index]
        except (IndexError, ValueError):
            raise ConfigError(
                f"record {record.id!r} was not made by this SSHProvider"
            ) from None
