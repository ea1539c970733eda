"""The scheduler's view of one machine: a connection in its handshake (``Link``), then
a connected machine (``Machine``) with its in-flight window, cached callables and
outgoing messages.

Must not import: boto3, paramiko, concrete providers or transports (only their bases).
"""

from __future__ import annotations

import collections
import enum
import math
import time
from typing import Any, Optional

from vmexec.protocol import FrameReader
from vmexec.providers.base import MachineRecord
from vmexec.scheduling.items import WorkItem
from vmexec.transports.base import Transport

class Phase(str, enum.Enum):
    """Where a connected machine is, as the scheduler sees it.

    ``READY`` takes work; ``DRAINING`` takes none and is turned off once idle (going
    away, or past ``max_lifetime``); ``RETIRING`` is being shut down; ``CLOSED`` is
    gone; ``LOST`` stopped answering or its connection broke (its tasks re-queued).
    The provider's ``MachineRecord.state`` follows (``providers.base.MachineState``).
    """

    READY = "ready"
    DRAINING = "draining"
    RETIRING = "retiring"
    CLOSED = "closed"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


# A machine's window beyond its slots never exceeds this many items.
_MAX_EXTRA_WINDOW = 4096


class Machine:
    """The scheduler's view of one connected machine."""

    def __init__(self, record: MachineRecord, transport: Transport, info: dict[str, Any],
                 slots: int) -> None:
        self.record = record
        self.transport = transport
        self.info = info
        self.slots = slots
        self.label = record.label
        self.inflight: dict[int, WorkItem] = {}
        # Callables the agent holds (in the order they were sent), and how many tasks
        # in flight use each: only an unused one may be forgotten.
        self.digests: dict[bytes, None] = {}
        self.digest_uses: collections.Counter[bytes] = collections.Counter()
        self.state = Phase.READY  # READY -> [DRAINING ->] RETIRING -> CLOSED, or -> LOST
        self.last_heard = self.started = self.last_sent = time.monotonic()
        self.idle_since: Optional[float] = self.started
        self.drain_reason = ""
        self.rtt = 0.001
        self.avg_task_seconds: Optional[float] = None
        self.link: Optional[Link] = None
        # Messages waiting to be written, and whether a thread is writing them now
        # (both guarded by the scheduler lock; see Scheduler._enqueue_locked).
        self.outbox: list[Any] = []
        self.writing = False
        # Micro-batches in flight: the batch's task id (its first item's) -> item ids.
        self.batches: dict[int, list[int]] = {}
        self.releasing = False  # a RELEASE was sent and its RELEASED not yet received

    def window(self, batch: int = 1) -> int:
        """Items this machine may hold: every slot busy, plus what covers a round trip.

        ``batch``: the micro-batch size of the work being handed out; each slot then
        needs one batch running and one queued behind it, or it idles for a round
        trip between batches.
        """
        if self.avg_task_seconds is None:
            return self.slots + 2  # until the first results tell us the task length
        extra = 2 * self.slots * self.rtt / max(self.avg_task_seconds, 1e-6)
        if batch > 1:
            return 2 * self.slots * batch + min(_MAX_EXTRA_WINDOW, math.ceil(extra))
        return self.slots + max(1, min(_MAX_EXTRA_WINDOW, math.ceil(extra)))

    def __repr__(self) -> str:
        return f"<Machine {self.label} {self.state} slots={self.slots} inflight={len(self.inflight)}>"


class Link:
    """One connection from its first byte: the vmexec handshake, then the machine's frames.

    A state machine fed by whichever thread the transport delivers on, so that
    connecting needs no thread of its own: ``magic`` collects the agent's first
    bytes, ``reader`` its frames; ``machine`` is set once the handshake is done.
    """

    __slots__ = ("record", "transport", "magic", "reader", "machine", "done", "expired",
                 "cancel_timer")

    def __init__(self, record: MachineRecord, transport: Transport) -> None:
        self.record = record
        self.transport = transport
        self.magic = b""
        self.reader = FrameReader()
        self.machine: Optional[Machine] = None
        self.done = False  # handshake finished or failed: no second outcome
        self.expired = False
        self.cancel_timer: Optional[Any] = None
