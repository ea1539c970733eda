"""Which queued work goes to which machine: windows, micro-batches, work stealing.

``Handout`` owns the queue of pending work items and the set of machines that may take
more. Each dispatcher pass (and each ``submit``, on its fast path) calls ``take``,
which fills idle slots first (a micro-batch each, so work spreads over machines) and
then tops windows up with fair shares; ``steal`` picks the machines that should give
queued tasks back at the tail of the work. Its cost per pass follows the work handed
out, not the size of the fleet: machines without room leave the sets, machines get
back in when results free room (``room_freed``).

Pure bookkeeping: every method runs under the scheduler's lock, and sends nothing —
the scheduler queues the returned messages on each machine and writes them out.

Must not import: boto3, paramiko, concrete providers or transports (only their bases).
"""

from __future__ import annotations

import collections
import math
import pickle
import time
from typing import Any, Deque

from vmexec import protocol
from vmexec.protocol import Forget, Func, Msg, Task
from vmexec.scheduling.items import MapItem, WorkItem
from vmexec.scheduling.machine import Machine, Phase

# Callables cached per machine before the least recently sent unused ones are dropped:
# submit(partial(f, big_array)) in a loop must not keep every array alive on the machine.
_MAX_CACHED_CALLABLES = 256
# Micro-batching of map items (chunksize=1): a batch takes about this long to run, so
# per-task overhead (a message, a result, a frame share) is paid per batch, while
# batches stay short enough to balance load and keep results flowing.
# 50 ms: at 2000 machines with 1 ms tasks, 20 ms batches (20 items each) left the client
# CPU-bound at ~35k tasks/s, 50 ms ones (50 items) reach ~60k/s; a result waits at most
# that long for its batch-mates, and the last batch of a map ends at most that late.
_BATCH_SECONDS = 0.05
_MAX_BATCH = 512
BATCH = 2  # TASK's ``chunked`` value for a micro-batch (vmexec.agent.worker.BATCH)
# Work stealing: when the queue is empty and a slot is idle, machines holding queued,
# unstarted tasks that each take at least this long give them back (RELEASE), so a
# slow machine in a mixed fleet does not become the tail. Checked at most this often.
_STEAL_MIN_SECONDS = 0.05
_STEAL_EVERY = 0.2


class Handout:
    """The pending queue and the machines with room; see the module docstring."""

    def __init__(self) -> None:
        self.pending: Deque[WorkItem] = collections.deque()
        # Ready machines that may have room in their window, oldest first. Filled when
        # a machine joins or results free room, emptied lazily by the passes that find
        # a machine full: a pass costs what it hands out, not the size of the fleet.
        self.room: dict[Machine, None] = {}
        # The subset of ``room`` with an idle slot (fewer items in flight than slots):
        # the first loop of a pass walks only these, so a pass costs what it hands out,
        # not the size of a fleet whose windows are mostly busy.
        self.free: dict[Machine, None] = {}
        # Something happened that a pass may act on (work queued, room freed, a
        # machine joined); cleared by each pass. Keeps the dispatcher from re-scanning
        # a thousand machines after every frame.
        self.changed = False
        self.steal_due = 0.0  # the next work-stealing check, time.monotonic()

    def add(self, items: list[WorkItem]) -> None:
        """Queue new work at the back."""
        self.pending.extend(items)
        self.changed = True

    def put_back(self, items: list[WorkItem]) -> None:
        """Queue work again at the front, in order (lost or released by a machine)."""
        for item in reversed(items):
            self.pending.appendleft(item)
        self.changed = True

    def room_freed(self, machine: Machine) -> bool:
        """``machine``'s window may have room now (results came back, it joined).

        True when nothing is queued: a slot idles at the tail, and a steal check may
        be worth waking the dispatcher for.
        """
        if machine.state != Phase.READY:
            return False
        self.room[machine] = None
        if len(machine.inflight) < machine.slots:
            self.free[machine] = None
        self.changed = True
        return not self.pending

    def cancel_pending(self, keep: int) -> None:
        """``shutdown(cancel_futures=True)``: cancel what is queued but the first
        ``keep`` calls (and calls already RUNNING, taken back from a lost machine:
        they cannot be cancelled, so they run)."""
        kept: Deque[WorkItem] = collections.deque()
        for item in self.pending:
            if item.started:
                kept.append(item)
            elif len(kept) < keep and item.future.set_running_or_notify_cancel():
                item.started = True
                kept.append(item)
            else:
                item.future.cancel()
        self.pending = kept
        self.changed = True

    def take(self) -> list[tuple[Machine, list[Any]]]:
        """Move pending items into machine windows; return each machine's messages.

        Runs on every submit (fast path) and dispatcher pass: its cost per item is the
        client's cost per task. Each machine's window is computed once per pass, and
        work is handed out in shares of at least one micro-batch, so a burst of tiny
        map items becomes a few large TASK messages rather than one per machine.
        """
        pending = self.pending
        self.changed = False
        room, free_set = self.room, self.free
        if not pending or not room:
            return []
        assigned: dict[Machine, list[WorkItem]] = {}

        def give(machine: Machine, count: int) -> None:
            items = assigned.get(machine)
            if items is None:
                items = assigned[machine] = []
            inflight = machine.inflight
            while count > 0 and pending:
                item = pending.popleft()
                # PENDING -> RUNNING; False means the user cancelled it while queued.
                # A re-queued or released item is RUNNING already.
                if not item.started:
                    if not item.future.set_running_or_notify_cancel():
                        continue
                    item.started = True
                inflight[item.task_id] = item
                items.append(item)
                count -= 1
            if len(inflight) >= machine.slots:
                free_set.pop(machine, None)

        # First fill free slots everywhere, a micro-batch each, so work spreads over
        # machines ...
        head = pending[0]
        per_slot = self.batch_size(head) if head.batchable else 1
        # Each turn either fills a machine's idle slots (it leaves ``free``) or empties
        # the queue: no copy of the set, no pass over machines that get nothing.
        while pending and free_set:
            machine = next(iter(free_set))
            free = machine.slots - len(machine.inflight)
            if machine.state != Phase.READY or free <= 0:
                del free_set[machine]
                continue
            give(machine, free * per_slot)
        # ... then top up windows with fair shares of what is left, each share at
        # least one micro-batch. Not while the next item is from a map whose run time
        # is still unknown: its first calls (one per free slot) are probes, and the
        # rest waits a round trip to travel in batches. Machines are visited oldest
        # first; one that is full leaves ``room``, one that got work goes to the back.
        while pending and room:
            head = pending[0]
            if isinstance(head, MapItem) and head._call.seconds is None:
                break
            least = self.batch_size(head) if head.batchable else 1
            share = max(least, math.ceil(len(pending) / len(room)))
            for machine in list(room):
                if machine.state != Phase.READY:
                    del room[machine]
                    continue
                free = machine.window(least) - len(machine.inflight)
                if free > 0:
                    give(machine, min(share, free))
                del room[machine]
                if len(machine.inflight) < machine.window(least):
                    room[machine] = None  # still room: to the back of the line
                if not pending:
                    break
        out = []
        for machine, items in assigned.items():
            if not items:
                continue
            messages: list[Any] = []
            digests, uses = machine.digests, machine.digest_uses
            batch: list[WorkItem] = []
            batch_limit = 1
            for item in items:
                digest = item.digest
                if digest not in digests:
                    messages.append(Func(Msg.FUNC, digest, item.fn_bytes))
                    digests[digest] = None
                uses[digest] += 1
                if item.batchable:
                    if batch and (batch[0].digest != digest or len(batch) >= batch_limit):
                        messages.append(self.task_message(machine, batch))
                        batch = []
                    if not batch:
                        batch_limit = self.batch_size(item)
                    batch.append(item)
                    continue
                if batch:
                    messages.append(self.task_message(machine, batch))
                    batch = []
                messages.append(Task(Msg.TASK, item.task_id, digest, item.call_bytes,
                                 item.chunked))
            if batch:
                messages.append(self.task_message(machine, batch))
            messages.extend(self.forget_unused(machine))
            out.append((machine, messages))
        return out

    def steal(self, machines: list[Machine]) -> list[Machine]:
        """At the tail of the work, take queued tasks back from machines that hold them.

        A task waiting in a busy machine's window while another machine has an idle
        slot costs that task's whole run time at the end of a job. When the queue is
        empty and a slot idles, every machine holding more tasks than slots, of a
        measured length worth it, is sent RELEASE: its agent returns the tasks no
        worker has started (RELEASED), and they are dispatched again like new ones,
        to whichever machines have room. Returns the machines to send RELEASE to.
        """
        now = time.monotonic()
        if self.pending or now < self.steal_due or not self.room:
            return []
        self.steal_due = now + _STEAL_EVERY
        if not any(m.state == Phase.READY and len(m.inflight) < m.slots for m in self.free):
            return []
        release = []
        for machine in machines:
            if machine.state != Phase.READY or machine.releasing or \
                    len(machine.inflight) <= machine.slots or \
                    self.queued_seconds(machine) < _STEAL_MIN_SECONDS:
                continue
            machine.releasing = True
            release.append(machine)
        return release

    @staticmethod
    def queued_seconds(machine: Machine) -> float:
        """How long one of the tasks queued last on ``machine`` is expected to take.

        A map's own measurement when the last item handed out belongs to one (the
        machine's average mixes in earlier work: after an hour of 1 s tasks, a map of
        1 ms tasks must not be stolen back and forth), else the machine's average.
        """
        if machine.inflight:
            last = next(reversed(machine.inflight.values()))
            if isinstance(last, MapItem) and last._call.seconds is not None:
                return last._call.seconds
        return machine.avg_task_seconds or 0.0

    def batch_size(self, item: WorkItem) -> int:
        """Map items per micro-batch: about ``_BATCH_SECONDS`` of measured work.

        1 until the map's first results tell its run time. The batch's own length
        bounds what batching can cost: the last batch of a map ends at most that much
        after the others, and a result waits at most that long for its batch-mates.
        """
        seconds = item._call.seconds if isinstance(item, MapItem) else None
        if seconds is None:
            return 1
        return max(1, min(_MAX_BATCH, int(_BATCH_SECONDS / max(seconds, 1e-7))))

    def task_message(self, machine: Machine, batch: list[WorkItem]) -> tuple[Any, ...]:
        """The TASK message for one map item, or for a micro-batch of them."""
        first = batch[0]
        if len(batch) == 1:
            return Task(Msg.TASK, first.task_id, first.digest, first.call_bytes, first.chunked)
        machine.batches[first.task_id] = [item.task_id for item in batch]
        calls = pickle.dumps([(item.task_id, item.call_bytes) for item in batch],
                             protocol.PICKLE_PROTOCOL)
        return Task(Msg.TASK, first.task_id, first.digest, calls, BATCH)

    def forget_unused(self, machine: Machine) -> list[Any]:
        """FORGET messages for the oldest cached callables no in-flight task uses."""
        excess = len(machine.digests) - _MAX_CACHED_CALLABLES
        if excess <= 0:
            return []
        forget = [d for d in machine.digests if not machine.digest_uses[d]][:excess]
        for digest in forget:
            del machine.digests[digest]
            machine.digest_uses.pop(digest, None)
        return [Forget(Msg.FORGET, digest) for digest in forget]

    def left_machine(self, machine: Machine, item: WorkItem) -> None:
        """Bookkeeping when ``item`` is no longer in flight on ``machine``."""
        machine.digest_uses[item.digest] -= 1
