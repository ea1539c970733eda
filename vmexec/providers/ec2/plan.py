"""The fleet plan: how many machines of which type, in which region, for ``max_workers``.

Pure functions over facts gathered from EC2 (``fleet.describe_region`` fetches them):
what each instance type is (``DescribeInstanceTypes``: architecture, vCPUs, memory,
GPUs), where it is offered (``DescribeInstanceTypeOfferings`` per availability zone) and
which zones have a default subnet. From them:

* ``check_regions`` and ``make_plan`` raise ``ConfigError`` — before anything is created —
  for an unknown region or one not enabled for the account, an unknown instance type
  (with close names), a type not offered in a region, and an ``arm=`` filter that leaves
  nothing; each message lists the alternatives.
* ``make_plan`` sizes the fleet: slots are split evenly across regions, and within a
  region evenly across its types (machine by machine, so the plan never overshoots by
  more than one machine per line).
* ``allocate`` picks the machines for one ``launch(slots)`` call: the fleet grows with
  demand, in the same even order, up to the plan.

Prices are not looked up here: ``Plan.set_prices`` takes the per-machine hourly prices the
guardrails' ``PriceBook`` gave (the provider looks them up) and fills ``PlanLine.hourly_cost``
(the whole line's $/h); a line whose price is unknown keeps None and ``Plan.text`` says so.

Imports only the standard library and ``vmexec.errors``: no boto3 (facts come in as data).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

from vmexec.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "TypeInfo",
    "RegionFacts",
    "PlanLine",
    "Plan",
    "as_name_list",
    "check_regions",
    "make_plan",
    "allocate",
]

#: The CPU architectures vmexec can build an environment for.
ARCHITECTURES = ("arm64", "x86_64")


@dataclasses.dataclass(frozen=True)
class TypeInfo:
    """What vmexec needs to know about an instance type."""

    name: str
    arch: str
    vcpus: int
    memory_mib: int
    gpus: int = 0
    gpu_model: str = ""

    @classmethod
    def from_api(cls, item: Mapping[str, Any]) -> "TypeInfo":
        """Build from one entry of ``DescribeInstanceTypes``' ``InstanceTypes``.

        Raises:
            ConfigError: the type runs on no architecture vmexec supports.
        """
        name = item["InstanceType"]
        supported = item.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        # Some older types list both i386 and x86_64; mac types list x86_64_mac.
        archs = [a for a in ARCHITECTURES if a in supported]
        if not archs:
            raise ConfigError(
                f"instance_type {name!r} runs on {', '.join(supported) or 'no listed'} "
                f"architecture; vmexec supports {' and '.join(ARCHITECTURES)} types"
            )
        gpu_info = item.get("GpuInfo", {}).get("Gpus", [])
        gpus = sum(int(g.get("Count", 0)) for g in gpu_info)
        model = ", ".join(f"{g.get('Manufacturer', '')} {g.get('Name', '')}".strip()
                          for g in gpu_info)
        return cls(
            name=name,
            arch="x86_64" if "x86_64" in archs else "arm64",
            vcpus=int(item.get("VCpuInfo", {}).get("DefaultVCpus", 1)),
            memory_mib=int(item.get("MemoryInfo", {}).get("SizeInMiB", 0)),
            gpus=gpus,
            gpu_model=model,
        )


@dataclasses.dataclass(frozen=True)
class RegionFacts:
    """What one region offers, for the instance types asked about.

    Attributes:
        region: the region name.
        types: the asked-for types that exist in this region.
        unknown: asked-for types this region says do not exist.
        zones: type -> zones offering it (sorted).
        subnets: zone -> default subnet id (only zones with one can be used).
        offered_names: every type name offered in the region; fetched only when some
            asked-for type is unknown, to suggest close names.
        vpc_id: the default VPC (where the fleet's security group goes).
    """

    region: str
    types: Mapping[str, TypeInfo]
    unknown: tuple[str, ...] = ()
    zones: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    subnets: Mapping[str, str] = dataclasses.field(default_factory=dict)
    offered_names: tuple[str, ...] = ()
    vpc_id: str = ""

    def usable_zones(self, instance_type: str) -> tuple[str, ...]:
        """Zones that offer ``instance_type`` and have a default subnet."""
        return tuple(z for z in self.zones.get(instance_type, ()) if z in self.subnets)


@dataclasses.dataclass
class PlanLine:
    """Machines of one instance type in one region."""

    region: str
    instance_type: str
    arch: str
    vcpus: int
    memory_mib: int
    gpus: int
    slots_per_machine: int
    machines: int
    zones: tuple[str, ...]
    #: The whole line's USD per hour (machines x price); None: unknown or not priced yet.
    hourly_cost: Optional[float] = None
    #: USD per hour of one machine of this line, and where the figure came from.
    machine_price: Optional[float] = None
    price_source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.region, self.instance_type)

    @property
    def slots(self) -> int:
        return self.machines * self.slots_per_machine


@dataclasses.dataclass
class Plan:
    """The fleet to build: one line per (region, instance type).

    Lines with zero machines are kept: they are the fallback candidates when the
    planned lines run out of capacity.
    """

    max_workers: int
    spot: bool
    lines: list[PlanLine]
    #: Whether ``set_prices`` ran (then a line without a price is "unknown", not "-").
    priced: bool = False

    @property
    def total_machines(self) -> int:
        return sum(line.machines for line in self.lines)

    @property
    def total_slots(self) -> int:
        return sum(line.slots for line in self.lines)

    @property
    def regions(self) -> list[str]:
        return list(dict.fromkeys(line.region for line in self.lines))

    @property
    def hourly_cost(self) -> Optional[float]:
        """The plan's cost per hour when every line has a price, else None."""
        costs = [line.hourly_cost for line in self.lines if line.machines]
        if not costs or any(c is None for c in costs):
            return None
        return float(sum(c for c in costs if c is not None))

    @property
    def unknown_prices(self) -> list[str]:
        """``"<type> in <region>"`` for each line with machines whose price is unknown."""
        return [f"{line.instance_type} in {line.region}" for line in self.lines
                if line.machines and line.hourly_cost is None]

    def set_prices(self, prices: Mapping[tuple[str, str], Optional[tuple[float, str]]]) -> None:
        """Fill ``hourly_cost`` of every line from per-machine prices.

        Args:
            prices: ``(region, instance_type)`` -> ``(USD per machine-hour, source)``, or
                None (or missing) when the price is unknown.
        """
        self.priced = True
        for line in self.lines:
            found = prices.get(line.key)
            if found is None:
                line.hourly_cost = line.machine_price = None
                line.price_source = ""
                continue
            line.machine_price, line.price_source = float(found[0]), found[1]
            line.hourly_cost = line.machine_price * line.machines

    def line(self, region: str, instance_type: str) -> PlanLine:
        """The line for ``(region, instance_type)``.

        Raises:
            KeyError: no such line.
        """
        for line in self.lines:
            if line.key == (region, instance_type):
                return line
        raise KeyError((region, instance_type))

    def text(self) -> str:
        """A table for logs and for the user, one row per line, with its $/h."""
        purchase = "spot first, on-demand where spot is short" if self.spot else "on-demand"
        cost = self.hourly_cost
        unknown = self.unknown_prices
        if cost is not None:
            price = f", about {_usd(cost)}/h"
        elif unknown and any(line.hourly_cost is not None for line in self.lines):
            known = sum(line.hourly_cost or 0.0 for line in self.lines if line.machines)
            price = f", about {_usd(known)}/h plus unknown prices"
        else:
            price = ""
        header = (f"vmexec plan: {self.total_machines} machine(s), {self.total_slots} slots "
                  f"for max_workers={self.max_workers} in {len(self.regions)} region(s), "
                  f"{purchase}{price}")
        rows = [("region", "type", "arch", "vCPUs", "GiB", "GPUs", "slots/machine",
                 "machines", "slots", "$/machine-h", "$/h", "zones")]
        priced = self.priced
        for line in self.lines:
            unknown_here = priced and line.machine_price is None
            rows.append((
                line.region, line.instance_type, line.arch, str(line.vcpus),
                f"{line.memory_mib / 1024:g}", str(line.gpus), str(line.slots_per_machine),
                str(line.machines), str(line.slots),
                "unknown" if unknown_here else
                "-" if line.machine_price is None else _usd(line.machine_price),
                "unknown" if unknown_here else
                "-" if line.hourly_cost is None else _usd(line.hourly_cost),
                ",".join(_short_zones(line.region, line.zones)),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        body = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                for row in rows]
        notes = []
        if priced and unknown:
            notes.append(f"price unknown for {', '.join(unknown)}: vmexec does not guess "
                         "(`vmexec prices TYPE --regions REGION`)")
        sources = sorted({line.price_source for line in self.lines if line.price_source})
        if sources:
            notes.append(f"prices: {'; '.join(sources)}")
        return "\n".join([header, *("  " + row for row in body), *("  " + n for n in notes)])


def _usd(value: float) -> str:
    # Cents from a dollar up; below it, up to five decimals (c7i.large is $0.08925/h).
    if value >= 1 or value == 0:
        return f"${value:,.2f}"
    text = f"{value:.5f}".rstrip("0")
    return "$" + (text + "0" if len(text.split(".")[1]) < 2 else text)


def _short_zones(region: str, zones: Sequence[str]) -> list[str]:
    # us-east-1a,us-east-1b -> us-east-1a,b: keeps the table narrow.
    out = []
    for i, zone in enumerate(zones):
        out.append(zone if i == 0 or not zone.startswith(region) else zone[len(region):])
    return out


def as_name_list(value: Any, argument: str, example: str) -> list[str]:
    """Accept one name or a list of names; return a de-duplicated list.

    Raises:
        ConfigError: not a non-empty string or sequence of non-empty strings.
    """
    names = [value] if isinstance(value, str) else value
    if names is None or isinstance(names, (bytes, Mapping)) or not hasattr(names, "__iter__"):
        raise ConfigError(f"{argument} must be a string or a list of strings such as "
                          f"{example}, not {value!r}")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{argument} must contain non-empty strings such as {example}, "
                              f"not {name!r}")
        if name.strip() not in out:
            out.append(name.strip())
    if not out:
        raise ConfigError(f"{argument} must name at least one, e.g. {example}")
    return out


def _close(name: str, candidates: Iterable[str], n: int = 4) -> list[str]:
    return difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.6)


def check_regions(requested: Sequence[str], available: Mapping[str, str]) -> None:
    """Refuse regions that do not exist or are not enabled for the account.

    Args:
        requested: the ``regions=`` names.
        available: every region name -> its ``OptInStatus`` from ``DescribeRegions``
            (``"opt-in-not-required"``, ``"opted-in"`` or ``"not-opted-in"``).

    Raises:
        ConfigError: naming the region, close names, and the enabled regions.
    """
    enabled = sorted(r for r, status in available.items() if status != "not-opted-in")
    for region in requested:
        if region not in available:
            close = _close(region, available)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"regions: {region!r} is not an AWS region.{hint} Regions "
                              f"enabled for this account: {', '.join(enabled)}")
        if available[region] == "not-opted-in":
            raise ConfigError(
                f"regions: {region!r} is not enabled for this AWS account: enable it in the "
                "console (Account -> AWS Regions) or with `aws account enable-region "
                f"--region-name {region}`, or choose one of: {', '.join(enabled)}")


def make_plan(
    facts: Mapping[str, RegionFacts],
    instance_types: Sequence[str],
    regions: Sequence[str],
    *,
    max_workers: int,
    arm: Optional[bool] = None,
    spot: bool = False,
    slots_per_machine: Optional[int] = None,
) -> Plan:
    """Size the fleet for ``max_workers`` slots over ``regions`` x ``instance_types``.

    Args:
        facts: region -> what it offers (for every region in ``regions``).
        instance_types: the ``instance_type=`` names, in the user's order.
        regions: the ``regions=`` names, in the user's order.
        max_workers: slots wanted in total.
        arm: True keeps only arm64 types, False only x86_64, None keeps all.
        spot: recorded in the plan (purchase option tried first).
        slots_per_machine: slots on each machine; None: its vCPU count.

    Returns:
        The plan; every (region, type) pair that survives the filters has a line.

    Raises:
        ConfigError: an unknown type, a type not offered in a region, or an ``arm``
            filter that leaves nothing; the message lists the alternatives.
    """
    _check_types_exist(facts, instance_types, regions)
    infos = {t: next(facts[r].types[t] for r in regions if t in facts[r].types)
             for t in instance_types}
    kept = [t for t in instance_types if arm is None or (infos[t].arch == "arm64") == arm]
    if not kept:
        wanted = "arm64" if arm else "x86_64"
        listed = ", ".join(f"{t} ({infos[t].arch})" for t in instance_types)
        example = "c7g.large" if arm else "c7i.large"
        raise ConfigError(
            f"arm={arm} leaves no instance type: {listed}. Add an {wanted} type to "
            f"instance_type= (e.g. {example!r}) or set arm=None to use the types as listed")
    for region in regions:
        for instance_type in kept:
            if not facts[region].usable_zones(instance_type):
                raise _not_offered(facts, region, instance_type, kept, regions)
    lines = []
    for instance_type in kept:  # type-major here; allocation interleaves regions
        for region in regions:
            info = facts[region].types[instance_type]
            lines.append(PlanLine(
                region=region, instance_type=instance_type, arch=info.arch,
                vcpus=info.vcpus, memory_mib=info.memory_mib, gpus=info.gpus,
                slots_per_machine=slots_per_machine or info.vcpus, machines=0,
                zones=facts[region].usable_zones(instance_type),
            ))
    plan = Plan(max_workers=max_workers, spot=spot, lines=lines)
    for key, count in allocate(plan, {}, max_workers, cap=False).items():
        plan.line(*key).machines = count
    return plan


def _check_types_exist(facts: Mapping[str, RegionFacts], instance_types: Sequence[str],
                       regions: Sequence[str]) -> None:
    for instance_type in instance_types:
        if any(instance_type in facts[r].types for r in regions):
            continue
        offered = {n for r in regions for n in facts[r].offered_names}
        close = _close(instance_type, offered)
        hint = (f" Close names: {', '.join(close)}." if close else
                " See `aws ec2 describe-instance-types` or the EC2 instance types page.")
        raise ConfigError(f"instance_type: {instance_type!r} is not an EC2 instance type in "
                          f"{', '.join(regions)}.{hint}")


def _not_offered(facts: Mapping[str, RegionFacts], region: str, instance_type: str,
                 kept: Sequence[str], regions: Sequence[str]) -> ConfigError:
    where = [r for r in regions if facts[r].usable_zones(instance_type)]
    here = [t for t in kept if facts[region].usable_zones(t)]
    region_facts = facts[region]
    if region_facts.zones.get(instance_type):
        why = (f"is offered in {region} only in zones without a default subnet "
               f"({', '.join(region_facts.zones[instance_type])})")
    else:
        why = f"is not offered in {region}"
    choices = []
    if where:
        choices.append(f"drop {region!r} from regions= ({instance_type} is offered in "
                       f"{', '.join(where)})")
    if here:
        choices.append(f"use only types offered there ({', '.join(here)})")
    choices.append("pick another instance_type= for that region")
    return ConfigError(f"instance_type: {instance_type} {why}: {'; or '.join(choices)}")


def allocate(plan: Plan, live: Mapping[tuple[str, str], int], slots: int, *,
             cap: bool = True) -> dict[tuple[str, str], int]:
    """Choose machines adding at least ``slots`` slots, spread evenly.

    Machines are added one at a time to the region with the fewest slots so far, and in
    it to the type with the fewest slots, so regions and architectures stay balanced
    however small the request.

    Args:
        plan: the plan (its lines are the candidates).
        live: machines already running or booting per ``(region, type)``.
        slots: slots to add.
        cap: keep each line at or below its planned machines (growth); False sizes the
            plan itself.

    Returns:
        ``(region, type) -> machines to add`` (only lines that get some).
    """
    counts = {line.key: live.get(line.key, 0) for line in plan.lines}
    region_slots: dict[str, int] = {}
    for line in plan.lines:
        region_slots[line.region] = region_slots.get(line.region, 0) + \
            counts[line.key] * line.slots_per_machine
    added: dict[tuple[str, str], int] = {}
    order = {region: i for i, region in enumerate(plan.regions)}
    remaining = slots
    while remaining > 0:
        open_lines = [line for line in plan.lines
                      if not cap or counts[line.key] < line.machines]
        if not open_lines:
            break
        region = min({line.region for line in open_lines},
                     key=lambda r: (region_slots[r], order[r]))
        line = min((ln for ln in open_lines if ln.region == region),
                   key=lambda ln: (counts[ln.key] * ln.slots_per_machine,
                                   plan.lines.index(ln)))
        counts[line.key] += 1
        added[line.key] = added.get(line.key, 0) + 1
        region_slots[region] += line.slots_per_machine
        remaining -= line.slots_per_machine
    return added


def machines_for(slots: int, slots_per_machine: int) -> int:
    """Machines of ``slots_per_machine`` slots needed for ``slots`` slots."""
    return max(1, math.ceil(slots / max(1, slots_per_machine)))
