"""The ``local`` provider: machines are agent subprocesses on this computer.

Exactly the machinery a cloud fleet uses (handshake, frames, agent, worker processes),
with pipes instead of SSH, so code can be tried before paying and tests need nothing.
Must not import: scheduler, executor.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from typing import Any, Optional

import vmexec
from vmexec.errors import ConfigError
from vmexec.providers.base import MachineRecord, MachineState, Provider
from vmexec.transports.base import Transport
from vmexec.transports.local import LocalTransport

_ids = itertools.count(1)

# Options that describe cloud machines. The local provider accepts and ignores them, so
# that a script written for EC2 runs unchanged with VMEXEC_PROVIDER=local ("try before
# paying"); anything else unknown is still refused, which catches typos.
CLOUD_ONLY_OPTIONS = frozenset({
    "instance_type", "regions", "arm", "spot", "ami", "ssh_cidr", "address_lookup",
    "iam_instance_profile",
    "root_volume_gb", "tags", "name", "packages", "index_url", "find_links",
    "slots_per_machine", "max_hourly_cost", "budget", "environment", "exclude", "env",
    "forward_env",
})
logger = logging.getLogger(__name__)


class LocalProvider(Provider):
    """Agents as subprocesses; ``machines`` of them sharing ``max_workers`` slots.

    Args:
        max_workers: total task slots (``os.cpu_count()`` when None).
        machines: how many agent processes (default 1, holding all slots).
        python: interpreter that runs the agent (default: this one).
    """

    name = "local"
    max_workers: int  # always known here: os.cpu_count() when not given

    def __init__(self, max_workers: Optional[int], *, machines: int = 1,
                 python: Optional[str] = None, **unknown: Any) -> None:
        ignored = sorted(set(unknown) & CLOUD_ONLY_OPTIONS)
        wrong = sorted(set(unknown) - CLOUD_ONLY_OPTIONS)
        if wrong:
            raise ConfigError(
                f"provider 'local' does not take option(s) {', '.join(wrong)}: "
                "it accepts machines= and python="
            )
        if ignored:
            logger.info("provider 'local' runs on this computer and ignores the cloud "
                        "option(s) %s", ", ".join(ignored))
        if not isinstance(machines, int) or isinstance(machines, bool) or machines < 1:
            raise ConfigError(f"machines must be a positive int, got {machines!r}")
        self.max_workers = max_workers or os.cpu_count() or 1
        self.machines = min(machines, self.max_workers)
        self.python = python or sys.executable
        self.slots_per_machine = math.ceil(self.max_workers / self.machines)
        self._records: dict[str, MachineRecord] = {}
        self._transports: dict[str, LocalTransport] = {}
        self._slots_launched = 0

    def launch(self, slots_wanted: int) -> list[MachineRecord]:
        records = []
        while slots_wanted > 0 and self._slots_launched < self.max_workers:
            slots = min(self.slots_per_machine, self.max_workers - self._slots_launched)
            number = next(_ids)
            record = MachineRecord(id=f"local-{os.getpid()}-{number}", label=f"local-{number}",
                                   slots=slots, provider=self.name, arch=os.uname().machine)
            self._records[record.id] = record
            self._slots_launched += slots
            slots_wanted -= slots
            records.append(record)
        return records

    def _agent_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Make `-m vmexec.agent` importable even when vmexec runs from a checkout.
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(vmexec.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def connect(self, record: MachineRecord, timeout: float) -> Transport:
        transport = LocalTransport([self.python, "-m", "vmexec.agent"], label=record.label,
                                   env=self._agent_env(), cwd=os.getcwd())
        self._transports[record.id] = transport
        record.state = MachineState.RUNNING
        return transport

    def describe(self) -> list[MachineRecord]:
        return [r for r in self._records.values() if r.state != MachineState.TERMINATED]

    def terminate(self, records: Optional[list[MachineRecord]] = None) -> None:
        for record in list(records if records is not None else self._records.values()):
            transport = self._transports.pop(record.id, None)
            if transport is not None:
                transport.close()
            if record.state != MachineState.TERMINATED:
                self._slots_launched -= record.slots
            record.state = MachineState.TERMINATED
