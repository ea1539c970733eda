"""The provider interface: how machines are made, reached and destroyed.

A provider knows nothing of tasks. The scheduler asks it for more slots
(``launch``), for a byte stream to each machine's agent (``connect``), and to destroy
machines (``terminate``). ``describe`` lists what exists now and ``sweep`` removes
leftovers of earlier runs.

Machine states (``MachineState``; ``MachineRecord.state``)::

    pending -> running -> ready -> draining -> lost | terminated
       |          |         `----------------> lost | terminated
       `----------`--------------------------> terminated

* ``pending``: launched (or handed back for reconnection); the machine may be booting.
* ``running``: the provider saw it run and is connecting (``connect``).
* ``ready``: its agent answered the handshake; the scheduler sends it tasks.
* ``draining``: written by the scheduler when the machine will go soon (a spot
  interruption notice): it takes no new tasks and finishes what it has. A provider no
  longer counts its slots, so a replacement may be launched at once (EC2 reads it).
* ``lost``: written by the scheduler when the connection broke; the provider may keep
  it for reconnection (EC2, after this computer changed networks) or terminate it.
* ``terminated``: gone (or forgotten); ``describe`` leaves it out.

The cost guard (``vmexec.guardrails.costs``) asks a provider for what its machines cost
through the hooks below (``cost_plan``, ``leftovers``, ``teardown_report``); the
defaults mean "machines that cost vmexec nothing, no plan, nothing left behind".

Must not import: scheduler, executor, transports other than ``transports.base``
(concrete providers import the transport they use).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import TYPE_CHECKING, Optional, Sequence

from vmexec.transports.base import Transport

if TYPE_CHECKING:  # the types the cost guard's hooks exchange (guardrails sit below)
    from vmexec.guardrails.budget import CostPlan, Leftover, TeardownReport


class MachineState(str, enum.Enum):
    """Where a machine is in its life (see the module docstring for who writes which).

    A ``str`` enum: ``MachineState.READY == "ready"``, so code and tests that compare
    with the plain strings keep working.
    """

    PENDING = "pending"
    RUNNING = "running"
    READY = "ready"
    DRAINING = "draining"
    LOST = "lost"
    TERMINATED = "terminated"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class MachineRecord:
    """One machine as the provider sees it. ``slots`` is the planned task slots."""

    id: str
    label: str
    slots: int
    provider: str
    state: MachineState = MachineState.PENDING  # see the module docstring
    region: Optional[str] = None
    zone: Optional[str] = None
    instance_type: Optional[str] = None
    arch: Optional[str] = None
    spot: bool = False
    address: Optional[str] = None


class Provider(abc.ABC):
    """Base class of the ``local``, ``ssh`` and ``ec2`` providers."""

    #: Registry name.
    name: str = "?"
    #: Whether the agent's watchdog should power the machine off (cloud machines only).
    poweroff_on_watchdog: bool = False

    @abc.abstractmethod
    def launch(self, slots_wanted: int) -> list[MachineRecord]:
        """Start machines that add about ``slots_wanted`` slots; may return fewer or none.

        Returns quickly with the records of what was started: the machines may still be
        booting. Returning an empty list means the provider can add nothing more now.
        """

    @abc.abstractmethod
    def connect(self, record: MachineRecord, timeout: float) -> Transport:
        """Open a byte stream to a freshly started agent on ``record``'s machine.

        Blocks while the machine boots, up to ``timeout`` seconds.

        Raises:
            TransportError: the machine could not be reached in time (with the reason).
        """

    #: Task slots at full scale, as the user asked or the provider decided (the
    #: executor's ``max_workers``); None: decided by the machines (e.g. SSH hosts' CPUs).
    max_workers: Optional[int] = None

    #: True when ``connect_async`` is implemented: the scheduler then connects on the
    #: shared I/O loop with no thread per booting machine (see ``transports.aio``).
    connects_async: bool = False

    async def connect_async(self, record: MachineRecord, timeout: float) -> Transport:
        """``connect`` as a coroutine on the I/O loop; only when ``connects_async``.

        Must not block the loop: every other machine's bytes flow through it.
        """
        raise NotImplementedError(f"provider {self.name!r} connects with connect()")

    def describe(self) -> list[MachineRecord]:
        """The machines this provider started and has not terminated."""
        return []

    @abc.abstractmethod
    def terminate(self, records: Optional[list[MachineRecord]] = None) -> None:
        """Destroy ``records`` (all machines and resources of this fleet when None)."""

    def sweep(self) -> list[str]:
        """Remove resources left by earlier runs; returns what was removed."""
        return []

    def agent_options(self, record: MachineRecord) -> dict[str, object]:
        """Extra handshake settings for the agent on ``record``'s machine.

        Known keys: ``notice_file`` (a path the agent watches for an interruption
        notice), ``poweroff`` (the argv that powers the machine off when the client is
        gone; defaults to ``shutdown -h now`` when ``poweroff_on_watchdog`` is set).
        """
        return {}

    def can_replace(self) -> bool:
        """Whether a lost machine can be replaced by launching another."""
        return True

    # -- what the cost guard asks (vmexec.guardrails.costs) --------------------------------
    def cost_plan(self) -> Optional[CostPlan]:
        """The full-scale plan, its prices and storage, before anything is launched.

        None (the default): the machines cost vmexec's estimate nothing (this computer,
        static hosts): there is nothing to price, and ``max_hourly_cost``/``budget``
        are trivially met.
        """
        return None

    def leftovers(self) -> Sequence[Leftover]:
        """Resources of earlier runs still alive where this fleet runs (not this fleet's).

        Called once at start-up for a warning; the default finds nothing.

        Raises:
            VMExecError: the query failed (the guard reports that as a line, not an error).
        """
        return ()

    def teardown_report(self) -> Optional[TeardownReport]:
        """What ``terminate(None)`` deleted, left, or kept warm; None before it ran or for
        a provider that deletes nothing (the receipt then names no resources)."""
        return None
