"""The local cloud's machines: every instance moto launches, booted as a fake VM.

Owns ``MachineWatcher``: a thread that polls ``DescribeInstances`` in every region the
cloud is used in (at once when asked: after a launch or terminate call, a power-off, a
finished boot script; else every ``poll_interval``) and gives every new instance a fake
VM (``vmexec.testing.fakevm``) that runs its user-data for real — at most
``max_concurrent_boots`` boot scripts at a time, since the machines share this
computer's CPUs — and stops the VM when the instance is terminated or stopped. Also:
power-off from inside a machine (the agent's watchdog, the boot script's dead-man
switch) terminates or stops its instance as its ``InstanceInitiatedShutdownBehavior``
says; spot reclaims; the faults that live in a machine (killed, frozen, blackholed,
failed boot); and each machine's loopback address.

Part of ``LocalCloud`` (``vmexec.testing.localcloud``), whose lock, clients and region
list it uses. Must not import: paramiko, the scheduler, the executor or any provider.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import ipaddress
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from vmexec.testing.fakevm import (
    BOOT_SLOT_SECONDS,
    FakeVM,
    FakeVMError,
    FakeVMHost,
    VMSpec,
    stop_machines,
)
from vmexec.testing.faults import LaunchTemplates
from vmexec.testing.motoserver import MOTO_ERRORS

if TYPE_CHECKING:
    from vmexec.testing.localcloud import LocalCloud

__all__ = ["MachineWatcher"]

log = logging.getLogger(__name__)

# Instance states in which a machine is off or going: its fake VM stops.
_GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})


@dataclasses.dataclass
class _Machine:
    """The harness's record of one instance and its fake VM."""

    vm: FakeVM
    region: str
    poweroff_at: Optional[float] = None
    reclaim_at: Optional[float] = None
    gone: bool = False


class MachineWatcher:
    """Watches moto and gives every instance a fake VM (see the module docstring).

    Args:
        cloud: the ``LocalCloud`` it belongs to (its clients, instances and regions).
        lock: the cloud's lock, which guards this state too.
        templates: launch template data, read without faults.
        poll_interval: seconds between looks at moto when nothing asked for one.
        max_concurrent_boots: boot scripts that run at once (default: the CPU count).
    """

    def __init__(self, cloud: "LocalCloud", lock: threading.RLock, templates: LaunchTemplates,
                 poll_interval: float = 1.0, max_concurrent_boots: Optional[int] = None
                 ) -> None:
        self._cloud = cloud
        self._lock = lock
        self._templates = templates
        self.poll_interval = poll_interval
        self.max_concurrent_boots = max(1, max_concurrent_boots or os.cpu_count() or 1)
        self._machines: dict[str, _Machine] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._next_address = 0
        self._net = random.randrange(32, 250)  # 127.<net>.x.y: unlikely to meet another cloud
        self._boot_queue: collections.deque[FakeVM] = collections.deque()
        self._boot_waiters: list[threading.Thread] = []
        self._poll_requested = True
        self._pending_blackholes = 0
        self._pending_broken = 0
        self._broken_ids: set[str] = set()
        self._wake = threading.Event()
        self._adopted = threading.Condition(self._lock)
        #: Set when the cloud closes: ends the watcher, and any wait on the cloud.
        self.closing = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._host: Optional[FakeVMHost] = None
        # Instance id -> the launch template version CreateFleet launched it from.
        self._fleet_launches: dict[str, dict[str, str]] = {}

    def start(self, host: FakeVMHost) -> None:
        """Start watching; machines are made on ``host``."""
        self._host = host
        self._watcher = threading.Thread(target=self._watch, name="localcloud-watcher",
                                         daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher and every machine (their instances are left as they are)."""
        self.closing.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join(30)
            if self._watcher.is_alive():
                log.error("local cloud watcher did not stop within 30 s")
            self._watcher = None
        with self._lock:
            machines = list(self._machines.values())
        if machines:
            self._stop_machines([m.vm for m in machines])
        with self._lock:
            waiters, self._boot_waiters = self._boot_waiters, []
        for waiter in waiters:
            waiter.join(10)  # their boot scripts were killed with the machines

    def __len__(self) -> int:
        return len(self._machines)

    def address(self, instance_id: str) -> tuple[str, int]:
        """Where ``instance_id``'s sshd listens, fixed the first time it is asked."""
        with self._lock:
            if instance_id not in self._addresses:
                self._addresses[instance_id] = self._allocate_address()
            return self._addresses[instance_id]

    # --- looking at machines -----------------------------------------------------------

    @property
    def vms(self) -> dict[str, FakeVM]:
        """The fake VMs started so far, by instance id (stopped ones included)."""
        with self._lock:
            return {i: m.vm for i, m in self._machines.items()}

    def vm(self, instance_id: str, timeout: float = 30.0) -> FakeVM:
        """The fake VM of ``instance_id``, waiting up to ``timeout`` for the watcher.

        Raises:
            LookupError: no such instance appeared in time.
        """
        self.request_poll()
        deadline = time.monotonic() + timeout
        with self._adopted:
            while instance_id not in self._machines:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LookupError(f"no fake VM for instance {instance_id} after "
                                      f"{timeout:g}s (regions polled: {self._cloud.regions})")
                self._adopted.wait(left)
            return self._machines[instance_id].vm

    def poweroff_due(self, instance_id: str) -> Optional[float]:
        """Seconds until a power-off the machine scheduled (``shutdown -h +M``), or None."""
        with self._lock:
            machine = self._machines.get(instance_id)
            if machine is None or machine.poweroff_at is None:
                return None
            return max(0.0, machine.poweroff_at - time.monotonic())

    # --- faults that live in a machine ---------------------------------------------------

    def interrupt(self, instance_id: str, terminate_after: Optional[float] = None) -> Path:
        """Give a spot instance its two-minute interruption notice.

        Writes ``$VMEXEC_ROOT/var/lib/vmexec/spot-interruption`` in the machine (the JSON
        EC2's metadata service serves at ``spot/instance-action``).

        Args:
            instance_id: the instance.
            terminate_after: seconds after which the instance is reclaimed (terminated
                in moto, its VM stopped); None leaves it running.

        Returns:
            The notice file.
        """
        vm = self.vm(instance_id)
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=terminate_after if terminate_after is not None else 120)
        path = vm.interrupt({"action": "terminate",
                             "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        if terminate_after is not None:
            with self._lock:
                self._machines[instance_id].reclaim_at = time.monotonic() + terminate_after
            self.request_poll()
        log.info("spot interruption notice for %s", instance_id)
        return path

    def kill_vm(self, instance_id: str, silent: bool = False) -> int:
        """The machine dies mid-work: all its processes and its sshd are killed at once.

        The instance stays "running" in moto, as EC2 shows a dead machine until someone
        terminates it.

        Args:
            instance_id: the instance.
            silent: freeze everything instead (SIGSTOP): connections stay open and go
                quiet, so only heartbeats can tell.

        Returns:
            How many processes were killed or frozen.
        """
        return self.vm(instance_id).kill(silent=silent)

    def blackhole(self, instance_id: Optional[str] = None, *, count: int = 1) -> None:
        """An sshd that never answers: connections are accepted, no banner ever comes.

        Args:
            instance_id: that machine, now (sessions already open stay up).
            count: without an id, the next ``count`` machines to boot.
        """
        if instance_id is not None:
            self.vm(instance_id).blackhole()
            return
        with self._lock:
            self._pending_blackholes += count

    def fail_boot(self, instance_id: Optional[str] = None, *, count: int = 1) -> None:
        """Boot scripts that fail: the machine's Python is broken, so the script's own
        error path runs (it should write ``failed`` and log why).

        Args:
            instance_id: that instance, which must not have booted yet.
            count: without an id, the next ``count`` machines to boot.

        Raises:
            FakeVMError: the instance's machine has already booted.
        """
        with self._lock:
            if instance_id is None:
                self._pending_broken += count
                return
            if instance_id in self._machines:
                raise FakeVMError(f"{instance_id} has booted already; call fail_boot(count=N)"
                                  " before launching instead")
            self._broken_ids.add(instance_id)

    # --- the watcher ---------------------------------------------------------------------

    def _watch(self) -> None:
        next_poll = 0.0
        while not self.closing.is_set():
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            if self.closing.is_set():
                return
            with self._lock:
                requested, self._poll_requested = self._poll_requested, False
            polling = requested or time.monotonic() >= next_poll
            if polling:
                next_poll = time.monotonic() + self.poll_interval
            try:
                # A finished boot script frees a boot slot: that needs no look at moto.
                self._start_boots()
                due = self._poll_once() if polling else None
            except MOTO_ERRORS as exc:
                # moto busy or restarting: try again on the next poll.
                log.warning("local cloud watcher: polling moto failed: %s", exc)
                continue
            except Exception:  # noqa: BLE001 - logged with its traceback, not swallowed
                # Anything else would end this thread without a word, and with it every
                # later boot and power-off of the cloud's machines.
                log.exception("local cloud watcher: a poll failed (watching on)")
                continue
            if due is not None:
                # Come back when the next scheduled power-off is due, not a poll later.
                next_poll = min(next_poll, due)

    def request_poll(self) -> None:
        """Make the watcher look at moto now (after a launch, a terminate, a power-off)."""
        with self._lock:
            self._poll_requested = True
        self._wake.set()

    def _poll_once(self) -> Optional[float]:
        """One look at moto: adopt new instances, stop gone ones, run due power-offs.

        Returns:
            When the next scheduled power-off or reclaim is due (monotonic), or None.
        """
        seen: dict[str, tuple[str, dict[str, Any]]] = {}
        for region in self._cloud.regions:
            for inst in self._cloud.instances(region):
                seen[inst["InstanceId"]] = (region, inst)
        to_stop: list[_Machine] = []
        with self._lock:
            known = dict(self._machines)
        try:
            for instance_id, (region, inst) in seen.items():
                state = inst["State"]["Name"]
                machine = known.get(instance_id)
                if machine is None:
                    if state in ("pending", "running"):
                        self._try(instance_id, self._adopt, region, inst)
                    continue
                if state in _GONE_STATES and not machine.gone:
                    machine.gone = True
                    to_stop.append(machine)
            now = time.monotonic()
            for instance_id, machine in known.items():
                if machine.gone:
                    continue
                machine.vm.poll()
                if instance_id not in seen:  # moto was reset under us
                    machine.gone = True
                elif machine.poweroff_at is not None and now >= machine.poweroff_at:
                    self._try(instance_id, self._power_off, machine)
                elif machine.reclaim_at is not None and now >= machine.reclaim_at:
                    self._try(instance_id, self._reclaim, machine)
                if machine.gone:
                    to_stop.append(machine)
        finally:
            # Nothing looks at a machine marked gone again: stop it whatever failed after.
            if to_stop:
                self._stop_machines([m.vm for m in to_stop])
        deadlines = [t for m in known.values() if not m.gone
                     for t in (m.poweroff_at, m.reclaim_at) if t is not None]
        return min(deadlines) if deadlines else None

    def _try(self, instance_id: str, step: Callable[..., None], *args: Any) -> None:
        """Run one instance's step of a poll; an API error is logged, not raised: it must
        not hold up the other instances' steps (their power-offs among them). The step
        runs again on the next poll."""
        try:
            step(*args)
        except MOTO_ERRORS as exc:
            log.warning("local cloud watcher: %s of %s failed, trying again on the next "
                        "poll: %s", step.__name__.strip("_"), instance_id, exc)

    def _adopt(self, region: str, inst: dict[str, Any]) -> None:
        instance_id = inst["InstanceId"]
        ec2 = self._cloud.client(region)
        user_data = ec2.describe_instance_attribute(InstanceId=instance_id,
                                                    Attribute="userData")
        raw = user_data.get("UserData", {}).get("Value")
        host, port = self._cloud.address_for(instance_id)
        spec = VMSpec(
            instance_id=instance_id,
            user_data=base64.b64decode(raw) if raw else b"",
            host=host, port=port, region=region,
            zone=inst.get("Placement", {}).get("AvailabilityZone", ""),
            instance_type=inst.get("InstanceType", ""),
            shutdown_behavior=self._shutdown_behavior(region, inst))
        with self._lock:
            broken = instance_id in self._broken_ids or self._pending_broken > 0
            if instance_id not in self._broken_ids and self._pending_broken > 0:
                self._pending_broken -= 1
            self._broken_ids.discard(instance_id)
            blackholed = self._pending_blackholes > 0
            if blackholed:
                self._pending_blackholes -= 1
            vm = FakeVM(self.host, spec, broken=broken, blackholed=blackholed)
            self._machines[instance_id] = _Machine(vm=vm, region=region)
            self._adopted.notify_all()
        log.info("instance %s (%s, %s) boots as a fake VM at %s:%d%s%s", instance_id,
                 spec.instance_type, spec.zone, host, port,
                 " [boot will fail]" if broken else "", " [blackholed]" if blackholed else "")
        with self._lock:
            self._boot_queue.append(vm)
        self._start_boots()

    def _shutdown_behavior(self, region: str, inst: dict[str, Any]) -> str:
        """What a power-off from inside does to ``inst``: ``"terminate"`` or ``"stop"``.

        moto keeps ``InstanceInitiatedShutdownBehavior`` only when the launch call names
        it: it ignores the launch template's (RunInstances from a template, and every
        instance of a CreateFleet, which launches from templates only) and reports its
        default, "stop". EC2 applies the template's value unless the launch call
        overrides it, so a "stop" from moto defers to the template version the instance
        was launched with. (A RunInstances that sets "stop" over a template's
        "terminate" is then read as "terminate": moto cannot tell the two apart.)
        """
        instance_id = inst["InstanceId"]
        answer = self._cloud.client(region).describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")
        reported = answer.get("InstanceInitiatedShutdownBehavior", {}).get("Value")
        if reported == "terminate":
            return reported
        template = self.launch_template_of(region, inst)
        data = self._templates.data(region, template) if template else {}
        return str(data.get("InstanceInitiatedShutdownBehavior") or reported or "stop")

    def launch_template_of(self, region: str, inst: dict[str, Any]
                            ) -> Optional[dict[str, str]]:
        """The launch template version ``inst`` was launched from, or None.

        EC2 (and moto, for RunInstances) tags such an instance with
        ``aws:ec2launchtemplate:id`` and ``:version``; moto leaves CreateFleet's
        instances untagged, but DescribeFleets lists each fleet's instances with the
        template version they came from (read once per batch of new instances).
        """
        tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags", [])}
        if tags.get("aws:ec2launchtemplate:id"):
            return {"LaunchTemplateId": str(tags["aws:ec2launchtemplate:id"]),
                    "Version": str(tags.get("aws:ec2launchtemplate:version") or "$Default")}
        instance_id = inst["InstanceId"]
        with self._lock:
            known = self._fleet_launches.get(instance_id)
        if known is not None:
            return known
        found: dict[str, dict[str, str]] = {}
        pages = self._cloud.client(region).get_paginator("describe_fleets").paginate()
        for page in pages:
            for fleet in page.get("Fleets", []):
                for group in fleet.get("Instances", []):
                    spec = group.get("LaunchTemplateAndOverrides", {}).get(
                        "LaunchTemplateSpecification", {})
                    for launched in group.get("InstanceIds", []):
                        found[launched] = {k: str(v) for k, v in spec.items()}
        with self._lock:
            self._fleet_launches.update(found)
        return found.get(instance_id)

    def _start_boots(self) -> bool:
        """Power on queued machines while fewer than ``max_concurrent_boots`` boot.

        Returns:
            Whether machines are still waiting for their turn.
        """
        with self._lock:
            booting = sum(1 for m in self._machines.values() if m.vm.boot_running)
            chosen: list[FakeVM] = []
            while self._boot_queue and booting + len(chosen) < self.max_concurrent_boots:
                vm = self._boot_queue.popleft()
                if vm.state == "created":  # not terminated while it waited
                    chosen.append(vm)
            waiting = bool(self._boot_queue)
        for vm in chosen:
            try:
                vm.boot()
            except (OSError, FakeVMError) as exc:
                log.error("fake VM %s could not power on: %s", vm.id, exc)
                continue
            # One waiter per running boot script (at most max_concurrent_boots): its end
            # frees a boot slot at once, without polling.
            waiter = threading.Thread(target=self._wait_boot, args=(vm,),
                                      name=f"localcloud-boot-{vm.id}", daemon=True)
            with self._lock:
                self._boot_waiters = [t for t in self._boot_waiters if t.is_alive()]
                self._boot_waiters.append(waiter)
            waiter.start()
        return waiting

    def _wait_boot(self, vm: FakeVM) -> None:
        # Ends when the script ends (or the machine is stopped), or when it has held its
        # boot slot for long enough.
        vm.wait_boot(BOOT_SLOT_SECONDS)
        self._wake.set()

    def _power_off(self, machine: _Machine) -> None:
        """A machine turned itself off: EC2 terminates (or stops) its instance."""
        ec2 = self._cloud.client(machine.region)
        instance_id = machine.vm.id
        log.info("instance %s powered itself off (%s)", instance_id,
                 machine.vm.spec.shutdown_behavior)
        if machine.vm.spec.shutdown_behavior == "terminate":
            ec2.terminate_instances(InstanceIds=[instance_id])
        else:
            ec2.stop_instances(InstanceIds=[instance_id])
        machine.gone = True

    def _reclaim(self, machine: _Machine) -> None:
        """EC2 takes a spot instance back at the end of its interruption notice."""
        log.info("reclaiming spot instance %s", machine.vm.id)
        self._cloud.client(machine.region).terminate_instances(InstanceIds=[machine.vm.id])
        machine.gone = True

    def _stop_machines(self, vms: list[FakeVM]) -> None:
        stop_machines(vms)


    # --- requests from inside machines --------------------------------------------------

    def on_machine_request(self, marker: str, root: str, command: str,
                           args: list[str]) -> str:
        """What a machine's shim asks (``sshd-reload``, ``poweroff``, ...)."""
        with self._lock:
            machine = next((m for m in self._machines.values()
                            if m.vm.marker == marker or (root and str(m.vm.root) == root)),
                           None)
        if machine is None:
            raise FakeVMError(f"no machine {marker or root!r} in this cloud")
        if command == "sshd-reload":
            return machine.vm.reload_sshd()
        if command == "poweroff":
            delay = float(args[0]) if args else 0.0
            with self._lock:
                machine.poweroff_at = time.monotonic() + delay
            self.request_poll()
            return f"powering off in {delay:g}s" if delay else "powering off"
        if command == "cancel-poweroff":
            with self._lock:
                machine.poweroff_at = None
            return "power-off cancelled"
        if command == "reboot":
            raise FakeVMError("a fake VM cannot reboot")
        raise FakeVMError(f"unknown request {command!r}")


    # --- internals -----------------------------------------------------------------------

    @property
    def host(self) -> FakeVMHost:
        """What the machines share (directories, shims, sshd settings)."""
        if self._host is None:
            raise FakeVMError("the local cloud is not started: use it as a context manager")
        return self._host

    def _allocate_address(self) -> tuple[str, int]:
        """A fresh loopback address whose port 22 is free (else a free port on it)."""
        for _ in range(256):
            index = self._next_address
            self._next_address += 1
            host = str(ipaddress.IPv4Address(f"127.{self._net}.0.0") + 256 * (index // 250)
                       + index % 250 + 1)
            if _bindable(host, 22):
                return host, 22
        # Port 22 is not ours to use (not root, or another server owns it everywhere).
        with socket.socket() as s:
            s.bind((host, 0))
            return host, int(s.getsockname()[1])



def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
