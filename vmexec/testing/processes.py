"""Finding and stopping the processes of fake VMs.

Every process of a machine is found — descendants of what the harness started, and
every process carrying the machine's ``VMEXEC_FAKEVM`` marker in its environment, which
catches daemonised ones — and stopped: SIGTERM, then SIGKILL after a grace period.

Must not import: boto3, moto, paramiko, or vmexec's core (standard library and psutil
only).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Iterable

import psutil

from vmexec.testing.vmhost import MARKER_ENV

if TYPE_CHECKING:
    from vmexec.testing.fakevm import FakeVM

__all__ = ["find_processes", "stop_machines", "stop_processes", "signal_all"]

log = logging.getLogger(__name__)


def find_processes(markers: set[str],
                   started: Iterable[tuple[str, psutil.Process]] = ()
                   ) -> dict[str, list[psutil.Process]]:
    """Live processes by marker.

    Two sources: every process whose environment carries one of ``markers`` in
    ``VMEXEC_FAKEVM`` (one scan of the process table; catches daemonised processes), and
    ``started`` — ``(marker, process)`` pairs the harness knows, with all their
    descendants. The second matters because sshd rewrites its own environment block
    (setproctitle), so no sshd process can be found by its environment.
    """
    found: dict[str, dict[int, psutil.Process]] = {m: {} for m in markers}
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            marker = proc.environ().get(MARKER_ENV)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
        if marker in found:
            found[marker][proc.pid] = proc
    for marker, parent in started:
        if marker not in found:
            continue
        try:
            if not parent.is_running():
                continue
            family = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            found[marker].setdefault(proc.pid, proc)
    return {m: list(procs.values()) for m, procs in found.items()}


def stop_machines(vms: Iterable["FakeVM"]) -> None:
    """Stop many machines at once, with one scan of the process table for all of them."""
    grace = 0.0
    started: list[tuple[str, psutil.Process]] = []
    stopping = []
    for vm in vms:
        begun = vm.begin_stop()
        if begun is not None:
            stopping.append(vm)
            grace = max(grace, begun[0])
            started += [(vm.marker, p) for p in begun[1]]
    if not stopping:
        return
    groups = find_processes({vm.marker for vm in stopping}, started)
    stop_processes([p for procs in groups.values() for p in procs], grace)
    for vm in stopping:
        vm.reap()
        vm.state = "stopped"
        vm.stopped.set()
        log.debug("fake VM %s stopped", vm.id)


def signal_all(procs: Iterable[psutil.Process], sig: int) -> int:
    count = 0
    for proc in procs:
        try:
            proc.send_signal(sig)
            count += 1
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied as exc:
            log.warning("cannot signal %s: %s", proc.pid, exc)
    return count


def stop_processes(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``procs`` (continuing frozen ones), SIGKILL those alive after ``grace``."""
    if grace > 0:
        signal_all(procs, signal.SIGTERM)
        signal_all(procs, signal.SIGCONT)
        procs = _wait_dead(procs, grace)
    signal_all(procs, signal.SIGKILL)
    left = _wait_dead(procs, 5.0)
    if left:
        log.warning("processes that survived SIGKILL: %s", [p.pid for p in left])


def _wait_dead(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until ``procs`` are gone or zombies; return those still alive at the deadline.

    A zombie counts as dead: orphans are reaped by init on its own schedule (slowly on
    some containers' init), and a zombie holds no socket, port or file.
    """
    deadline = time.monotonic() + timeout
    alive = procs
    while True:
        alive = [p for p in alive if _running(p)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return alive
        # Reaps our own children at once; for others this is a bounded poll, as Linux
        # offers no portable wait on a process that is not our child.
        psutil.wait_procs(alive, timeout=min(0.05, left))


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

