"""The I/O loop: one asyncio event loop, on one thread, for every event-driven transport.

Owns the ``vmexec-io`` thread and the only ways other threads hand it work. A client
driving a thousand machines must not pay a thread (or a timer, or a poll) per machine:
every SSH connection of ``transports.ssh_async`` lives on this loop, so an idle fleet
costs nothing until bytes arrive, and connecting is bounded by CPU, not by threads.

Rules for code that runs on the loop (transport callbacks): never block, never call
user code. Anything that may block — resolving futures, whose done-callbacks are user
code — is handed to another thread (the scheduler's inbox thread).

Threads: ``vmexec-io`` (daemon), started on first use. Executors ``hold`` the loop while
they use it; when the last one lets go (``release``, at shutdown) the loop stops and
its thread — and asyncio's resolver threads — are joined, so ``shutdown(wait=True)``
leaves no thread behind, as ``ProcessPoolExecutor``'s does not.
Must not import: providers, scheduler, executor, asyncssh (only ``ssh_async`` does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Callable, Coroutine, Optional, TypeVar

__all__ = ["get_loop", "run", "post", "call_later", "on_loop_thread", "hold", "release"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: Optional[asyncio.AbstractEventLoop] = None
_thread: Optional[threading.Thread] = None

# Calls posted from other threads, run in order by one loop callback. Posting is a
# list append; only the first post of a burst wakes the loop (one self-pipe write),
# so a heartbeat to 2000 machines costs one wake-up, not 2000.
_posted: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
_posted_lock = threading.Lock()
_wakeup_pending = False
_holders = 0


def _forget_after_fork() -> None:
    # A forked child has the parent's loop object but not its thread: start afresh.
    global _loop, _thread, _holders, _wakeup_pending, _lock, _posted_lock
    _loop = _thread = None
    _holders = 0
    _wakeup_pending = False
    _lock, _posted_lock = threading.Lock(), threading.Lock()
    del _posted[:]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def get_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop, _thread
    loop = _loop
    if loop is not None:
        return loop
    with _lock:
        if _loop is None:
            new_loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(new_loop)
                new_loop.call_soon(started.set)
                new_loop.run_forever()

            _thread = threading.Thread(target=serve, name="vmexec-io", daemon=True)
            _thread.start()
            started.wait()
            _loop = new_loop
        return _loop


def on_loop_thread() -> bool:
    """True on the ``vmexec-io`` thread."""
    thread = _thread
    return thread is not None and threading.current_thread() is thread


def run(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the loop from any thread; returns a concurrent Future."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def post(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the loop soon, in posting order; callable from any thread."""
    global _wakeup_pending
    if on_loop_thread():
        fn(*args)
        return
    loop = _loop
    if loop is None:  # stopped: nothing of it is left to act on
        return
    with _posted_lock:
        _posted.append((fn, args))
        if _wakeup_pending:
            return
        _wakeup_pending = True
    loop.call_soon_threadsafe(_run_posted)


def _run_posted() -> None:
    global _wakeup_pending
    with _posted_lock:
        calls = _posted[:]
        del _posted[:]
        _wakeup_pending = False
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:  # one transport's bug must not starve the others
            import logging

            logging.getLogger("vmexec.transports").exception("I/O loop callback failed")


def call_later(seconds: float, fn: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """Run ``fn(*args)`` on the loop after ``seconds``; returns a cancel function.

    A timer on the loop costs a heap entry, where ``threading.Timer`` costs a thread:
    the handshake deadline of a thousand connecting machines is a thousand entries.
    """
    loop = _loop
    handle: list[Any] = []
    cancelled = threading.Event()
    if loop is None:  # no holder keeps a loop running: nothing would fire it anyway
        return cancelled.set

    def arm() -> None:
        if not cancelled.is_set():
            handle.append(loop.call_later(seconds, fn, *args))

    def cancel() -> None:
        cancelled.set()
        post(lambda: [h.cancel() for h in handle])

    post(arm)
    return cancel


def hold() -> None:
    """Keep the loop running (started if needed) until a matching ``release``."""
    global _holders
    with _lock:
        _holders += 1
    get_loop()


def release(timeout: float = 10.0) -> None:
    """Let go of the loop; the last holder stops it and joins its threads.

    Anything still on the loop (connections the holder closed but that are still
    saying goodbye) is cut off: call this after the holder's transports have ended.
    """
    global _holders, _loop, _thread, _wakeup_pending
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders or _loop is None:
            return
        loop, thread = _loop, _thread
        _loop = _thread = None
    if thread is threading.current_thread():  # pragma: no cover - never from the loop
        return

    async def stop() -> None:
        try:
            await asyncio.wait_for(loop.shutdown_default_executor(), timeout)
        finally:
            loop.stop()

    try:
        asyncio.run_coroutine_threadsafe(stop(), loop)
    except RuntimeError:  # already closed
        return
    if thread is not None:
        thread.join(timeout)
    if not loop.is_running():
        loop.close()
    with _posted_lock:
        del _posted[:]
        _wakeup_pending = False
