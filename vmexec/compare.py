"""Try the same call on several machine types at once and compare speed and cost.

``compare(fn, *args, instance_types=[...], regions=[...], repeat=3)`` starts one machine
of each candidate (type × region) in parallel, runs ``fn(*args)`` ``repeat`` times on
it, and returns a table: type, architecture, region, $/h, median runtime, $ per call,
and the speed-up against the cheapest candidate.

Honest numbers: the runtime is measured *on the machine*, around the call only — not
boot time, not the network, not the client.

Must not import: boto3, paramiko (prices come through ``vmexec.guardrails.pricing``).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

from vmexec.config import provider_from_environment
from vmexec.errors import ConfigError
from vmexec.executor import VMExecutor

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
    """One row of a comparison."""

    instance_type: str
    region: str
    arch: str = "?"
    usd_per_hour: Optional[float] = None
    runtimes: list[float] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    @property
    def median_seconds(self) -> Optional[float]:
        return statistics.median(self.runtimes) if self.runtimes else None

    @property
    def usd_per_call(self) -> Optional[float]:
        if self.usd_per_hour is None or self.median_seconds is None:
            return None
        return self.usd_per_hour * self.median_seconds / 3600.0


@dataclasses.dataclass
class Comparison:
    """The result of ``compare``: rows in the order asked for, and a printable table."""

    candidates: list[Candidate]

    def baseline(self) -> Optional[Candidate]:
        """The cheapest candidate per hour that ran (the first that ran if no prices)."""
        ran = [c for c in self.candidates if c.median_seconds is not None]
        priced = [c for c in ran if c.usd_per_hour is not None]
        if priced:
            return min(priced, key=lambda c: c.usd_per_hour)  # type: ignore[arg-type,return-value]
        return ran[0] if ran else None

    def speedup(self, candidate: Candidate) -> Optional[float]:
        base = self.baseline()
        if base is None or candidate.median_seconds in (None, 0) or base.median_seconds is None:
            return None
        return base.median_seconds / candidate.median_seconds  # type: ignore[operator]

    def text(self) -> str:
        header = ("type", "arch", "region", "$/h", "median", "$/call", "speed-up")
        rows = [header]
        for c in self.candidates:
            if c.error:
                rows.append((c.instance_type, c.arch, c.region, _money(c.usd_per_hour),
                             "failed", "", c.error[:60]))
                continue
            speed = self.speedup(c)
            rows.append((c.instance_type, c.arch, c.region, _money(c.usd_per_hour),
                         f"{c.median_seconds:.3f}s" if c.median_seconds is not None else "-",
                         _money(c.usd_per_call, digits=6),
                         f"{speed:.2f}x" if speed is not None else "-"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
                 for row in rows]
        base = self.baseline()
        if base is not None:
            lines.append(f"(speed-up against the cheapest: {base.instance_type} in {base.region};"
                         " runtimes measured on the machines)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def _money(value: Optional[float], digits: int = 4) -> str:
    return "unknown" if value is None else f"${value:.{digits}f}"


def _timed_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[float, str]:
    """Runs on the machine: the call's own duration, and the machine's architecture."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start, platform.machine()


def compare(fn: Callable[..., Any], *args: Any, instance_types: Sequence[str],
            regions: Union[str, Sequence[str], None] = None, repeat: int = 3,
            spot: bool = False, provider: Optional[str] = None, **options: Any) -> Comparison:
    """Run ``fn(*args)`` on one machine of each candidate type (and region), in parallel.

    Args:
        fn: the callable to time; its result is discarded.
        *args: its arguments.
        instance_types: the machine types to try.
        regions: one region or several (each type is tried in each); default: the
            provider's default region.
        repeat: calls per candidate; the median is reported.
        spot: price and launch spot machines.
        provider: as for ``VMExecutor`` (default ``$VMEXEC_PROVIDER``, else ec2).
        **options: passed to each ``VMExecutor`` (and keyword arguments are not passed
            to ``fn``: wrap it with ``functools.partial`` for those).

    Returns:
        A ``Comparison``; ``print(result)`` shows the table.

    Raises:
        ConfigError: no instance types, or ``repeat < 1``.
    """
    if isinstance(instance_types, str):
        instance_types = [instance_types]
    if not instance_types:
        raise ConfigError("compare() needs instance_types=[...], e.g. ['c7g.large', 'c7i.large']")
    if not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"repeat must be an int >= 1, got {repeat!r}")
    region_list: list[Optional[str]] = [None] if regions is None else (
        [regions] if isinstance(regions, str) else list(regions))
    name = provider_from_environment(provider)
    candidates = [Candidate(t, r or "default") for t in instance_types for r in region_list]
    prices = _price_book(name, options)

    def run(candidate: Candidate) -> None:
        cloud: dict[str, Any] = {"instance_type": candidate.instance_type}
        if candidate.region != "default":
            cloud["regions"] = candidate.region
        if prices is not None and candidate.region != "default":
            price = prices.hourly(candidate.instance_type, candidate.region, spot=spot)
            candidate.usd_per_hour = price.usd_per_hour if price else None
        try:
            with VMExecutor(1, provider=name, spot=spot, **cloud, **options) as ex:
                for _ in range(repeat):
                    seconds, arch = ex.submit(_timed_call, fn, args, {}).result()
                    candidate.runtimes.append(seconds)
                    candidate.arch = arch
        except Exception as exc:  # one failing candidate must not hide the others
            logger.warning("compare: %s in %s failed: %s", candidate.instance_type,
                           candidate.region, exc)
            candidate.error = f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=min(32, len(candidates)),
                            thread_name_prefix="vmexec-compare") as pool:
        list(pool.map(run, candidates))
    if name == "local":
        for candidate in candidates:
            candidate.usd_per_hour = 0.0 if candidate.error is None else None
    return Comparison(candidates)


def _price_book(provider: str, options: dict[str, Any]) -> Any:
    if provider != "ec2":
        return None
    try:
        from vmexec.guardrails.pricing import PriceBook
    except ImportError:  # pragma: no cover - pricing ships with vmexec
        return None
    return PriceBook(session=options.get("session"), endpoint_url=options.get("endpoint_url"))
