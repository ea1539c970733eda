"""What the scheduler queues: work items, and ``map`` items that are their own futures.

A ``WorkItem`` carries one call (``submit``) or one chunk of calls (``map`` with
``chunksize > 1``) and the ``Future`` the caller holds. A ``map(chunksize=1)`` item is
a ``MapItem``: its own future (see ``MapCall`` for why), which may travel in a
micro-batch with its neighbours.

Must not import: boto3, paramiko, providers or transports.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any, Optional

_task_ids = itertools.count(1)


class WorkItem:
    """One unit of work: a call, or a chunk of calls from ``map(chunksize>1)``."""

    __slots__ = ("task_id", "future", "digest", "fn_bytes", "call_bytes", "chunked",
                 "attempts", "label", "started", "batchable")

    def __init__(self, future: Future[Any], digest: bytes, fn_bytes: bytes, call_bytes: bytes,
                 chunked: bool, label: str, batchable: bool = False) -> None:
        self.task_id = next(_task_ids)
        self.future = future
        self.digest = digest
        self.fn_bytes = fn_bytes
        self.call_bytes = call_bytes
        self.chunked = chunked
        self.attempts = 0
        self.label = label
        self.started = False  # the future was moved to RUNNING (first dispatch)
        # May travel in a micro-batch with its neighbours (map items, chunksize=1):
        # invisible to the caller, each keeps its own future, result and exception.
        self.batchable = batchable


_PENDING, _RUNNING, _CANCELLED, _CANCELLED_NOTIFIED, _FINISHED = range(5)


class MapCall:
    """What the items of one ``map(chunksize=1)`` call share: one condition.

    A ``concurrent.futures.Future`` per item costs a Condition, a deque and a list
    — five objects the garbage collector walks, ~6 µs per item at 100k items, more
    than all the rest of the client's work. A map item is its own future instead
    (``MapItem``), one object, and the items of one call wait on this one condition.
    """

    __slots__ = ("cond", "seconds")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        # Measured run time of one call of this map (None until the first results):
        # sizes its micro-batches. Per call, not per function: the same function
        # mapped over other inputs may take another time.
        self.seconds: Optional[float] = None


class MapItem(WorkItem):
    """A ``map`` item that is its own future: the subset of ``Future`` that the
    scheduler and ``map``'s iterator use, with the same states and the same errors
    (``CancelledError``, ``TimeoutError``, ``InvalidStateError``). Never handed to
    the user: ``map`` yields values.
    """

    __slots__ = ("_state", "_value", "_error", "_call", "_waiters")

    def __init__(self, call: MapCall, digest: bytes, fn_bytes: bytes, call_bytes: bytes,
                 label: str) -> None:
        super().__init__(self, digest, fn_bytes, call_bytes, False, label,  # type: ignore[arg-type]
                         batchable=True)
        self._call = call
        self._state = _PENDING
        self._value: Any = None
        self._error: Optional[BaseException] = None
        # Threads waiting in result() for this item. Items finish in any order across a
        # fleet while map's iterator waits for the next one in order: only the item it
        # waits for wakes it (a notify per finished item meant a wake-up per result).
        self._waiters = 0

    def set_running_or_notify_cancel(self) -> bool:
        with self._call.cond:
            if self._state == _CANCELLED:
                self._state = _CANCELLED_NOTIFIED
                return False
            if self._state != _PENDING:
                raise InvalidStateError(f"map item {self.task_id} is not pending")
            self._state = _RUNNING
            return True

    def _finish(self, value: Any, error: Optional[BaseException]) -> None:
        cond = self._call.cond
        with cond:
            if self._state in (_CANCELLED, _CANCELLED_NOTIFIED, _FINISHED):
                raise InvalidStateError(f"map item {self.task_id} is already done")
            self._value, self._error, self._state = value, error, _FINISHED
            if self._waiters:
                cond.notify_all()

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def cancel(self) -> bool:
        if self._state == _FINISHED:  # terminal: no lock needed to see it
            return False
        with self._call.cond:
            if self._state in (_RUNNING, _FINISHED):
                return False
            if self._state == _PENDING:
                self._state = _CANCELLED
                if self._waiters:
                    self._call.cond.notify_all()
            return True

    def done(self) -> bool:
        return self._state in (_CANCELLED, _CANCELLED_NOTIFIED, _FINISHED)

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._state == _FINISHED and self._error is None:
            # Terminal, and written before the state under the lock: no lock needed.
            value, self._value = self._value, None
            return value
        cond = self._call.cond
        with cond:
            if self._state != _FINISHED:
                if self._state in (_CANCELLED, _CANCELLED_NOTIFIED):
                    raise CancelledError()
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._state not in (_FINISHED, _CANCELLED, _CANCELLED_NOTIFIED):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise FuturesTimeoutError()
                    self._waiters += 1
                    try:
                        cond.wait(remaining)
                    finally:
                        self._waiters -= 1
                if self._state != _FINISHED:
                    raise CancelledError()
            error = self._error
        if error is not None:
            try:
                raise error
            finally:
                error = None  # no reference cycle through the traceback
        value, self._value = self._value, None  # the caller holds it now, not us
        return value
