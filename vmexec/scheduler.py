"""The dispatcher: queue, in-flight windows, retries, machine lifecycle, scaling demand.

Data flow::

    VMExecutor.submit/map ──▶ pending deque ──(dispatcher thread)──▶ machine.inflight
                                   ▲   │                              │ FUNC/TASK frames
                                   │   └─ launch more machines ◀──────┤ (one writer)
                        re-queue lost tasks                           ▼
                                   │                         transport ──▶ agent
                                   └──── inbox thread ◀── I/O loop ◀──── RESULT/LOST/LOG
                                                      │     (or a transport's own reader)
                                                      └──▶ Future.set_result / set_exception

Threads and why each exists:

* **dispatcher** (one per executor): the only thread that writes to transports, so
  frames never interleave and no per-machine write lock is needed. It batches every
  pending task a machine has room for into one frame, sends heartbeats, marks silent
  machines lost, asks the provider for more machines while demand exceeds capacity, and
  tears everything down at shutdown.
* **inbox** (one per executor): handles what event-driven transports deliver — frames
  from every machine on the shared I/O loop (``transports.aio``), handshakes, lost
  connections — and resolves futures. The loop itself never runs user code (done-
  callbacks) or anything that blocks; this thread does, outside the scheduler lock
  so user done-callbacks cannot deadlock the scheduler. A thousand machines cost this
  one thread, not a thousand readers.
* **reader** (one per machine, blocking transports only: local pipes, paramiko): the
  same work for its one machine.
* **connect**: providers that connect on the I/O loop (``Provider.connects_async``:
  ``ssh``) use no thread at all, and the SSH connect pool bounds how many handshakes
  run at once. Other providers (``local``, ``ec2``, which waits for boot and installs
  the environment) get a thread per booting machine until its agent runs. Either way
  the vmexec handshake itself is a small state machine fed by the stream, so
  machines join as they become ready.

Windows: each machine may hold ``slots + extra`` tasks, where ``extra`` follows
Little's law — enough queued work to keep every slot busy across one round trip
(``slots * rtt / task_time``, doubled for jitter). Long tasks get a window of about
their slot count (good balance across machines); tiny tasks get hundreds (each frame
carries many tasks, so the round trip is paid once per batch, not per task).

Must not import: boto3, paramiko, concrete providers or transports (only their bases).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Optional, cast

from vmexec import protocol
from vmexec.config import SchedulerConfig
from vmexec.errors import (
    BrokenFleet,
    EnvSyncError,
    RemoteTraceback,
    TransportError,
    VersionMismatch,
    VMExecError,
    WorkerLost,
)
from vmexec.guardrails.costs import CostGuard
from vmexec.guardrails.logs import OutputGuard
from vmexec.logs import emit_remote
from vmexec.progress import Progress
from vmexec.protocol import (Heartbeat, Msg, Ping, Release, Result, Shutdown, decode,
                             encode_frame, encode_handshake)
from vmexec.providers.base import MachineRecord, MachineState, Provider
from vmexec.scheduling.handout import Handout
from vmexec.scheduling.items import MapItem, WorkItem
from vmexec.scheduling.machine import Link, Machine, Phase
from vmexec.skew import check_skew
from vmexec.transports import aio
from vmexec.transports.base import Transport

logger = logging.getLogger("vmexec.scheduler")
cost_logger = logging.getLogger("vmexec.cost")

_HANDSHAKE_TIMEOUT = 60.0
# How many consecutive launch/connect failures, with no machine alive, break the fleet.
_MAX_CONSECUTIVE_FAILURES = 3


# How often (seconds) the launch demand, a sum over every machine, is recomputed.
_DEMAND_EVERY = 0.05

# The inbox entry that says "take what the I/O loop delivered" (_post_from_loop).
_TAKE_LOOP_BATCH = ("take the I/O loop's batch",)
# What an idle agent sends every heartbeat_interval, byte for byte (see _post_from_loop).
_HEARTBEAT_FRAME = encode_frame([Heartbeat(Msg.HEARTBEAT)])
# Set on reader threads: they must never write to a transport (see Scheduler.submit).
_on_reader_thread = threading.local()


class Scheduler:
    """Runs work items on the provider's machines. Thread-safe; one per executor."""

    def __init__(self, provider: Provider, config: SchedulerConfig,
                 initializer: Optional[bytes], poweroff: bool = False,
                 cost: Optional[CostGuard] = None) -> None:
        self._provider = provider
        self._config = config
        self._initializer = initializer
        self._poweroff = poweroff
        self.cost = cost
        self._local_info = protocol.local_info()
        # One lock for all scheduler state; held only for bookkeeping, never for I/O.
        self._lock = threading.Lock()
        # Wakes the dispatcher: new work, a window freed, a machine joined or was lost,
        # shutdown. Without it the dispatcher would have to poll.
        self._wake = threading.Condition(self._lock)
        # The queue, and which machine gets what from it (windows, batches, stealing).
        self._handout = Handout()
        self._machines: list[Machine] = []
        self._connecting: dict[str, MachineRecord] = {}
        # Machines being shut down: their capacity returns to the provider soon, so a
        # fleet with none alive is not hopeless while this is non-empty.
        self._closing: set[Machine] = set()
        self._booting_slots = 0
        self._provider_exhausted = False
        self._consecutive_failures = 0
        self._last_failure: Optional[BaseException] = None
        self._shutdown = False
        self._broken: Optional[VMExecError] = None
        self._closed = threading.Event()  # teardown started
        self.torn_down = threading.Event()  # teardown finished: machines are gone
        self._dispatcher: Optional[threading.Thread] = None
        self._launching = False
        self._max_workers = config.max_workers
        self.output_guard = OutputGuard()
        self._records: list[MachineRecord] = []  # every machine ever launched
        self.progress = Progress(config.progress)
        # What event-driven transports deliver, handled in order on the inbox thread:
        # (handler, link, payload). Unbounded on purpose: each machine's in-flight
        # window bounds what can arrive, and blocking the I/O loop would stall every
        # machine at once.
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inbox_thread: Optional[threading.Thread] = None
        # What the I/O loop delivered that the inbox thread has not taken yet (see
        # _post_from_loop); swapped out whole under its lock.
        self._loop_batch: list[Any] = []
        self._loop_batch_lock = threading.Lock()
        # The inbox thread is handling a batch it took (guarded by _loop_batch_lock).
        self._inbox_busy = False
        self._holds_loop = False  # this scheduler keeps the I/O loop running
        self._helpers: set[threading.Thread] = set()
        self._pid = os.getpid()  # the process whose exit tears this fleet down
        self._helpers_lock = threading.Lock()
        # Launch demand is a sum over machines: computed at most every _DEMAND_EVERY.
        self._demand_due = 0.0
        self._steal_armed = False  # the dispatcher sleeps until the next steal check
        self.released_total = 0  # queued tasks machines gave back (work stealing, notices)
        # An idle machine is pinged this often: well within its agent's watchdog and
        # within its dead-man switch's grace, which counts frames *received* from the
        # client (a named fleet's is its keepalive).
        keepalive = cast(Optional[float], config.keepalive)
        self._ping_every = max(config.heartbeat_interval, min(
            config.watchdog_timeout / 6, keepalive / 3 if keepalive else math.inf))
        _live_schedulers.add(self)

    # -- public API (called by the executor) ----------------------------------------
    @property
    def broken(self) -> Optional[VMExecError]:
        return self._broken

    def submit(self, items: list[WorkItem]) -> None:
        """Queue work items (their futures are PENDING until dispatched)."""
        with self._lock:
            if self._broken is not None:
                raise self._broken_error()
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._handout.add(items)
            self.progress.tasks_added(len(items))
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch_loop, name="vmexec-dispatcher", daemon=True)
                self._dispatcher.start()
            # Fast path: when a machine has room, send from this thread instead of
            # waking the dispatcher — one thread hop less on every submit(). Not from a
            # reader thread (a done-callback that submits): a write there can wait for
            # an agent that is itself waiting for this reader to drain its results.
            if getattr(_on_reader_thread, "active", False):
                to_flush = []
            else:
                to_flush = self._take_batches_locked()
            if self._handout.pending:
                self._wake.notify()
        for machine in to_flush:
            self._flush(machine)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel queued work; tear down when idle."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                self._cancel_pending_locked()
            dispatcher = self._dispatcher
            self._wake.notify()
        if dispatcher is None:
            self._teardown()
        elif wait and dispatcher is not threading.current_thread():
            dispatcher.join()

    def _cancel_pending_locked(self) -> None:
        """``shutdown(cancel_futures=True)``: cancel the queued calls, as
        ProcessPoolExecutor does.

        Its first ``max_workers + 1`` calls are already in its call queue (RUNNING)
        even while its processes start; here the same number, less what machines
        hold, stays queued to run. A call taken back from a lost machine is RUNNING
        already and cannot be cancelled: it runs too, or it would never resolve.
        """
        inflight = sum(len(m.inflight) for m in self._machines)
        limit = self._max_workers if self._max_workers is not None else \
            self._capacity_locked()
        self._handout.cancel_pending(keep=max(0, limit + 1 - inflight))

    def machines(self) -> list[Machine]:
        with self._lock:
            return list(self._machines)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._handout.pending) + sum(len(m.inflight) for m in self._machines)

    # -- dispatcher -----------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        next_heartbeat = time.monotonic() + self._config.heartbeat_interval
        try:
            while True:
                with self._lock:
                    while not self._dispatch_needed_locked():
                        now = time.monotonic()
                        delay = next_heartbeat - now
                        armed = False
                        handout = self._handout
                        if handout.pending and not self._launching and \
                                not self._provider_exhausted:
                            delay = min(delay, self._demand_due - now)
                        elif not handout.pending and handout.changed and handout.room:
                            delay = min(delay, handout.steal_due - now)
                            armed = True
                        if delay <= 0:
                            break
                        # Sleeping until the next steal check: results need not wake us.
                        self._steal_armed = armed
                        self._wake.wait(delay)
                        self._steal_armed = False
                    if self._broken is not None:
                        break
                    batches = self._take_batches_locked() + self._steal_locked()
                    launch_slots = self._launch_demand_locked()
                    done = self._shutdown and not self._handout.pending and not any(
                        m.inflight for m in self._machines)
                for machine in batches:
                    self._flush(machine)
                if launch_slots:
                    self._spawn(self._launch, (launch_slots,), "vmexec-launch")
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._heartbeat(now)
                    next_heartbeat = now + self._config.heartbeat_interval
                if done:
                    break
        except BaseException as exc:  # a bug here must fail futures, not hang them
            logger.exception("vmexec dispatcher failed")
            self._break(BrokenFleet(f"the vmexec dispatcher failed: {exc!r}"), exc)
        finally:
            self._teardown()

    def _dispatch_needed_locked(self) -> bool:
        if self._broken is not None:
            return True
        handout = self._handout
        if self._shutdown and not handout.pending and not any(m.inflight for m in self._machines):
            return True
        if not handout.pending:
            # Room freed with nothing queued: a slot idles; maybe steal (rate-limited).
            return handout.changed and bool(handout.room) and \
                time.monotonic() >= handout.steal_due
        if handout.changed and handout.room:
            return True
        return bool(self._launch_demand_locked(peek=True))

    def _room_freed_locked(self, machine: Machine) -> None:
        """``machine``'s window may have room now (results came back, it joined)."""
        # An idle slot at the tail: maybe steal. Rate-limited: a dispatcher already
        # sleeping until the next check is not woken (waking it for every result of a
        # submit() loop cost each round trip a thread switch).
        if self._handout.room_freed(machine) and (
                not self._steal_armed or time.monotonic() >= self._handout.steal_due):
            self._wake.notify()

    def _take_batches_locked(self) -> list[Machine]:
        """Hand queued work out (``Handout.take``); return the machines to flush."""
        return [machine for machine, messages in self._handout.take()
                if self._enqueue_locked(machine, messages)]

    def _steal_locked(self) -> list[Machine]:
        """Ask machines to give queued tasks back (``Handout.steal``); to flush."""
        return [machine for machine in self._handout.steal(self._machines)
                if self._enqueue_locked(machine, [Release(Msg.RELEASE)])]

    def _enqueue_locked(self, machine: Machine, messages: list[Any]) -> bool:
        """Queue messages for ``machine``; True when the caller must ``_flush`` it.

        Any thread may send (the dispatcher, a submitting thread on the fast path, the
        heartbeat). Messages are appended in order under the scheduler lock and exactly
        one thread at a time — the one that found the machine not ``writing`` — writes
        them out, without holding the lock during I/O. Order matters: a FUNC must reach
        the agent before the first TASK that uses it.
        """
        machine.outbox.extend(messages)
        if machine.writing:
            return False  # the thread writing now will pick these up
        machine.writing = True
        return True

    def _flush(self, machine: Machine) -> None:
        while True:
            with self._lock:
                messages = machine.outbox
                if not messages or machine.state not in (Phase.READY, Phase.DRAINING, Phase.RETIRING):
                    machine.outbox = []
                    machine.writing = False
                    return
                machine.outbox = []
            try:
                machine.transport.write(encode_frame(messages))
            except TransportError as exc:
                with self._lock:
                    machine.writing = False
                self._machine_lost(machine, f"sending to it failed: {exc}")
                return
            machine.last_sent = time.monotonic()

    def _heartbeat(self, now: float) -> None:
        if self.cost is not None:
            over = self.cost.over_budget()
            if over is not None:
                self._break(over)
                return
        self._scale_in(now)
        for machine in self.machines():
            if machine.state not in (Phase.READY, Phase.DRAINING):
                continue
            silent = now - machine.last_heard
            if silent > self._config.heartbeat_timeout:
                self._machine_lost(machine, f"no heartbeat for {silent:.0f}s "
                                            f"(heartbeat_timeout={self._config.heartbeat_timeout}s)")
                continue
            # The agent needs a frame well within watchdog_timeout or it stops (and a
            # cloud machine powers off); it sends its own heartbeat every interval, so
            # liveness is seen from here without pinging. A ping only when nothing
            # else went its way for a sixth of the watchdog: an idle fleet of 2000
            # then costs one incoming frame per machine per interval, not three.
            if not machine.inflight and now - machine.last_sent < self._ping_every:
                continue  # busy machines are pinged every interval: their RTT sizes windows
            with self._lock:
                must_flush = self._enqueue_locked(machine, [Ping(Msg.PING, time.monotonic())])
            if must_flush:
                self._flush(machine)

    # -- scaling --------------------------------------------------------------------
    def _scale_in(self, now: float) -> None:
        """Turn off machines idle longer than ``keepalive`` or older than ``max_lifetime``.

        An idle machine still costs money; the fleet grows back when work arrives.
        """
        # Parsed to seconds by SchedulerConfig (which also accepts "20 minutes").
        keepalive = cast(Optional[float], self._config.keepalive)
        lifetime = cast(Optional[float], self._config.max_lifetime)
        retire = []
        with self._lock:
            for machine in self._machines:
                if machine.inflight:
                    machine.idle_since = None
                elif machine.idle_since is None:
                    machine.idle_since = now
                if lifetime is not None and machine.state == Phase.READY and \
                        now - machine.started > lifetime:
                    machine.state = Phase.DRAINING  # no new work; off once it is idle
                    machine.drain_reason = "max_lifetime reached"
                    logger.info("machine %s reached max_lifetime (%.0fs): draining",
                                machine.label, lifetime)
                if machine.inflight:
                    continue
                if machine.state == Phase.DRAINING:
                    retire.append((machine, machine.drain_reason))
                elif (keepalive is not None and not self._handout.pending
                      and machine.idle_since is not None
                      and now - machine.idle_since >= keepalive):
                    retire.append((machine, f"idle for {now - machine.idle_since:.0f}s "
                                            f"(keepalive={keepalive:.0f}s)"))
            flush = []
            for machine, _ in retire:
                # SHUTDOWN goes through the ordinary outbox, so it cannot interleave
                # with a frame another thread is writing; "retiring" still flushes.
                machine.state = Phase.RETIRING
                self._machines.remove(machine)
                self._closing.add(machine)
                flush.append(self._enqueue_locked(machine, [Shutdown(Msg.SHUTDOWN)]))
            if retire and self._provider.can_replace():
                self._provider_exhausted = False
        for (machine, why), must_flush in zip(retire, flush):
            logger.info("turning machine %s off: %s", machine.label, why)
            self._spawn(self._retire, (machine, must_flush), f"vmexec-retire-{machine.label}")

    def _retire(self, machine: Machine, must_flush: bool) -> None:
        if must_flush:
            self._flush(machine)
        else:  # another thread is writing and will send the SHUTDOWN; let it finish
            deadline = time.monotonic() + 5.0
            while machine.writing and time.monotonic() < deadline:
                time.sleep(0.01)
        self._close_machine(machine)
        machine.state = Phase.CLOSED

    def _capacity_locked(self) -> int:
        live = sum(m.slots for m in self._machines if m.state == Phase.READY)
        return live + self._booting_slots

    def _launch_demand_locked(self, peek: bool = False) -> int:
        """Slots to ask the provider for now (0: enough, or nothing more to ask).

        A sum over every machine: computed at most every ``_DEMAND_EVERY`` seconds
        (the dispatcher wakes up for it), not on every pass of a thousand-machine fleet.
        """
        if self._launching or self._provider_exhausted or self._shutdown and not self._handout.pending:
            return 0
        now = time.monotonic()
        if now < self._demand_due:
            return 0
        if not peek:
            self._demand_due = now + _DEMAND_EVERY
        demand = len(self._handout.pending) + sum(len(m.inflight) for m in self._machines)
        if self._max_workers is not None:
            demand = min(demand, self._max_workers)
        missing = demand - self._capacity_locked()
        if missing <= 0:
            return 0
        if not peek:
            self._launching = True
        return missing

    def _launch(self, slots: int) -> None:
        with self._lock:
            if not self._holds_loop:
                # Connections (and handshake timers) live on the I/O loop from now on;
                # the teardown lets go of it once every transport has ended.
                self._holds_loop = True
                aio.hold()
        try:
            records = self._provider.launch(slots)
        except Exception as exc:
            logger.warning("launching machines failed: %s", exc)
            with self._lock:
                self._launching = False
            self._record_failure(exc)
            return
        self._records.extend(records)
        if self.cost is not None:
            for record in records:
                self.cost.started(record)  # billing starts with the launch call
        with self._lock:
            self._launching = False
            if not records:
                self._provider_exhausted = True
            for record in records:
                self._connecting[record.id] = record
                self._booting_slots += max(1, record.slots)
            self._wake.notify()
        self.progress.machines(requested=len(records))
        if not records:
            self._check_starved()
        for record in records:
            if self._provider.connects_async:
                aio.run(self._connect_async(record))
            else:
                self._spawn(self._connect, (record,), f"vmexec-connect-{record.label}")

    def _connect(self, record: MachineRecord) -> None:
        """Thread body for providers whose ``connect`` blocks (boot, install, ...)."""
        transport: Optional[Transport] = None
        try:
            transport = self._provider.connect(record, self._config.boot_timeout)
        except BaseException as exc:  # includes TransportError, bugs
            self._connect_failed(record, transport, exc)
            return
        self._attach(record, transport)

    async def _connect_async(self, record: MachineRecord) -> None:
        """On the I/O loop, for providers that connect there: no thread per machine."""
        try:
            transport = await self._provider.connect_async(record, self._config.boot_timeout)
        except BaseException as exc:
            # Failure handling calls the provider and may block: not on the loop.
            self._post(self._connect_failed_event, record, exc)
            return
        self._attach(record, transport)

    def _spawn(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        """A short-lived helper thread (launch, connect, retire, close) that the
        teardown joins: shutdown(wait=True) leaves no thread of this executor running."""

        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._helpers_lock:
            self._helpers = {t for t in self._helpers if t.is_alive()}
            self._helpers.add(thread)
        thread.start()

    def _post(self, handler: Any, link: Any, payload: Any) -> None:
        """Hand work to the inbox thread (started on first use)."""
        self._inbox_put((handler, link, payload))

    def _inbox_put(self, entry: Any) -> None:
        if self._inbox_thread is None:
            with self._lock:
                if self._inbox_thread is None:
                    self._inbox_thread = threading.Thread(
                        target=self._inbox_loop, name="vmexec-inbox", daemon=True)
                    self._inbox_thread.start()
        self._inbox.put(entry)

    def _post_from_loop(self, handler: Any, link: Any, payload: Any) -> None:
        """``_post`` for callbacks on the I/O loop: one inbox wake-up per batch.

        Heartbeats and results of many machines arrive together; the first one since
        the inbox thread last took the batch wakes it, the rest join that batch. So
        a busy inbox thread takes hundreds of deliveries per wake-up, and an idle one
        is woken at once: no extra loop pass (~50 µs of a task's round trip) to gather
        a batch first.
        """
        if payload == _HEARTBEAT_FRAME and self._heard_on_loop(link):
            return
        with self._loop_batch_lock:
            pending = self._loop_batch
            pending.append((handler, link, payload))
            first = len(pending) == 1
        if first:
            self._inbox_put(_TAKE_LOOP_BATCH)

    def _heard_on_loop(self, link: Link) -> bool:
        """A joined machine's bare heartbeat frame, noted on the loop thread.

        Heartbeats are nearly all an idle fleet sends (2000 machines: 400 a second);
        all one does is prove the machine alive, so it does not wake the inbox thread.
        Only when nothing of this connection waits for the inbox (no batch queued or
        being handled, the link's frame reader at a frame boundary): otherwise these
        bytes might continue an earlier frame, and go the usual way.
        """
        machine = link.machine
        if machine is None:
            return False
        with self._loop_batch_lock:
            if self._loop_batch or self._inbox_busy:
                return False
        if link.reader.pending_bytes():
            return False
        machine.last_heard = time.monotonic()
        return True

    def _take_loop_batch(self) -> list[Any]:
        with self._loop_batch_lock:
            batch, self._loop_batch = self._loop_batch, []
            self._inbox_busy = True
        return batch

    def _loop_batch_done(self) -> None:
        with self._loop_batch_lock:
            self._inbox_busy = bool(self._loop_batch)

    def _inbox_loop(self) -> None:
        _on_reader_thread.active = True
        get = self._inbox.get
        while True:
            entry = get()
            if entry is None:
                return
            from_loop = entry is _TAKE_LOOP_BATCH
            entries = self._take_loop_batch() if from_loop else [entry]
            for handler, link, payload in entries:
                try:
                    handler(link, payload)
                except BaseException as exc:  # a bug here must fail futures, not hang
                    logger.exception("vmexec inbox handler failed")
                    self._break(BrokenFleet(f"the vmexec inbox thread failed: {exc!r}"), exc)
            if from_loop:
                self._loop_batch_done()

    def _connect_failed_event(self, record: MachineRecord, exc: BaseException) -> None:
        self._connect_failed(record, None, exc)

    def _connect_failed(self, record: MachineRecord, transport: Optional[Transport],
                        exc: BaseException) -> None:
        if transport is not None:
            transport.close()
        self._provider.terminate([record])
        if self.cost is not None:
            self.cost.stopped(record)
        with self._lock:
            self._connecting.pop(record.id, None)
            self._booting_slots -= max(1, record.slots)
            self._provider_exhausted = False if self._provider.can_replace() else \
                self._provider_exhausted
        if isinstance(exc, (VersionMismatch, EnvSyncError)):
            self._break(BrokenFleet(f"machine {record.label} refused: {exc}"), exc)
            return
        logger.warning("machine %s could not be used: %s", record.label, exc)
        self._record_failure(exc)

    def _attach(self, record: MachineRecord, transport: Transport) -> None:
        """Start reading ``transport``: the handshake first, bounded by a timer."""
        link = Link(record, transport)
        if transport.shared_thread:
            def on_data(data: bytes) -> None:
                self._post_from_loop(self._link_data, link, data)

            def on_closed(reason: str) -> None:
                self._post_from_loop(self._link_closed, link, reason)
        else:
            def on_data(data: bytes) -> None:
                _on_reader_thread.active = True
                self._link_data(link, data)

            def on_closed(reason: str) -> None:
                self._link_closed(link, reason)
        link.cancel_timer = aio.call_later(_HANDSHAKE_TIMEOUT, self._handshake_expired, link)
        transport.start(on_data, on_closed)

    def _handshake_expired(self, link: Link) -> None:
        # On the I/O loop: only close; the closed callback reports it.
        if not link.done:
            link.expired = True
            link.transport.close()

    def _link_data(self, link: Link, data: bytes) -> None:
        machine = link.machine
        if machine is not None:
            machine.last_heard = time.monotonic()
            for payload in link.reader.feed(data):
                self._handle(machine, decode(payload))
            return
        if link.done:
            return
        try:
            hello = self._handshake_data(link, data)
            if hello is not None:
                self._finish_handshake(link, hello)
        except BaseException as exc:  # includes VersionMismatch, TransportError, bugs
            link.done = True
            if link.cancel_timer is not None:
                link.cancel_timer()
            self._connect_failed(link.record, link.transport, exc)

    def _link_closed(self, link: Link, reason: str) -> None:
        machine = link.machine
        if machine is None:
            if link.done:
                return
            link.done = True
            if link.cancel_timer is not None:
                link.cancel_timer()
            diagnostics = link.transport.diagnostics()
            if link.expired:
                why = (f"{link.record.label}: no vmexec handshake within "
                       f"{_HANDSHAKE_TIMEOUT:.0f}s of connecting. {diagnostics}")
            else:
                why = (f"{link.record.label}: the agent exited before its handshake "
                       f"({reason}). {diagnostics}")
            self._connect_failed(link.record, link.transport, TransportError(why.strip()))
            return
        if machine.state in (Phase.READY, Phase.DRAINING):
            diagnostics = link.transport.diagnostics()
            self._machine_lost(machine, reason + (f" ({diagnostics})" if diagnostics else ""))

    def _handshake_data(self, link: Link, data: bytes) -> Optional[dict[str, Any]]:
        """Feed the agent's first bytes; its hello once complete, else None."""
        record, transport = link.record, link.transport
        need = len(protocol.MAGIC) - len(link.magic)
        if need > 0:
            link.magic += data[:need]
            data = data[need:]
            if not protocol.MAGIC.startswith(link.magic):
                raise TransportError(
                    f"{record.label}: expected the vmexec agent but the machine printed "
                    f"{(link.magic + data)[:200]!r}. A shell startup file that prints text, or "
                    "a missing vmexec install on the machine, causes this. "
                    f"{transport.diagnostics()}")
            if len(link.magic) < len(protocol.MAGIC):
                return None
        frames = link.reader.feed(data)
        if not frames:
            return None
        # The agent says nothing more until it has our hello: no frames left behind.
        hello: dict[str, Any] = protocol.decode_handshake(frames[0])
        return hello

    def _finish_handshake(self, link: Link, hello: dict[str, Any]) -> None:
        """Check the agent's hello, send ours, and hand the machine to the dispatcher."""
        record, transport = link.record, link.transport
        protocol.check_compatible(self._local_info, hello, where=f"machine {record.label}")
        agent_options = self._provider.agent_options(record)
        # The machine's installed environment must be the one this client synced.
        expected = agent_options.get("environment_hash")
        check_skew(str(expected) if expected else None, hello.get("environment_hash"),
                   machine=f"machine {record.label}")
        slots = record.slots or int(hello.get("cpu_count", 1))
        with self._lock:
            if self._max_workers is not None:
                used = sum(m.slots for m in self._machines if m.state == Phase.READY)
                slots = max(1, min(slots, self._max_workers - used))
        hello["slots"] = slots
        transport.write(encode_handshake({
            **self._local_info,
            "slots": slots,
            "initializer": self._initializer,
            "max_tasks_per_child": self._config.max_tasks_per_child,
            "log_level": logging.getLogger().getEffectiveLevel(),
            "heartbeat_interval": self._config.heartbeat_interval,
            "watchdog_timeout": self._config.watchdog_timeout,
            "poweroff": self._poweroff,
            "output_limit": self._config.output_limit,
            **agent_options,
        }))
        link.done = True
        if link.cancel_timer is not None:
            link.cancel_timer()
        with self._lock:
            self._connecting.pop(record.id, None)
            self._booting_slots -= max(1, record.slots)
            machine = self._machines_add_locked(record, transport, hello)
            if machine is not None:
                machine.link = link
                link.machine = machine
                self._room_freed_locked(machine)
            self._consecutive_failures = 0
            self._wake.notify()
        if machine is None:
            return
        group = " ".join(part for part in (record.region, hello.get("arch") or record.arch)
                         if part) if record.region else ""
        self.progress.machines(ready=1, group=group)

    def _machines_add_locked(self, record: MachineRecord, transport: Transport,
                             info: dict[str, Any]) -> Optional[Machine]:
        slots = info["slots"]
        machine = Machine(record, transport, info, slots)
        if self._broken is not None or (self._shutdown and not self._handout.pending):
            machine.state = Phase.CLOSED
            self._spawn(self._close_machine, (machine,), f"vmexec-close-{machine.label}")
            return None
        self._machines.append(machine)
        record.state = MachineState.READY
        logger.info("machine %s ready: %s %s, Python %s, %d slots", record.label,
                    info.get("hostname"), info.get("arch"),
                    ".".join(map(str, info.get("python", ())[:3])), slots)
        return machine

    @property
    def _ever_launched(self) -> bool:
        return bool(self._records)

    def _launched_records(self) -> list[MachineRecord]:
        return list(self._records)

    def _record_failure(self, exc: BaseException) -> None:
        with self._lock:
            self._consecutive_failures += 1
            self._last_failure = exc
        self._check_starved()

    def _check_starved(self) -> None:
        """Break the fleet when work is waiting and no machine can ever take it."""
        with self._lock:
            alive = any(m.state in (Phase.READY, Phase.DRAINING) for m in self._machines)
            waiting = bool(self._handout.pending) or any(m.inflight for m in self._machines)
            hopeless = self._provider_exhausted or \
                self._consecutive_failures >= _MAX_CONSECUTIVE_FAILURES
            if self._closing and self._provider.can_replace():
                hopeless = False
            if alive or self._connecting or self._launching or not waiting or not hopeless:
                if not alive and not self._connecting and not self._launching:
                    self._wake.notify()  # let the dispatcher try another launch
                return
            cause = self._last_failure
        reason = f"no machine can run tasks: {cause}" if cause else \
            "no machine can run tasks: every machine was lost and none can be added"
        self._break(BrokenFleet(reason), cause)

    # -- reading results ------------------------------------------------------------
    def _handle(self, machine: Machine, messages: list[Any]) -> None:
        finished: list[Result] = []
        lost: list[tuple[int, str]] = []
        for message in messages:
            kind = message.kind
            if kind == Msg.RESULT:
                if message.task_id in machine.batches:
                    finished.extend(self._unbatch_result(machine, message))
                else:
                    finished.append(message)
            elif kind == Msg.LOST:
                for task_id in machine.batches.pop(message.task_id, None) or (message.task_id,):
                    lost.append((task_id, message.reason))
            elif kind == Msg.LOG:
                source = message.logger_name if message.stream == "log" else message.stream
                if self.output_guard.admit(machine.label, source, message.text):
                    emit_remote(machine.label, message.worker_pid, message.stream,
                                message.levelno, message.logger_name, message.text)
            elif kind == Msg.PONG:
                machine.rtt = 0.7 * machine.rtt + 0.3 * (time.monotonic() - message.sent_at)
            elif kind == Msg.BROKEN:
                self._break(BrokenFleet(
                    f"a worker on machine {machine.label} failed to start: {message.reason}; "
                    "the executor is not usable any more"),
                    RemoteTraceback(f'\n"""\n{message.traceback}"""'))
                return
            elif kind == Msg.NOTICE:
                self._on_notice(machine, message.text)
            elif kind == Msg.RELEASED:
                self._on_released(machine, message.task_ids)
            elif kind == Msg.REFUSED:
                self._break(BrokenFleet(f"machine {machine.label} refused: {message.reason}"))
                return
        if not finished and not lost:
            return
        with self._lock:
            resolved = []
            for message in finished:
                item = machine.inflight.pop(message.task_id, None)
                if item is not None:
                    machine.digest_uses[item.digest] -= 1
                    resolved.append((item, message))
            failed = []
            for task_id, why in lost:
                item = machine.inflight.pop(task_id, None)
                if item is not None:
                    machine.digest_uses[item.digest] -= 1
                    error = self._requeue_or_fail_locked(item, f"worker on machine "
                                                              f"{machine.label}: {why}")
                    if error is not None:
                        failed.append((item, error))
            if resolved or failed or lost:
                self._room_freed_locked(machine)
            # After shutdown() the dispatcher waits for the last in-flight result to
            # tear the fleet down: wake it, or it sleeps until the next heartbeat.
            if self._handout.pending or self._shutdown:
                self._wake.notify()
        for item, message in resolved:
            self._resolve(machine, item, message)
        for item, error in failed:
            _set_exception(item.future, error)
        errors = sum(1 for _, message in resolved if not message.ok) + len(failed)
        self.progress.tasks_done(len(resolved) + len(failed) - errors, errors)

    def _unbatch_result(self, machine: Machine, message: Result) -> list[Result]:
        """A micro-batch's RESULT as one RESULT per item."""
        item_ids = machine.batches.pop(message.task_id)
        payload = message.payload
        if message.ok:
            try:
                outcomes = pickle.loads(payload)
                new = tuple.__new__  # ~0.15 µs per item against 0.45 calling Result
                return [new(Result, (Msg.RESULT, item_id, item_ok, item_payload, seconds))
                        for item_id, item_ok, item_payload, seconds in outcomes]
            except Exception as exc:  # a corrupt batch fails its items, loudly
                payload = pickle.dumps((RuntimeError(
                    f"the results of a batch of {len(item_ids)} map items could not be "
                    f"read: {exc!r}"), ""))
        # The batch failed as a whole (e.g. the callable could not be unpickled on the
        # machine): every item gets that error.
        return [Result(Msg.RESULT, item_id, False, payload, 0.0) for item_id in item_ids]

    def _on_notice(self, machine: Machine, text: str) -> None:
        """The machine is going away: no new work, and take back what has not started.

        Running tasks continue; if the machine then disappears they are re-queued like
        any lost machine's. Its capacity no longer counts, so demand launches a
        replacement.
        """
        logger.warning("machine %s is going away (%s): moving its queued tasks", machine.label,
                       text)
        with self._lock:
            if machine.state != Phase.READY:
                return
            machine.state = Phase.DRAINING
            machine.record.state = MachineState.DRAINING  # providers stop counting it: a replacement may launch
            machine.drain_reason = f"going away ({text})"
            must_flush = self._enqueue_locked(machine, [Release(Msg.RELEASE)])
            self._wake.notify()
        if must_flush:
            self._flush(machine)

    def _on_released(self, machine: Machine, task_ids: list[int]) -> None:
        with self._lock:
            machine.releasing = False
            self._room_freed_locked(machine)  # ready (stolen from) or not (going away)
            task_ids = [item_id for task_id in task_ids
                        for item_id in machine.batches.pop(task_id, None) or (task_id,)]
            items = [machine.inflight.pop(task_id, None) for task_id in task_ids]
            for item in items:
                if item is not None:
                    machine.digest_uses[item.digest] -= 1
            # Never started: back to the front of the queue, no attempt counted.
            back = [i for i in items if i is not None]
            self._handout.put_back(back)
            self.released_total += len(back)
        if back:
            logger.info("took %d queued task(s) back from machine %s", len(back), machine.label)
        with self._lock:
            self._handout.changed = True
            self._wake.notify()

    def _resolve(self, machine: Machine, item: WorkItem, message: Result) -> None:
        _, _, ok, payload, seconds = message
        if machine.avg_task_seconds is None:
            machine.avg_task_seconds = seconds
        else:
            machine.avg_task_seconds = 0.9 * machine.avg_task_seconds + 0.1 * seconds
        if isinstance(item, MapItem):
            before = item._call.seconds
            item._call.seconds = seconds if before is None else 0.8 * before + 0.2 * seconds
        try:
            value = pickle.loads(payload)
        except BaseException as exc:
            # SystemExit/KeyboardInterrupt from a result's __reduce__ included: escaping,
            # they would end this reader thread and leave every future of the machine
            # pending forever. A BrokenProcessPool, as ProcessPoolExecutor reports it.
            from vmexec.errors import DeserializationError

            error = DeserializationError(
                f"the result of {item.label} from machine {machine.label} could not be "
                f"unpickled on the client: {exc!r}. Is the class it "
                "returns importable here, and does unpickling it succeed?")
            error.__cause__ = exc
            _set_exception(item.future, error)
            return
        if ok:
            try:
                item.future.set_result(value)
            except Exception:  # already failed (fleet broke) or cancelled: first wins
                pass
            return
        error, tb_text = value
        error.__cause__ = RemoteTraceback(
            f'\n"""\nTraceback from machine {machine.label}:\n{tb_text}"""')
        _set_exception(item.future, error)

    def _requeue_or_fail_locked(self, item: WorkItem, why: str) -> Optional[BaseException]:
        item.attempts += 1
        if item.attempts > self._config.max_retries:
            return WorkerLost(
                f"{item.label} was lost {item.attempts} times (max_retries="
                f"{self._config.max_retries}); last: {why}. Check the machine's memory "
                "(the kernel's OOM killer), crashes in native code, or os._exit() in the "
                "task; raise max_retries to try more often.")
        logger.info("re-queueing %s (attempt %d): %s", item.label, item.attempts + 1, why)
        self.progress.task_retried()
        self._handout.put_back([item])
        return None

    # -- machine loss, breaking, teardown -------------------------------------------
    def _machine_lost(self, machine: Machine, reason: str) -> None:
        with self._lock:
            if machine.state not in (Phase.READY, Phase.DRAINING):
                return
            machine.state = Phase.LOST
            machine.record.state = MachineState.LOST
            items = sorted(machine.inflight.values(), key=lambda i: i.task_id, reverse=True)
            machine.inflight.clear()
            machine.batches.clear()
            failed = []
            for item in items:
                error = self._requeue_or_fail_locked(item, f"machine {machine.label} was lost "
                                                           f"({reason})")
                if error is not None:
                    failed.append((item, error))
            self._machines.remove(machine)
            self._closing.add(machine)
            if self._provider.can_replace():
                self._provider_exhausted = False
            self._last_failure = TransportError(f"machine {machine.label} was lost: {reason}")
            self._wake.notify()
        logger.warning("machine %s lost: %s; %d task(s) re-queued", machine.label, reason,
                       len(items) - len(failed))
        for item, error in failed:
            _set_exception(item.future, error)
        self._spawn(self._close_machine, (machine,), f"vmexec-close-{machine.label}")
        self._check_starved()

    def _close_machine(self, machine: Machine) -> None:
        try:
            machine.transport.close()
        finally:
            self._provider.terminate([machine.record])
            if self.cost is not None:
                self.cost.stopped(machine.record)
            # Only now is the machine's capacity free at the provider: ask again.
            with self._lock:
                self._closing.discard(machine)
                if self._provider.can_replace():
                    self._provider_exhausted = False
                self._wake.notify()

    def _broken_error(self) -> VMExecError:
        assert self._broken is not None
        error = type(self._broken)(str(self._broken))
        error.__cause__ = self._broken.__cause__
        return error

    def _break(self, error: VMExecError, cause: Optional[BaseException] = None) -> None:
        """Terminal: fail every queued and running future with ``error``; tear down.

        ``error`` is a ``BrokenFleet``, or a ``BudgetExceeded`` when the budget ran out.
        """
        with self._lock:
            if self._broken is not None:
                return
            if cause is not None:
                error.__cause__ = cause
            self._broken = error
            items = list(self._handout.pending)
            self._handout.pending.clear()
            for machine in self._machines:
                items.extend(machine.inflight.values())
                machine.inflight.clear()
            self._wake.notify()
        logger.error("%s", error)
        for item in items:
            _set_exception(item.future, self._broken_error())

    def _teardown(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            machines = list(self._machines)
            for machine in machines:
                machine.state = Phase.CLOSED
        for machine in machines:
            try:
                machine.transport.write(encode_frame([Shutdown(Msg.SHUTDOWN)]))
            except TransportError:
                pass
        for machine in machines:
            machine.transport.close()
        deadline = time.monotonic() + 10
        for machine in machines:
            machine.transport.join(timeout=max(0.0, deadline - time.monotonic()))
        inbox = self._inbox_thread
        if inbox is not None:
            self._inbox.put(None)  # after every transport's last delivery
            if inbox is not threading.current_thread():
                inbox.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._helpers_lock:
            helpers = list(self._helpers)
        for helper in helpers:
            if helper is not threading.current_thread():
                helper.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._holds_loop:
            self._holds_loop = False
            aio.release()
        self.progress.close()
        dropped = self.output_guard.summary()
        if dropped:
            logger.warning("%s", dropped)
        try:
            self._provider.terminate(None)
        except Exception:
            logger.exception("terminating the fleet failed; run `vmexec cleanup` to remove "
                             "what is left")
        finally:
            if self.cost is not None:
                for record in self._launched_records():
                    self.cost.stopped(record)
                if self._ever_launched:
                    cost_logger.info("%s", self.cost.receipt(self._provider))
            _live_schedulers.discard(self)
            self.torn_down.set()


def _set_exception(future: Future[Any], error: BaseException) -> None:
    try:
        future.set_exception(error)
    except Exception:  # already resolved or cancelled: the first outcome stands
        pass


# Every scheduler still alive, so interpreter exit can finish their work and tear their
# machines down (the executor may have been garbage-collected without shutdown()).
_live_schedulers: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


def _python_exit() -> None:
    # Only the process that made a scheduler shuts it down: a forked child (e.g. a
    # ProcessPoolExecutor's worker exiting) inherits the set but not the fleet.
    for scheduler in list(_live_schedulers):
        if scheduler._pid == os.getpid():
            scheduler.shutdown(wait=True)


try:  # runs before non-daemon threads are joined, as concurrent.futures does
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - Python < 3.9
    import atexit

    atexit.register(_python_exit)
