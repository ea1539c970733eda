"""The provider interface: how machines are made, reached and destroyed.

A provider knows nothing of tasks. The scheduler asks it for more slots
(``launch``), for a byte stream to each machine's agent (``connect``), and to destroy
machines (``terminate``). ``describe`` lists what exists now and ``sweep`` removes
leftovers of earlier runs.

Must not import: scheduler, executor, transports other than ``transports.base``
(concrete providers import the transport they use).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional

from vmexec.transports.base import Transport


@dataclasses.dataclass
class MachineRecord:
    """One machine as the provider sees it. ``slots`` is the planned task slots."""

    id: str
    label: str
    slots: int
    provider: str
    state: str = "pending"  # pending -> running -> ready -> lost | terminated
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
