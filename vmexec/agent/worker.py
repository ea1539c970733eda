"""One worker process: runs tasks one at a time, as a ProcessPoolExecutor worker does.

The agent forks this process (or starts it fresh where fork is unavailable) with
three pipes: tasks in, results out, and the user's stdout/stderr (fd 1 and 2) which
the agent forwards as log text. ``logging`` records go through the results pipe as
LOG messages so they keep their level and logger name.

Code that came by value binds to one namespace per client module in this process
(``vmexec.agent.namespaces``, reached through the pickles themselves), so the initializer
and the tasks share module state.

A task whose function or arguments cannot be unpickled here (an exception, or even
``SystemExit``) fails as ``DeserializationError``, a ``BrokenProcessPool`` as under
``ProcessPoolExecutor``; the worker goes on with the next task.

Imports only the standard library, cloudpickle, vmexec.protocol and vmexec.errors: runs
on a bare machine.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import Any, Callable

import cloudpickle

from vmexec.protocol import (READ_SIZE, FrameReader, InitFailed, Log, Msg, Result, decode,
                             dumps_value, encode_frame)

# A result shorter than this is held back while more tasks of the same batch are
# waiting, so that a burst of trivial tasks goes back in one frame instead of one
# syscall each. A slower task flushes at once: its latency matters more than batching.
_BATCH_TASK_SECONDS = 0.0002
_BATCH_MAX_RESULTS = 256
# Gives a result its type at a third of the cost of calling Result (~0.15 µs against
# ~0.45): one is built per task.
_new = tuple.__new__


class _ForwardingHandler(logging.Handler):
    """Queue every log record as a LOG message on the results pipe."""

    def __init__(self, outbox: list[Any]) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad format string must not kill the task
            text = f"{record.msg!r} % {record.args!r}"
        self._outbox.append(Log(Msg.LOG, os.getpid(), "log", record.levelno, record.name, text))


def _set_parent_death_signal() -> None:
    """Ask Linux to kill this worker if the agent dies (so no orphaned tasks burn CPU)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # no libc symbol: the pipe EOF still ends us
        pass


def _describe_exception(exc: BaseException) -> bytes:
    """Pickle an exception with its traceback text; substitute one that cannot be pickled."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return cloudpickle.dumps((exc, tb_text))
    except Exception as pickle_exc:
        substitute = RuntimeError(
            f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} "
            f"(the original exception could not be pickled: {pickle_exc})"
        )
        return cloudpickle.dumps((substitute, tb_text))


def run_worker(
    task_fd: int,
    result_fd: int,
    initializer: bytes | None,
    max_tasks: int | None,
    log_level: int,
) -> int:
    """Serve tasks until the agent closes the task pipe or ``max_tasks`` are done.

    Returns the process exit status (0 normal, 3 initializer failed).
    """
    _set_parent_death_signal()
    outbox: list[Any] = []
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ForwardingHandler(outbox))
    root.setLevel(log_level)
    # Pipes are block-buffered by default; line buffering makes print() appear while
    # a long task is still running.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass

    def flush() -> None:
        if outbox:
            data = encode_frame(outbox)
            outbox.clear()
            view = memoryview(data)
            while view:
                written = os.write(result_fd, view)
                view = view[written:]

    if initializer is not None:
        try:
            init_fn, init_args = cloudpickle.loads(initializer)
            init_fn(*init_args)
        except BaseException:
            outbox.append(InitFailed(Msg.INIT_FAILED, traceback.format_exc()))
            flush()
            return 3

    funcs: dict[bytes, Any] = {}
    reader = FrameReader()
    done = 0
    while max_tasks is None or done < max_tasks:
        try:
            data = os.read(task_fd, READ_SIZE)
        except InterruptedError:
            continue
        if not data:
            break
        messages: list[Any] = []
        for payload in reader.feed(data):
            messages.extend(decode(payload))
        remaining_tasks = sum(1 for m in messages if m.kind == Msg.TASK)
        for message in messages:
            kind = message.kind
            if kind == Msg.FUNC:
                funcs[message.digest] = message.callable_bytes
                continue
            if kind == Msg.FORGET:
                funcs.pop(message.digest, None)
                continue
            if kind != Msg.TASK:
                continue
            task_id = message.task_id
            remaining_tasks -= 1
            started = time.perf_counter()
            try:
                fn, call = _unpickle_task(funcs, message.digest, message.args)
                value = _call(fn, call, message.chunked)
                payload_out = dumps_value(value, cloudpickle.dumps)
                ok = True
            except BaseException as exc:
                payload_out = _describe_exception(exc)
                ok = False
            elapsed = time.perf_counter() - started
            outbox.append(_new(Result, (Msg.RESULT, task_id, ok, payload_out, elapsed)))
            done += 1
            if (
                remaining_tasks == 0
                or elapsed > _BATCH_TASK_SECONDS
                or len(outbox) >= _BATCH_MAX_RESULTS
                or (max_tasks is not None and done >= max_tasks)
            ):
                sys.stdout.flush()
                sys.stderr.flush()
                flush()
            if max_tasks is not None and done >= max_tasks:
                break
        flush()
    return 0


def _unpickle_task(funcs: dict[bytes, Any], digest: bytes, args_bytes: bytes) -> tuple[Any, Any]:
    """The task's callable (unpickled once, then cached) and its arguments.

    Raises:
        DeserializationError: chained to whatever unpickling raised, ``SystemExit`` and
            ``KeyboardInterrupt`` included: a task's bytes must not end the worker.
    """
    fn = funcs[digest]  # the agent sends each FUNC before the first TASK that uses it
    if isinstance(fn, bytes):
        fn = funcs[digest] = _unpickle(fn, "function")
    return fn, _unpickle(args_bytes, "arguments")


def _unpickle(data: bytes, what: str) -> Any:
    try:
        return cloudpickle.loads(data)
    except BaseException as exc:
        from vmexec.errors import DeserializationError  # not at start: see protocol._errors

        raise DeserializationError(
            f"the task's {what} could not be unpickled on the machine: {exc!r}. Every "
            "module the function and its arguments need must be importable there, and "
            "unpickling them must not exit or fail"
        ) from exc


#: ``chunked`` value of a TASK that is a micro-batch: separate calls sent together.
BATCH = 2


def _call(fn: Callable[..., Any], call: Any, chunked: Any) -> Any:
    if chunked == BATCH:
        # Separate calls (map items with chunksize=1) sent as one task to save per-task
        # overhead: each succeeds or fails on its own, as if sent alone. Each outcome is
        # a plain tuple, not a message: it travels inside the batch's one RESULT, and a
        # named type would cost every item ~0.1-0.4 µs (the client names them when it
        # splits the batch).
        return [_call_one(fn, item_id, data) for item_id, data in call]
    if chunked:
        # One work item holding many calls, as ProcessPoolExecutor's _process_chunk.
        return [fn(*args) for args in call]
    args, kwargs = call
    return fn(*args, **kwargs)


def _call_one(fn: Callable[..., Any], item_id: int, data: bytes
              ) -> tuple[int, bool, bytes, float]:
    """One call of a micro-batch: ``(item id, ok, pickled value or error, seconds)``,
    the fields of a ``Result`` after its kind (a plain tuple: see ``_call``)."""
    started = time.perf_counter()
    try:
        args, kwargs = _unpickle(data, "arguments")
        value = fn(*args, **kwargs)
        return (item_id, True, dumps_value(value, cloudpickle.dumps),
                time.perf_counter() - started)
    except BaseException as exc:  # the call's own outcome, as for a task sent alone
        return item_id, False, _describe_exception(exc), time.perf_counter() - started
