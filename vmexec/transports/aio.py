"""The I/O loop: one asyncio event loop, on one thread, for every event-driven transport.

Owns the ``vmexec-io`` thread and the only ways other threads hand it work. A client
driving a thousand machines must not pay a thread (or a timer, or a poll) per machine:
every SSH connection of ``transports.ssh_async`` lives on this loop, so an idle fleet
costs nothing until bytes arrive, and connecting is bounded by CPU, not by threads.

Rules for code that runs on the loop (transport callbacks): never block, never call
user code. Anything that may block — resolving futures, whose done-callbacks are user
code — is handed to another thread (the scheduler's inbox thread).

Threads: ``vmexec-io`` (daemon, started on first use, lives as long as the process).
Must not import: providers, scheduler, executor, asyncssh (only ``ssh_async`` does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable, Coroutine, Optional, TypeVar

__all__ = ["get_loop", "run", "post", "call_later", "on_loop_thread"]

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
    return _thread is not None and threading.current_thread() is _thread


def run(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the loop from any thread; returns a concurrent Future."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def post(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the loop soon, in posting order; callable from any thread."""
    global _wakeup_pending
    if on_loop_thread():
        fn(*args)
        return
    loop = get_loop()
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
    loop = get_loop()
    handle: list[Any] = []
    cancelled = threading.Event()

    def arm() -> None:
        if not cancelled.is_set():
            handle.append(loop.call_later(seconds, fn, *args))

    def cancel() -> None:
        cancelled.set()
        post(lambda: [h.cancel() for h in handle])

    post(arm)
    return cancel
