"""The fleet's end when the program ends: ``atexit`` and SIGINT/SIGTERM/SIGHUP.

One process-wide set of handlers, installed with the first provider, tears down every
live provider. (One handler per provider would chain ever deeper and could not be
removed in any order.) The previous handlers are kept and called after ours.

A handler never blocks: it starts the teardown in a non-daemon thread and lets the main
thread unwind (KeyboardInterrupt for SIGINT, SystemExit for SIGTERM), so locks the main
thread holds are released; the interpreter waits for the thread before exiting, and
``_at_exit`` tears down whatever is still live.

Imports the standard library only. Must not import boto3, the scheduler or the executor.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
from typing import Any, Optional, Protocol

__all__ = ["Fleet", "register", "unregister"]

log = logging.getLogger(__name__)


class Fleet(Protocol):
    """What these handlers need of a provider (``EC2Provider``)."""

    def start_background_teardown(self) -> threading.Thread: ...

    def terminate(self, records: Optional[list[Any]] = None) -> None: ...


# Strong references: a provider must stay reachable until its resources are gone.
_live: set[Fleet] = set()
_live_lock = threading.Lock()
_previous: dict[int, Any] = {}
_installed = False


def register(provider: Fleet, handle_signals: bool) -> None:
    """Tear ``provider`` down at interpreter exit, and on SIGINT/SIGTERM/SIGHUP when
    ``handle_signals`` (only from the main thread: Python allows no other)."""
    global _installed
    with _live_lock:
        _live.add(provider)
        if _installed:
            return
        _installed = True
    atexit.register(_at_exit)
    if not handle_signals or threading.current_thread() is not threading.main_thread():
        log.debug("not installing signal handlers (handle_signals=%s, thread %s)",
                  handle_signals, threading.current_thread().name)
        return
    # SIGHUP too: a closed terminal or a dropped SSH session to the client's computer
    # must not leave the fleet running until the machines notice.
    hangup = getattr(signal, "SIGHUP", None)  # POSIX only
    for signum in (signal.SIGINT, signal.SIGTERM) + ((hangup,) if hangup else ()):
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN or previous is None:
            continue  # ignored on purpose, or owned by non-Python code: leave it
        _previous[signum] = previous
        signal.signal(signum, _on_signal)


def unregister(provider: Fleet) -> None:
    """``provider`` is gone: nothing to do for it at exit."""
    with _live_lock:
        _live.discard(provider)


def _on_signal(signum: int, frame: Any) -> None:
    # No lock here: the main thread may be holding _live_lock when the signal arrives.
    providers = list(_live)
    for provider in providers:
        provider.start_background_teardown()
    if providers:
        print(f"vmexec: {signal.Signals(signum).name}: tearing down {len(providers)} EC2 "
              "fleet(s); a second Ctrl-C abandons it (then run `vmexec cleanup`)",
              file=sys.stderr, flush=True)
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        # For SIGINT usually signal.default_int_handler: KeyboardInterrupt, as expected.
        previous(signum, frame)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    # SIG_DFL would end the process at once; exit with the same status instead, after
    # the teardown thread (the interpreter joins it) and atexit have run.
    raise SystemExit(128 + signum)


def _at_exit() -> None:
    # terminate(None) waits for a teardown a signal started, or does it now.
    for provider in list(_live):
        provider.terminate(None)
