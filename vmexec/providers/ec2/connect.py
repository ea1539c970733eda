"""Reaching a fleet's machine: wait for it to run, follow its boot, start its agent.

``Connector.connect(record, timeout)``::

    wait for "running" (InstanceWatcher: one batched poll per region)
      -> SSH with the fleet's pinned host key and ephemeral client key, retried while
         the machine boots (vmexec.retry.booting; a moved client re-admits itself)
      -> probe the boot outcome (userdata.probe_command): READY, FAILED or still booting
      -> with environment sync: install it over SSH (the script on stdin: its presigned
         URLs never appear in user-data or on a command line)
      -> the agent's SSH channel (userdata.agent_command)

It also owns what the agent is told at its handshake (``agent_options``) and the
environment's per-region staging (artifacts uploaded once per region, whatever the
number of machines). On failure the error carries the reason and the end of the
machine's console output.

Lives under ``providers/ec2``. SSH goes through ``vmexec.transports.ssh``; must not
import paramiko, the scheduler or the executor.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping, Optional

from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.environment import PreparedEnvironment
from vmexec.environment.install import built_builds, redact_urls, stdin_command
from vmexec.environment.stage import stage_artifacts
from vmexec.errors import TransportError
from vmexec.providers.base import MachineRecord, MachineState
from vmexec.providers.ec2.fleet import RegionClients
from vmexec.providers.ec2.options import EC2Options
from vmexec.providers.ec2.setup import Reach
from vmexec.providers.ec2.watch import InstanceWatcher
from vmexec.providers.ec2.userdata import FAILED, NOTICE_FILE, READY, FleetKeys, \
    agent_command, keep_active_command, probe_command, script_text
from vmexec.transports.base import Transport
from vmexec.transports.ssh import open_ssh_transport

__all__ = ["Connector", "poweroff_argv"]

log = logging.getLogger(__name__)

# Each SSH probe waits this long on the machine for the boot to finish before the
# client reconnects: few connections per machine, and a timely answer.
_PROBE_WAIT = 30
_CONSOLE_TAIL = 2000
_INSTALLED = "__VMEXEC_ENVIRONMENT_INSTALLED__"

def poweroff_argv() -> list[str]:
    """The agent's power-off command: ``scripts/poweroff.sh`` under ``sh -c`` (the
    machine has no copy of the package's scripts; the argv carries it)."""
    return ["sh", "-c", script_text("poweroff.sh")]


class _BootFailed(Exception):
    """The boot script wrote its ``failed`` marker: not worth retrying."""


class Connector:
    """Connects to the machines of one fleet (``EC2Provider.connect``); thread-safe.

    Args:
        options: the fleet's options (timeouts, login user, address seam, staging).
        fleet_id, tags: the fleet, and the tags of its staged artifacts.
        clients: region -> its clients (console output).
        watchers: region -> the poller that reports instances running.
        reach: which address to dial, and following this computer when it moves.
        keys: the fleet's keys (made on first use).
        environment: what the machines install over SSH (None: the boot script did).
        closing: set when the fleet shuts down: waits and retries stop.
    """

    def __init__(self, *, options: EC2Options, fleet_id: str, tags: Mapping[str, str],
                 clients: Mapping[str, RegionClients],
                 watchers: Mapping[str, InstanceWatcher], reach: Reach,
                 keys: Callable[[], FleetKeys], environment: Optional[PreparedEnvironment],
                 closing: threading.Event) -> None:
        self.options = options
        # Settable (a test seam: a harness's sshd stands in for the machines).
        self.address_for = options.address_for
        self.ssh_user = options.ssh_user
        self.fleet_id = fleet_id
        self.tags = tags
        self.environment = environment
        self._clients = clients
        self._watchers = watchers
        self._reach = reach
        self._keys = keys
        self._closing = closing
        self._lock = threading.Lock()
        self._probes: set[Transport] = set()  # boot probes in flight, closed at teardown
        self._roots: dict[str, str] = {}  # instance id -> its $VMEXEC_ROOT ("" on EC2)
        self._install_scripts: dict[str, str] = {}  # region -> staged install script
        # region -> staged artifacts, and the sha256 of shared builds this fleet's
        # machines reported ("<sdist>/<arch>" -> sha256): only those are installed.
        self._staged: dict[str, list[Any]] = {}
        self._build_hashes: dict[str, dict[str, str]] = {}
        self._staging_lock = threading.Lock()

    def close(self) -> None:
        """Close the boot probes in flight (the fleet shuts down)."""
        with self._lock:
            probes = list(self._probes)
        for transport in probes:
            transport.close()

    def staged_regions(self) -> list[str]:
        """Regions where the environment's artifacts were staged.

        Without the staging lock: the teardown asks, and must not wait for an upload in
        progress (list() of a dict is one step under the GIL).
        """
        return list(self._install_scripts)

    def connect(self, record: MachineRecord, timeout: float) -> Transport:
        """``EC2Provider.connect`` (its docstring says what is returned and raised)."""
        if self._closing.is_set():
            raise TransportError(f"{record.label}: the fleet is shutting down")
        clock = retry.current_clock()
        deadline = clock.monotonic() + min(timeout, self.options.boot_timeout)
        entry = self._watchers[record.region or ""].wait_running(record.id, deadline)
        record.state = MachineState.RUNNING
        record.address = self._reach.dial_address(record.region or "", entry)
        record.zone = entry.get("Placement", {}).get("AvailabilityZone", record.zone)
        host, port = self.address_for(record)
        keys = self._keys()

        def ssh(command: str, seconds: float) -> Transport:
            try:
                return open_ssh_transport(
                    host, port, self.ssh_user, key_filename=keys.client_key,
                    known_hosts=keys.known_hosts, host_key_policy="reject",
                    command=command,
                    timeout=max(0.5, min(seconds, deadline - clock.monotonic())),
                    label=record.label)
            except TransportError:
                # A laptop on another network is no longer admitted by the fleet's
                # security groups: follow it, and the next attempt gets through.
                self._reach.follow()
                raise

        def probe() -> None:
            remaining = deadline - clock.monotonic()
            wait = int(max(1, min(_PROBE_WAIT, remaining)))
            transport = ssh(probe_command(wait), 30.0)
            with self._lock:
                self._probes.add(transport)
            try:
                output = _read_all(transport, wait + 30.0)
            finally:
                with self._lock:
                    self._probes.discard(transport)
            first, _, rest = output.partition("\n")
            status, _, root = first.strip().partition(" ")
            if status == READY:
                with self._lock:
                    self._roots[record.id] = root.strip()
                return
            if status == FAILED:
                raise _BootFailed(rest.strip())
            raise TransportError(f"{record.label} is still booting"
                                 + (f"; boot log ends:\n{rest[-800:]}" if rest else ""))

        policy = retry.booting(deadline, record.label, retry_on=(TransportError,),
                               abort=self._closing, clock=clock)
        try:
            policy(probe)
            if self.environment is not None:
                self.install_environment(record, ssh, deadline - clock.monotonic())
            transport = policy(ssh, agent_command(
                agent_grace=int(self.options.keepalive) if self.options.name else None,
                note_start=True), 30.0)
        except _BootFailed as failed:
            raise TransportError(f"{record.label}: the boot script failed: {failed}") from None
        except TransportError as exc:
            if self._closing.is_set():
                raise TransportError(f"{record.label}: the fleet is shutting down") from None
            console = self.console_tail(record)
            raise TransportError(
                f"{record.label} was not ready within {min(timeout, self.options.boot_timeout):.0f}s "
                f"(boot_timeout): last error: {exc}"
                + (f"\nconsole output ends:\n{console}" if console else "")) from exc
        return transport

    def install_script(self, region: str) -> str:
        """The environment's install script for ``region``, staging its artifacts once.

        Artifacts go to the region's staging bucket once (content-addressed: unchanged
        ones are not uploaded again), whatever the number of machines.
        """
        assert self.environment is not None
        with self._staging_lock:
            script = self._install_scripts.get(region)
            if script is None:
                staged = stage_artifacts(self.options.session, [region], self.fleet_id,
                                         self.environment.artifacts,
                                         archs=self.environment.archs, tags=self.tags,
                                         endpoint_url=self.options.endpoint_url)[region]
                self._staged[region] = list(staged.artifacts)
                script = self._install_scripts[region] = self.environment.script(
                    staged.artifacts, build_sha256=self._build_hashes.get(region))
            return script

    def _learn_builds(self, region: str, output: str) -> None:
        """Record the shared builds a machine reported; later installs may use them."""
        learned = built_builds(output)
        if not learned or self.environment is None:
            return
        with self._staging_lock:
            known = self._build_hashes.setdefault(region, {})
            new = {k: v for k, v in learned.items() if k not in known}
            if new and region in self._staged:
                known.update(new)
                self._install_scripts[region] = self.environment.script(
                    self._staged[region], build_sha256=known)

    def install_environment(self, record: MachineRecord,
                             ssh: Callable[[str, float], Transport], seconds: float) -> None:
        """Install the synced environment over SSH, after the boot script is done.

        Over SSH rather than in user-data: the install script carries presigned S3 URLs
        (which name the access key id, and a session token with temporary credentials);
        user-data is readable by every process on the machine for its whole life, the
        SSH channel is not. The machine pulls the artifacts itself: the client's upload
        does not grow with the number of machines.
        """
        script = self.install_script(record.region or "")
        # The script (presigned URLs) goes on stdin: a command line is world-readable
        # on the machine (ps) and appears in debug logs.
        runner, payload = stdin_command(script)
        command = keep_active_command(
            "PY=$(cat \"${VMEXEC_ROOT:-}/var/lib/vmexec/python\" 2>/dev/null); "
            f"export PY; {runner} 2>&1 && echo {_INSTALLED}")
        transport = ssh(command, 60.0)
        try:
            transport.write(payload)
        except TransportError:
            pass  # _read_all reports what the machine said
        output = _read_all(transport, max(60.0, seconds))
        self._learn_builds(record.region or "", output)
        if _INSTALLED not in output:
            raise _BootFailed("installing the environment failed:\n"
                              + redact_urls(output[-1500:]))

    def agent_options(self, record: MachineRecord) -> dict[str, object]:
        """Tell the agent where spot interruption notices appear, and how to power off.

        The notice file is the one the boot script's metadata poller writes, under the
        machine's ``$VMEXEC_ROOT`` as the boot probe reported it. Power-off honours
        ``$VMEXEC_POWEROFF`` in the machine's environment (as the boot script's dead-man
        loop does), else ``shutdown -h now`` (through ``sudo -n`` when not root).
        """
        with self._lock:
            root = self._roots.get(record.id, "")
        options: dict[str, object] = {"notice_file": f"{root.rstrip('/')}/{NOTICE_FILE}",
                                      "poweroff": poweroff_argv()}
        if self.environment is not None:
            # The skew guard's expected value, and the workers' environment variables
            # (over SSH: never in user-data, which anyone on the machine can read).
            options["environment_hash"] = self.environment.token
            options["env"] = dict(self.environment.spec.env)
        return options

    def console_tail(self, record: MachineRecord) -> str:
        try:
            answer = self._clients[record.region or ""].ec2.get_console_output(
                InstanceId=record.id, Latest=True)
        except ClientError as exc:
            log.debug("no console output for %s: %s", record.id, exc)
            return ""
        return str(answer.get("Output") or "")[-_CONSOLE_TAIL:]


def _read_all(transport: Transport, timeout: float) -> str:
    """Everything ``transport`` sends until EOF (closed after ``timeout`` seconds)."""
    timer = threading.Timer(timeout, transport.close)
    timer.daemon = True
    timer.start()
    chunks = []
    try:
        while True:
            data = transport.read(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        timer.cancel()
        transport.close()
    return b"".join(chunks).decode("utf-8", "replace")
