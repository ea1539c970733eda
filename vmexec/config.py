"""Executor-wide options, validated once; the one reader of ``VMEXEC_*`` variables.

Provider-specific options (hosts, instance types, regions, ...) are validated by each
provider's constructor; what lives here is what every provider shares.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Optional, Union

from vmexec.errors import ConfigError

ENV_PROVIDER = "VMEXEC_PROVIDER"
DEFAULT_PROVIDER = "ec2"


def provider_from_environment(explicit: Optional[str]) -> str:
    """The provider name: the argument, else ``$VMEXEC_PROVIDER``, else ``"ec2"``."""
    if explicit is not None:
        if not isinstance(explicit, str):
            raise ConfigError(f"provider must be a string such as 'local', got {explicit!r}")
        return explicit
    return os.environ.get(ENV_PROVIDER, "").strip() or DEFAULT_PROVIDER


ENV_CHECKIP_URL = "VMEXEC_CHECKIP_URL"


def checkip_url_from_environment() -> Optional[str]:
    """``$VMEXEC_CHECKIP_URL``: where the EC2 provider asks for this computer's public
    address instead of AWS's endpoint (a mirror, or the local cloud's emulation)."""
    return os.environ.get(ENV_CHECKIP_URL, "").strip() or None


_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*,?", re.IGNORECASE)


def parse_duration(value: Union[str, int, float, None], name: str) -> Optional[float]:
    """Seconds from ``300``, ``"90s"``, ``"20 minutes"``, ``"1h30m"`` or ``"1.5 hours"``.

    Raises:
        ConfigError: naming the argument and the accepted forms.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        total, pos = 0.0, 0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos or match.group(2) not in _UNITS:
                break
            total += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            try:
                total = float(text)
            except ValueError:
                raise ConfigError(
                    f"{name}={value!r} is not a duration: use seconds (300) or text such as "
                    "'90s', '20 minutes', '1h30m'") from None
        seconds = total
    if seconds <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return seconds


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Timing and retry settings of one executor.

    Attributes:
        max_workers: task slots across the fleet (None: the provider decides).
        max_retries: how many times a task whose worker died is tried again.
        max_tasks_per_child: worker processes are replaced after this many tasks.
        heartbeat_interval: seconds between heartbeats each way.
        heartbeat_timeout: a machine silent this long is marked lost (its tasks re-queued).
        watchdog_timeout: an agent that hears nothing from the client this long exits
            (and powers its machine off on clouds).
        boot_timeout: how long a machine may take to boot and answer.
        keepalive: a machine with nothing to do for this long is turned off (the fleet
            shrinks to zero when idle and grows again with demand). Seconds, or a
            string such as ``"20 minutes"``.
        max_lifetime: no machine runs longer than this: it takes no new work after it
            and is turned off once its running tasks finish.
        progress: show progress bars (``None``: when stderr is a terminal or notebook).
        output_limit: bytes per second of stdout/stderr/logging each machine forwards;
            more is dropped on the machine and counted (protects the network and the
            client's memory from a chatty logger).
    """

    max_workers: Optional[int]
    max_retries: int = 3
    max_tasks_per_child: Optional[int] = None
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 60.0
    watchdog_timeout: float = 180.0
    boot_timeout: float = 900.0
    keepalive: Union[float, str, None] = 600.0
    max_lifetime: Union[float, str, None] = None
    progress: Optional[bool] = None
    output_limit: int = 1_000_000

    def __post_init__(self) -> None:
        # Frozen: normalise durations through object.__setattr__, once, here.
        object.__setattr__(self, "keepalive", parse_duration(self.keepalive, "keepalive"))
        object.__setattr__(self, "max_lifetime",
                           parse_duration(self.max_lifetime, "max_lifetime"))
        if not isinstance(self.output_limit, int) or self.output_limit <= 0:
            raise ConfigError(f"output_limit must be a positive int (bytes per second), got "
                              f"{self.output_limit!r}")
        if self.progress not in (None, True, False):
            raise ConfigError(f"progress must be True, False or None, got {self.progress!r}")
        _positive_int_or_none("max_workers", self.max_workers,
                              "max_workers must be greater than 0")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if self.max_tasks_per_child is not None:
            if not isinstance(self.max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an int or None")
            if self.max_tasks_per_child <= 0:
                raise ConfigError("max_tasks_per_child must be >= 1")
        for name in ("heartbeat_interval", "heartbeat_timeout", "watchdog_timeout",
                     "boot_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({self.heartbeat_timeout}s) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}s), or every machine would be marked lost"
            )
        if self.watchdog_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"watchdog_timeout ({self.watchdog_timeout}s) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}s), or agents would stop while the client is alive"
            )

    @classmethod
    def pop_from(cls, max_workers: Optional[int], max_retries: int,
                 max_tasks_per_child: Optional[int], options: dict[str, Any]) -> "SchedulerConfig":
        """Build from the executor's arguments, removing the fields found in ``options``."""
        names = {f.name for f in dataclasses.fields(cls)} - {
            "max_workers", "max_retries", "max_tasks_per_child"}
        picked = {name: options.pop(name) for name in list(options) if name in names}
        return cls(max_workers=max_workers, max_retries=max_retries,
                   max_tasks_per_child=max_tasks_per_child, **picked)


    def shared_with(self, provider_class: Callable[..., Any]) -> dict[str, Any]:
        """The fields that ``provider_class.__init__`` also takes, with their values."""
        import inspect

        try:
            parameters = inspect.signature(provider_class).parameters
        except (TypeError, ValueError):
            return {}
        shared = ("boot_timeout", "max_lifetime", "keepalive")
        return {name: getattr(self, name) for name in shared
                if name in parameters and getattr(self, name) is not None}


def _positive_int_or_none(name: str, value: Any, message: str) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int or None, got {value!r}")
    if value <= 0:
        raise ConfigError(message)
