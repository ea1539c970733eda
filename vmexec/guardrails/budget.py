"""Cost estimate before launch, the hourly limit, the running cost and the receipt.

Owns::

    estimate(plan, prices, spot)        -> PlanCost: $/h of the full-scale plan, line by line
    check_max_hourly_cost(cost, ...)    -> BudgetExceeded before anything is launched
    CostMeter.started/stopped(record)   -> instance-seconds by (type, region, purchase)
    CostMeter.total() / receipt()       -> the running estimate and the line at shutdown
    find_leftovers(provider)            -> human lines about resources of earlier runs

The provider side of the contract is data: ``CostPlan`` (what to price before launch),
``Leftover`` (a resource of an earlier run) and ``TeardownReport`` (what the teardown did),
returned by the hooks ``vmexec.providers.base.Provider`` declares.

Every figure is instance-seconds x the hourly price of its (type, region, purchase
option) from a ``PriceBook``, plus root-volume storage at the region's EBS price. A
machine whose price is unknown is named, never priced at $0; machines of the ``local``
and ``ssh`` providers cost vmexec nothing and the receipt says so.

Imports no cloud SDK and no provider: prices come from ``vmexec.guardrails.pricing``
and the leftover query is the provider's ``leftovers()`` hook. Must not import
providers, transports, the scheduler or the executor.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import threading
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from vmexec.errors import BudgetExceeded, ConfigError, VMExecError
from vmexec.guardrails.pricing import Price, PriceBook

__all__ = [
    "CostPlan",
    "Leftover",
    "TeardownReport",
    "PlanCost",
    "estimate",
    "check_max_hourly_cost",
    "CostMeter",
    "find_leftovers",
    "format_duration",
    "format_usd",
]

log = logging.getLogger(__name__)

#: Machines of these providers are the user's own: $0 to vmexec's estimate.
LOCAL_PROVIDERS = ("local", "ssh")
#: EBS bills provisioned GB-months prorated by the second over a 30-day month (the
#: convention of AWS's own EBS pricing examples).
SECONDS_PER_MONTH = 30 * 24 * 3600.0

PlanCostLine = tuple[str, str, str, int, int, bool, Optional[float]]


# --- what providers hand the cost guard ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CostPlan:
    """A priced fleet's full-scale plan (``Provider.cost_plan``).

    Attributes:
        plan: has ``lines`` with ``region``, ``instance_type``, ``arch``, ``machines`` and
            ``slots`` (the EC2 ``Plan``).
        prices: the provider's price book (also prices the running meter).
        spot: the plan launches spot first (the hourly limit is checked against the
            on-demand fallback: the worst case).
        storage_gb_per_machine: root volume size billed per machine (0: unknown/none).
    """

    plan: Any
    prices: PriceBook
    spot: bool = False
    storage_gb_per_machine: float = 0.0


class Leftover(Protocol):
    """A resource of an earlier run (``Provider.leftovers``), e.g. an EC2 ``Resource``."""

    @property
    def region(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def fleet(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def owner(self) -> str: ...

    def age(self, now: Optional[datetime.datetime] = None
            ) -> Optional[datetime.timedelta]: ...


@dataclasses.dataclass(frozen=True)
class TeardownReport:
    """What a fleet's teardown did, for the receipt (``Provider.teardown_report``).

    Attributes:
        deleted: kind -> count of what was deleted.
        left: resources still present afterwards (None: not verified).
        kept: ids of a named fleet's machines left running for reuse.
        keepalive: seconds those stay on without a client.
    """

    deleted: Mapping[str, int]
    left: Optional[int] = None
    kept: Sequence[str] = ()
    keepalive: float = 0.0


def format_usd(value: float) -> str:
    """``$1.39``, ``$0.0725``, ``$0.08925``, ``$1,234.50``: cents from a dollar up, below
    it up to five decimals (at least two); amounts under $0.00001 as ``$0.00``."""
    if abs(value) >= 1 or value == 0:
        return f"${value:,.2f}"
    text = f"{value:.5f}".rstrip("0")
    return "$" + (text + "0" * max(0, 2 - len(text.split(".")[1])))


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``, ``1d03h``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


# --- the estimate before launch ----------------------------------------------------------

@dataclasses.dataclass
class PlanCost:
    """The hourly cost of a plan at full scale.

    Attributes:
        lines: ``(region, instance_type, arch, machines, slots, spot, usd_per_hour)`` per
            plan line with machines; ``usd_per_hour`` is the whole line's (machines x
            price), None when the price is unknown.
        total_per_hour: the sum over the lines whose price is known.
        unknown: ``"<type> in <region>"`` for each line whose price is unknown.
        sources: ``"<type> in <region>"`` -> where its price came from.
        on_demand_per_hour: for a spot estimate, the same plan at on-demand prices (what
            it costs where spot is short); None otherwise or when unknown.
    """

    lines: list[PlanCostLine]
    total_per_hour: float
    unknown: list[str]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    on_demand_per_hour: Optional[float] = None

    @property
    def total_slots(self) -> int:
        return sum(line[4] for line in self.lines)

    @property
    def priced_slots(self) -> int:
        return sum(line[4] for line in self.lines if line[6] is not None)

    @property
    def per_slot_hour(self) -> Optional[float]:
        """Dollars per slot-hour of the priced part of the plan's mix (None: no slots)."""
        slots = self.priced_slots
        return self.total_per_hour / slots if slots else None

    def text(self) -> str:
        """A table: region, type, arch, machines, slots, $/h per line, and the total."""
        rows = [("region", "type", "arch", "purchase", "machines", "slots", "$/h", "source")]
        for region, itype, arch, machines, slots, spot, usd in self.lines:
            key = f"{itype} in {region}"
            rows.append((region, itype, arch, "spot" if spot else "on-demand", str(machines),
                         str(slots), "unknown" if usd is None else format_usd(usd),
                         self.sources.get(key, "-")))
        rows.append(("total", "", "", "", str(sum(line[3] for line in self.lines)),
                     str(self.total_slots), format_usd(self.total_per_hour)
                     + (" + unknown" if self.unknown else ""), ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        notes = []
        if self.unknown:
            notes.append(f"price unknown for {', '.join(self.unknown)}: not counted in the "
                         "total (see `vmexec prices`)")
        if self.on_demand_per_hour is not None:
            notes.append(f"where spot is short and on-demand stands in, up to "
                         f"{format_usd(self.on_demand_per_hour)}/h")
        return "\n".join(body + notes)


def estimate(plan: Any, prices: PriceBook, spot: bool) -> PlanCost:
    """Price every line of ``plan`` (an EC2 ``Plan`` sized for ``max_workers``).

    Args:
        plan: has ``lines`` with ``region``, ``instance_type``, ``arch``, ``machines``
            and ``slots``; lines without machines (fallback candidates) are left out.
        prices: where prices come from.
        spot: price at spot prices (median of the zones; on-demand as an upper bound
            where spot prices are unavailable).

    Returns:
        The ``PlanCost``.
    """
    lines: list[PlanCostLine] = []
    unknown: list[str] = []
    sources: dict[str, str] = {}
    total = 0.0
    on_demand_total: Optional[float] = 0.0 if spot else None
    for line in plan.lines:
        if not line.machines:
            continue
        key = f"{line.instance_type} in {line.region}"
        price = prices.hourly(line.instance_type, line.region, spot=spot)
        usd = None if price is None else price.usd_per_hour * line.machines
        if price is None:
            unknown.append(key)
        else:
            sources[key] = price.source
            total += usd  # type: ignore[operator]
        if on_demand_total is not None:
            od = prices.hourly(line.instance_type, line.region, spot=False)
            on_demand_total = None if od is None else \
                on_demand_total + od.usd_per_hour * line.machines
        lines.append((line.region, line.instance_type, line.arch, line.machines, line.slots,
                      spot, usd))
    return PlanCost(lines=lines, total_per_hour=total, unknown=unknown, sources=sources,
                    on_demand_per_hour=on_demand_total)


def check_max_hourly_cost(cost: PlanCost, max_hourly_cost: float, max_workers: int) -> None:
    """Refuse a plan that costs more per hour than ``max_hourly_cost``.

    The largest ``max_workers`` that fits is ``max_hourly_cost`` divided by the plan's
    dollars per slot-hour (its mix of types and regions), rounded down.

    Args:
        cost: ``estimate(plan, ...)`` of the full-scale plan.
        max_hourly_cost: the limit in USD per hour.
        max_workers: the ``max_workers`` the plan was sized for (for the message).

    Raises:
        ConfigError: ``max_hourly_cost`` is not a positive number.
        BudgetExceeded: the plan costs more, or a price is unknown (vmexec cannot tell
            whether the plan fits, and will not guess).
    """
    if isinstance(max_hourly_cost, bool) or not isinstance(max_hourly_cost, (int, float)) \
            or not math.isfinite(max_hourly_cost) or max_hourly_cost <= 0:
        raise ConfigError(f"max_hourly_cost must be a positive number of US dollars per hour, "
                          f"not {max_hourly_cost!r}")
    limit = format_usd(float(max_hourly_cost))
    if cost.unknown:
        raise BudgetExceeded(
            f"max_hourly_cost={limit}/h is set, but the price of {', '.join(cost.unknown)} "
            "is unknown (not in vmexec's bundled table, and the AWS Price List API gave "
            "none), so vmexec cannot tell whether the plan fits and will not guess. Choose "
            "instance types and regions with a known price (`vmexec prices TYPE --regions "
            "REGION` shows them), allow pricing:GetProducts for your AWS credentials, or "
            "drop max_hourly_cost=")
    if cost.total_per_hour <= max_hourly_cost:
        return
    per_slot = cost.per_slot_hour
    if per_slot is None:  # no priced slot cannot cost anything: unreachable, but be exact
        return
    enough = math.ceil(cost.total_per_hour * 100) / 100  # a limit that lets this plan pass
    fits = int(math.floor(max_hourly_cost / per_slot + 1e-9))
    plan = (f"{cost.total_slots} slots on {sum(line[3] for line in cost.lines)} machine(s) "
            f"costing about {format_usd(cost.total_per_hour)}/h")
    mix = f"{format_usd(per_slot)} per slot-hour for this mix of instance types and regions"
    advice = (f"At {mix}, max_workers={fits} fits: pass max_workers={fits}" if fits >= 1
              else f"Not even one slot fits ({mix})")
    raise BudgetExceeded(
        f"max_hourly_cost={limit}/h refuses this plan: max_workers={max_workers} needs "
        f"{plan}. {advice}, raise max_hourly_cost to {enough:.2f}, or "
        "choose cheaper instance types "
        "(`vmexec prices TYPE ...` compares them). Nothing was launched")


# --- the running cost and the receipt ------------------------------------------------------

Group = tuple[str, str, str]  # (instance type, region, "spot" | "on-demand")


@dataclasses.dataclass
class _Machine:
    group: Group
    local: bool
    started: float
    stopped: Optional[float] = None


class CostMeter:
    """Instance-seconds of every machine, priced; thread-safe.

    Call ``started(record)`` when a machine starts billing (its launch call returned) and
    ``stopped(record)`` when it is terminated. Both are idempotent per machine id.

    Args:
        prices: the price book.
        clock: seconds, monotonic (injectable for tests).
        storage_gb_per_machine: root volume size, billed at the region's gp3 price.
    """

    def __init__(self, prices: PriceBook, clock: Callable[[], float] = time.monotonic,
                 storage_gb_per_machine: float = 0.0) -> None:
        self.prices = prices
        self._clock = clock
        self.storage_gb_per_machine = float(storage_gb_per_machine)
        self._lock = threading.Lock()
        self._machines: dict[str, _Machine] = {}
        self._price_cache: dict[Group, Optional[Price]] = {}
        self._ebs_cache: dict[str, Optional[float]] = {}

    # -- events --------------------------------------------------------------------------
    def started(self, record: Any) -> None:
        """Billing of ``record``'s machine starts now (a ``MachineRecord``)."""
        local = getattr(record, "provider", None) in LOCAL_PROVIDERS or \
            not getattr(record, "instance_type", None)
        if local:
            group = (str(getattr(record, "provider", None) or "local"), "", "on-demand")
        else:
            group = (str(record.instance_type), str(record.region or ""),
                     "spot" if getattr(record, "spot", False) else "on-demand")
        now = self._clock()
        with self._lock:
            known = self._machines.get(record.id)
            if known is None:
                self._machines[record.id] = _Machine(group, local, now)
            elif known.stopped is not None:
                # Handed back after the scheduler let it go (the EC2 provider reconnects
                # to machines whose connection broke when the client changed networks):
                # the instance ran all along, so it was billed all along.
                known.stopped = None

    def stopped(self, record: Any) -> None:
        """Billing of ``record``'s machine stops now; unknown or stopped ids are ignored."""
        now = self._clock()
        with self._lock:
            machine = self._machines.get(record.id)
            if machine is not None and machine.stopped is None:
                machine.stopped = now

    # -- figures -------------------------------------------------------------------------
    def seconds_by_group(self) -> dict[Group, float]:
        """Instance-seconds so far by ``(instance_type, region, "spot"|"on-demand")``.

        Machines of the local and ssh providers are under ``(provider, "", "on-demand")``.
        """
        now = self._clock()
        out: dict[Group, float] = {}
        with self._lock:
            for machine in self._machines.values():
                end = machine.stopped if machine.stopped is not None else now
                out[machine.group] = out.get(machine.group, 0.0) + max(0.0, end - machine.started)
        return out

    def total(self) -> float:
        """The running estimate in USD: priced instance-seconds plus storage, now.

        Machines whose price is unknown add nothing here; ``receipt`` names them.
        """
        return self._breakdown()[0]

    def _price(self, group: Group) -> Optional[Price]:
        with self._lock:
            if group in self._price_cache:
                return self._price_cache[group]
        itype, region, purchase = group
        price = self.prices.hourly(itype, region, spot=purchase == "spot")
        with self._lock:
            self._price_cache[group] = price
        return price

    def _ebs(self, region: str) -> Optional[float]:
        with self._lock:
            if region in self._ebs_cache:
                return self._ebs_cache[region]
        value = self.prices.ebs_gb_month(region)
        with self._lock:
            self._ebs_cache[region] = value
        return value

    def _local_groups(self) -> set[Group]:
        with self._lock:
            return {m.group for m in self._machines.values() if m.local}

    def _breakdown(self) -> tuple[float, list[tuple[Group, float, Optional[Price], float]],
                                  float, list[str]]:
        """(total, [(group, seconds, price, usd)], storage usd, unknown storage regions)."""
        seconds = self.seconds_by_group()
        local = self._local_groups()
        rows: list[tuple[Group, float, Optional[Price], float]] = []
        total = storage = 0.0
        unknown_storage: list[str] = []
        for group, secs in sorted(seconds.items()):
            if group in local:
                rows.append((group, secs, Price(0.0, "your own machine"), 0.0))
                continue
            price = self._price(group)
            usd = 0.0 if price is None else secs / 3600.0 * price.usd_per_hour
            total += usd
            rows.append((group, secs, price, usd))
            if self.storage_gb_per_machine:
                per_gb = self._ebs(group[1])
                if per_gb is None:
                    if group[1] not in unknown_storage:
                        unknown_storage.append(group[1])
                else:
                    storage += self.storage_gb_per_machine * per_gb * secs / SECONDS_PER_MONTH
        return total + storage, rows, storage, unknown_storage

    def _kept_cost(self, kept: Sequence[str], keepalive: float) -> float:
        """What machines left running for ``keepalive`` seconds cost at most (known
        prices only)."""
        with self._lock:
            groups = [self._machines[i].group for i in kept if i in self._machines]
        prices = [self._price(group) for group in groups]
        return sum(p.usd_per_hour for p in prices if p is not None) * keepalive / 3600.0

    def receipt(self, deleted: Optional[Mapping[str, int]] = None,
                wall_seconds: Optional[float] = None, left: Optional[int] = None,
                kept: Sequence[str] = (), keepalive: float = 0.0) -> str:
        """The cost summary at shutdown: one line, then the detail behind it.

        e.g. ``2000 machines (1000 c7g.large spot, 1000 c7i.large), 3m12s, ≈ $1.39,
        0 resources left``.

        Args:
            deleted: kind -> count of what the teardown deleted
                (``TeardownSummary.deleted``).
            wall_seconds: how long the fleet ran (default: first start to last stop).
            left: resources still present after the teardown
                (``len(TeardownSummary.remaining)``); omitted when None.
            kept: ids of a named fleet's machines left running for reuse, and
                ``keepalive`` the seconds they stay on without a client (not in the
                total: the receipt says the most they can add).

        Returns:
            The first line is the summary; the following lines (indented) give
            instance-seconds x price per type, region and purchase option, storage,
            unknown prices and what was deleted.
        """
        total, rows, storage, unknown_storage = self._breakdown()
        with self._lock:
            machines = list(self._machines.values())
        if wall_seconds is None:
            now = self._clock()
            wall_seconds = (max((m.stopped if m.stopped is not None else now)
                                for m in machines) - min(m.started for m in machines)
                            if machines else 0.0)
        counts: dict[tuple[str, str], int] = {}
        for machine in machines:
            itype, _, purchase = machine.group
            key = (itype, "" if machine.local else purchase)
            counts[key] = counts.get(key, 0) + 1
        kinds = ", ".join(f"{n} {itype}" + (" spot" if purchase == "spot" else "")
                          for (itype, purchase), n in sorted(counts.items()))
        unknown = [(g, s) for g, s, p, _ in rows if p is None]
        all_local = bool(machines) and all(m.local for m in machines)
        if all_local:
            money = "$0 (your own machines)"
        else:
            money = f"≈ {format_usd(total)}"
            if unknown:
                money += " + unknown for " + ", ".join(
                    f"{sum(1 for m in machines if m.group == g)} {g[0]} in {g[1]}"
                    for g, _ in unknown)
        parts = [f"{len(machines)} machine{'s' if len(machines) != 1 else ''}"
                 + (f" ({kinds})" if kinds else ""), format_duration(wall_seconds), money]
        if left is not None:
            parts.append(f"{left} resource{'s' if left != 1 else ''} left")
        if kept:
            parts.append(f"{len(kept)} machine{'s' if len(kept) != 1 else ''} kept warm "
                         f"for {format_duration(keepalive)} (at most "
                         f"≈ {format_usd(self._kept_cost(kept, keepalive))} more)")
        lines = [", ".join(parts)]
        for (itype, region, purchase), secs, price, usd in rows:
            if price is not None and price.source == "your own machine":
                lines.append(f"  {itype}: {secs / 3600:.3f} machine-hours, $0 (your own "
                             "machines cost vmexec's estimate nothing)")
            elif price is None:
                lines.append(f"  {itype} {purchase} in {region}: {secs / 3600:.3f} "
                             "instance-hours, price UNKNOWN (not counted; see `vmexec prices "
                             f"{itype} --regions {region}`)")
            else:
                lines.append(f"  {itype} {purchase} in {region}: {secs / 3600:.3f} "
                             f"instance-hours x {format_usd(price.usd_per_hour)}/h = "
                             f"{format_usd(usd)} ({price.source})")
        if self.storage_gb_per_machine and not all_local:
            line = (f"  storage: {self.storage_gb_per_machine:g} GB gp3 per machine = "
                    f"{format_usd(storage)}")
            if unknown_storage:
                line += f"; price unknown in {', '.join(unknown_storage)} (not counted)"
            lines.append(line)
        if deleted is not None:
            done = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(deleted.items()) if n)
            lines.append(f"  deleted: {done or 'nothing'}")
        return "\n".join(lines)


# --- leftovers of earlier runs -------------------------------------------------------------

class _HasLeftovers(Protocol):
    def leftovers(self) -> Sequence[Leftover]: ...


def find_leftovers(provider: _HasLeftovers) -> list[str]:
    """Human lines about vmexec resources of earlier runs still alive where ``provider``
    runs (its ``leftovers()`` hook: by tag, this fleet left out).

    One line per fleet: its id, name, owner, age, what it holds and where, and the
    ``vmexec cleanup`` command that removes it. A failed query becomes a line too: this
    feeds a warning at start-up and must not stop it.

    Returns:
        The lines; empty when nothing is left.
    """
    try:
        found = provider.leftovers()
    except VMExecError as exc:
        log.warning("could not look for leftover vmexec resources: %s", exc)
        return [f"could not look for vmexec resources left by earlier runs ({exc}); "
                "`vmexec ls` lists them"]
    by_fleet: dict[str, list[Leftover]] = {}
    for resource in found:
        by_fleet.setdefault(resource.fleet or "?", []).append(resource)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = []
    for fleet, items in sorted(by_fleet.items()):
        kinds: dict[str, int] = {}
        for item in items:
            kinds[item.kind] = kinds.get(item.kind, 0) + 1
        ages = [a for a in (item.age(now) for item in items) if a is not None]
        age = f", {format_duration(max(ages).total_seconds())} old" if ages else ""
        names = {item.name for item in items if item.name}
        owners = {item.owner for item in items if item.owner}
        where = sorted({item.region for item in items})
        held = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(kinds.items()))
        command = (f"vmexec cleanup --fleet {fleet} " if fleet != "?" else "vmexec cleanup ")
        command += " ".join(f"--region {r}" for r in where) + " --yes"
        lines.append(
            f"vmexec fleet {fleet}" + (f" ({', '.join(sorted(names))})" if names else "")
            + (f" of {', '.join(sorted(owners))}" if owners else "") + age
            + f" still has {held} in {', '.join(where)}: remove with `{command}`")
    return lines
