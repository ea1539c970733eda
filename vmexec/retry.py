"""Named retry policies (tenacity): what is transient, how long to wait, when to stop.

Owns the retry *policy*, never the error *translation*: callers decide what an error
means (``vmexec.providers.ec2.errors`` maps EC2 codes to vmexec errors) and use a policy
here for the few that are worth trying again.

* ``throttling`` — the cloud API said "slow down" (``RequestLimitExceeded``,
  ``Throttling``, ``ThrottlingException``, ``RequestThrottled``): exponential backoff with
  full jitter, so hundreds of threads hitting one regional endpoint spread out instead
  of retrying in lock-step. Nothing else is retried: a capacity error must reach the
  planner at once so that it can fall back to another zone, type or region, and a bad
  parameter will not get better by asking again.
* ``dependency`` — a resource is still in use for a while after what used it is gone
  (a security group while the ENIs of terminated instances detach).
* ``booting`` — a machine that is booting refuses SSH, or still shows the image's own host
  key, until its boot script has installed ours: retry until a deadline.

Time is injectable: every policy takes ``clock=`` (an object with ``sleep`` and
``monotonic``); by default it uses the module's current clock, which tests replace with
``use_clock(FakeClock())`` so that nothing in the suite really sleeps.

Imports only the standard library and tenacity (no boto3, no paramiko): exceptions are
recognised by duck typing (``exc.response["Error"]["Code"]`` as botocore's
``ClientError`` carries it).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Callable, Iterator, Optional, Protocol

import tenacity

__all__ = [
    "THROTTLING_CODES",
    "Clock",
    "SystemClock",
    "FakeClock",
    "current_clock",
    "use_clock",
    "error_code",
    "is_throttling",
    "throttling",
    "dependency",
    "booting",
]

log = logging.getLogger(__name__)

#: Error codes that mean "too many requests; try again later".
THROTTLING_CODES = frozenset(
    {"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"}
)


class Clock(Protocol):
    """What a policy needs of time."""

    def sleep(self, seconds: float) -> None: ...

    def monotonic(self) -> float: ...

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Sleep up to ``seconds``, returning early (True) once ``event`` is set."""
        ...


class SystemClock:
    """Real time."""

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))


class FakeClock:
    """A clock whose ``sleep`` returns at once and advances ``monotonic``.

    Records every sleep in ``sleeps`` so tests can check the backoff they asked for.
    Thread-safe: several launch threads may back off at the same time.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += max(0.0, seconds)

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.is_set():
            return True
        self.sleep(seconds)
        return event.is_set()


_clock: Clock = SystemClock()


def current_clock() -> Clock:
    """The clock policies use when none is passed."""
    return _clock


@contextlib.contextmanager
def use_clock(clock: Clock) -> Iterator[Clock]:
    """Make ``clock`` the default of every policy inside the ``with`` block (for tests)."""
    global _clock
    previous, _clock = _clock, clock
    try:
        yield clock
    finally:
        _clock = previous


def error_code(exc: BaseException) -> Optional[str]:
    """The cloud error code carried by ``exc`` (botocore ``ClientError`` style), or None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code else None


def is_throttling(exc: BaseException) -> bool:
    """Whether ``exc`` is an API "slow down" answer worth retrying after a pause."""
    return error_code(exc) in THROTTLING_CODES


def _log_retry(what: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.info("%s: %s; retry %d in %.1fs", what, error, state.attempt_number, delay)

    return before_sleep


def throttling(
    what: str = "AWS API call",
    *,
    max_attempts: int = 8,
    initial: float = 1.0,
    maximum: float = 20.0,
    clock: Optional[Clock] = None,
) -> tenacity.Retrying:
    """Retry an API call while the service throttles it.

    Exponential backoff (``initial`` doubling up to ``maximum``) with full jitter; after
    ``max_attempts`` calls the last throttling error is re-raised. Any other exception
    propagates at once.

    Args:
        what: names the call in log lines.
        max_attempts: calls in total, the first included.
        initial: upper bound of the first wait (seconds).
        maximum: upper bound of any wait (seconds).
        clock: time source; default ``current_clock()``.

    Returns:
        A ``tenacity.Retrying``: ``policy(fn, *args)`` calls ``fn`` under it.
    """
    return _jittered(is_throttling, tenacity.stop_after_attempt(max_attempts), what,
                     initial=initial, maximum=maximum, clock=clock or current_clock())


def dependency(
    is_transient: Callable[[BaseException], bool],
    what: str,
    *,
    timeout: float = 300.0,
    initial: float = 2.0,
    maximum: float = 15.0,
    clock: Optional[Clock] = None,
) -> tenacity.Retrying:
    """Retry while a resource is still referenced by something that is going away.

    Args:
        is_transient: true for the errors that mean "still in use" (e.g. EC2's
            ``DependencyViolation``) — and throttling is always retried too.
        what: names the operation in log lines.
        timeout: give up (re-raising the last error) after this many seconds.
        initial, maximum: backoff bounds in seconds (exponential, jittered).
        clock: time source; default ``current_clock()``.
    """
    clock = clock or current_clock()
    deadline = clock.monotonic() + timeout
    # Measured on the policy's clock (tenacity's own stop_after_delay reads real time).
    return _jittered(lambda e: is_transient(e) or is_throttling(e),
                     lambda state: clock.monotonic() >= deadline, what,
                     initial=initial, maximum=maximum, clock=clock)


def _jittered(should_retry: Callable[[BaseException], bool],
              stop: Callable[[tenacity.RetryCallState], bool], what: str, *,
              initial: float, maximum: float, clock: Clock) -> tenacity.Retrying:
    """Exponential backoff with full jitter, sleeping on ``clock``, logging each retry."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(should_retry),
        wait=tenacity.wait_random_exponential(multiplier=initial, max=maximum),
        stop=stop,
        sleep=clock.sleep,
        before_sleep=_log_retry(what),
        reraise=True,
    )


def booting(
    deadline: float,
    what: str,
    *,
    retry_on: tuple[type[BaseException], ...],
    abort: Optional[threading.Event] = None,
    initial: float = 1.0,
    maximum: float = 10.0,
    clock: Optional[Clock] = None,
) -> tenacity.Retrying:
    """Retry connecting to a machine that is still booting, until ``deadline``.

    Args:
        deadline: a ``clock.monotonic()`` value; no attempt starts after it and the
            last error is re-raised.
        what: names the machine in log lines.
        retry_on: exception types that mean "not up yet" (connection refused, a host key
            the boot script has not replaced yet, login refused before the key is in).
        abort: when set (the fleet is shutting down), the pause ends at once and the
            last error is re-raised.
        initial, maximum: backoff bounds in seconds (exponential, jittered, and never
            past the deadline).
        clock: time source; default ``current_clock()``.
    """
    clock = clock or current_clock()
    stop_event = abort or threading.Event()

    def wait(state: tenacity.RetryCallState) -> float:
        exponent = min(state.attempt_number - 1, 16)
        pause = random.uniform(initial / 2, min(maximum, initial * 2 ** exponent))
        return max(0.0, min(pause, deadline - clock.monotonic()))

    def stop(state: tenacity.RetryCallState) -> bool:
        return stop_event.is_set() or clock.monotonic() >= deadline

    def before_sleep(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.debug("%s not reachable yet (attempt %d): %s", what, state.attempt_number, error)

    def sleep(seconds: float) -> None:
        clock.wait(stop_event, seconds)  # returns early when stop_event is set

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(retry_on),
        wait=wait,
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )

