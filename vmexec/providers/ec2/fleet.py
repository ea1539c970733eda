"""Launching machines: what regions offer, batched launches, capacity fallback.

Owns two steps of a machine's life on EC2 (waiting for it to run is ``watch.py``):

* **Discovery** (``describe_region``): per region, a handful of calls whatever the fleet
  size — ``DescribeInstanceTypes`` (one batched call for all types),
  ``DescribeInstanceTypeOfferings`` (per zone) and the default subnets — turned into
  ``plan.RegionFacts``.
* **Launch** (``Launcher``): one ``CreateFleet`` call of type ``instant`` per
  (region, instance type, purchase option) group, with one override per availability
  zone, never one call per machine; regions launch at once (``clients.in_every_region``).

Capacity is normal, not exceptional. For each group that comes back short, the shortfall
moves on, in this order::

    another zone (the zones CreateFleet reported failing are dropped; same call again)
      -> another instance type in the same region
        -> another region
          -> on-demand, when spot=True and spot is short everywhere (same order again)

driven by the error codes of ``errors.classify``: ``InsufficientInstanceCapacity``,
``Unsupported``, ``SpotMaxPriceTooLow``, ``InsufficientCapacity``, ... and a fleet's
partial result (its ``Errors`` list). Throttling is retried by the client
(``clients.RetryingClient``; the request carries a ``ClientToken`` so that a retried call
cannot launch twice). Quota errors stop the
launch with a ``QuotaError``; anything else stops it with the translated error. When no
candidate has capacity at all, ``CapacityError``. Every group fails at most once per
launch, so the number of calls is bounded by (regions x types x zones x purchase options),
not by machines.

Faults are injected in tests through botocore events (``vmexec.testing.faults``).

Imports boto3/botocore error types; lives under ``providers/ec2``. Must not import the
scheduler or the executor.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from typing import Any, Callable, Mapping, Optional, Sequence

from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.errors import ConfigError, VMExecError
from vmexec.providers.base import MachineRecord, MachineState
from vmexec.providers.ec2 import errors as ec2_errors
from vmexec.providers.ec2.clients import in_every_region, retrying
from vmexec.providers.ec2.images import ImageInfo
from vmexec.providers.ec2.plan import Plan, RegionFacts, TypeInfo, machines_for

__all__ = [
    "RegionClients",
    "RegionLaunchSetup",
    "describe_regions",
    "describe_region",
    "Launcher",
    "LaunchReport",
    "MAX_INSTANCES_PER_CALL",
]

log = logging.getLogger(__name__)

#: Instances asked for in one CreateFleet call; bigger groups are split. (AWS advises
#: splitting very large launches; moto and AWS both answer faster in chunks.)
MAX_INSTANCES_PER_CALL = 500



@dataclasses.dataclass
class RegionClients:
    """The clients of one region (boto3 clients are thread-safe; sessions are not)."""

    region: str
    ec2: Any
    ssm: Any


@dataclasses.dataclass
class RegionLaunchSetup:
    """What launching in a region needs, created once per fleet and region.

    Attributes:
        region: the region.
        launch_template_id: the fleet's launch template there.
        images: ``(arch, gpu) -> ImageInfo``.
        subnets: zone -> default subnet id.
        block_devices: per image id, the root volume mapping to put in each override
            (only when images in the region disagree on the root device; else the
            launch template carries it).
    """

    region: str
    launch_template_id: str
    images: Mapping[tuple[str, bool], ImageInfo]
    subnets: Mapping[str, str]
    block_devices: Mapping[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)


# --- discovery ----------------------------------------------------------------------

def describe_regions(ec2: Any) -> dict[str, str]:
    """Every region name -> its opt-in status (one ``DescribeRegions`` call).

    Raises:
        VMExecError/ConfigError: the call failed (credentials, permissions).
    """
    ec2 = retrying(ec2)  # a client of the CLI too: its calls retry throttling
    answer = ec2_errors.call("DescribeRegions", ec2.meta.region_name, ec2.describe_regions,
                             AllRegions=True)
    return {r["RegionName"]: r.get("OptInStatus", "opt-in-not-required")
            for r in answer.get("Regions", [])}


def describe_region(clients: RegionClients, instance_types: Sequence[str]) -> RegionFacts:
    """Gather what ``clients.region`` offers for ``instance_types``.

    Calls: ``DescribeInstanceTypes`` (one per 100 types), ``DescribeInstanceTypeOfferings``
    (zones; paginated), ``DescribeSubnets`` (default subnets). Only when a type is
    unknown, the region's full list of type names (for suggestions).

    Raises:
        ConfigError: the region has no default VPC (the message says how to create one).
        VMExecError: an API call failed.
    """
    region, ec2 = clients.region, clients.ec2
    types: dict[str, TypeInfo] = {}
    unknown: list[str] = []
    offered_names: tuple[str, ...] = ()
    try:
        for start in range(0, len(instance_types), 100):
            chunk = list(instance_types[start:start + 100])
            try:
                answer = ec2.describe_instance_types(InstanceTypes=chunk)
            except ClientError as exc:
                if retry.error_code(exc) != "InvalidInstanceType":
                    raise
                # Which ones? Ask for the region's names once, then describe the rest.
                offered_names = _offered_type_names(ec2, region)
                known = [t for t in chunk if t in offered_names]
                unknown += [t for t in chunk if t not in offered_names]
                answer = (ec2.describe_instance_types(InstanceTypes=known)
                          if known else {"InstanceTypes": []})
            for item in answer.get("InstanceTypes", []):
                info = TypeInfo.from_api(item)
                types[info.name] = info
        zones: dict[str, list[str]] = {}
        if types:
            paginator = ec2.get_paginator("describe_instance_type_offerings")
            for page in paginator.paginate(
                    LocationType="availability-zone",
                    Filters=[{"Name": "instance-type", "Values": sorted(types)}]):
                for offer in page.get("InstanceTypeOfferings", []):
                    zones.setdefault(offer["InstanceType"], []).append(offer["Location"])
        subnets_answer = ec2.describe_subnets(
            Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    except ClientError as exc:
        raise ec2_errors.translate(exc, operation=exc.operation_name, region=region) from exc
    default_subnets = [s for s in subnets_answer.get("Subnets", [])
                       if s.get("State", "available") == "available"]
    subnets = {s["AvailabilityZone"]: s["SubnetId"] for s in default_subnets}
    if not subnets:
        raise ConfigError(
            f"regions: {region} has no default VPC (or it has no default subnets), which "
            "vmexec launches into. Create one with `aws ec2 create-default-vpc --region "
            f"{region}`, or drop {region!r} from regions=")
    return RegionFacts(
        region=region, types=types, unknown=tuple(unknown),
        zones={t: tuple(sorted(z)) for t, z in zones.items()}, subnets=subnets,
        offered_names=offered_names,
        vpc_id=str(default_subnets[0]["VpcId"]),
    )


def _offered_type_names(ec2: Any, region: str) -> tuple[str, ...]:
    names: set[str] = set()
    paginator = ec2.get_paginator("describe_instance_type_offerings")
    for page in paginator.paginate(LocationType="region"):
        names.update(o["InstanceType"] for o in page.get("InstanceTypeOfferings", []))
    return tuple(sorted(names))


# --- launching ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Group:
    region: str
    instance_type: str
    purchase: str  # "spot" | "on-demand"

    def __str__(self) -> str:
        return f"{self.instance_type} {self.purchase} in {self.region}"


@dataclasses.dataclass
class LaunchReport:
    """The outcome of one ``Launcher.launch`` call.

    Attributes:
        records: the machines started.
        shortfall: machines asked for and not started (no capacity anywhere).
        problems: what went wrong on the way (fallbacks taken), for the log.
        calls: CreateFleet calls made.
    """

    records: list[MachineRecord]
    shortfall: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    calls: int = 0


class Launcher:
    """Starts machines for a set of (region, type) wants, falling back on capacity errors.

    Args:
        plan: the fleet plan (its lines are the fallback candidates, in order).
        type_infos: instance type -> what it is.
        clients: region -> its clients.
        setup: region -> launch setup; called (once per region, from the region's
            thread) before the first launch there; may create resources.
        spot: try spot first, then on-demand.
        on_created: called with each batch of records as soon as EC2 returns them, so
            the caller can destroy them even if the launch fails later.
        slots_per_machine: the plan's slots per machine for each type.
    """

    def __init__(
        self,
        plan: Plan,
        type_infos: Mapping[str, TypeInfo],
        clients: Mapping[str, RegionClients],
        setup: Callable[[str], RegionLaunchSetup],
        *,
        spot: bool,
        on_created: Callable[[list[MachineRecord]], None],
        provider_name: str = "ec2",
    ) -> None:
        self.plan = plan
        self.type_infos = type_infos
        self.clients = clients
        self.setup = setup
        self.spot = spot
        self.on_created = on_created
        self.provider_name = provider_name
        self._rotation: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def slots(self, instance_type: str) -> int:
        for line in self.plan.lines:
            if line.instance_type == instance_type:
                return line.slots_per_machine
        return self.type_infos[instance_type].vcpus

    # -- the fallback loop ---------------------------------------------------------
    def launch(self, wants: Mapping[tuple[str, str], int]) -> LaunchReport:
        """Start ``wants[(region, type)]`` machines, falling back where capacity is short.

        Returns:
            What was started (possibly less than asked: see ``shortfall``).

        Raises:
            QuotaError: an account quota stopped the launch.
            CapacityError: nothing at all could be started.
            VMExecError, ConfigError: any other error (translated).
            Records already started were handed to ``on_created`` before any raise.
        """
        state = _LaunchState()
        report = LaunchReport(records=[])
        purchases = ["spot", "on-demand"] if self.spot else ["on-demand"]
        pending = {k: n for k, n in wants.items() if n > 0}
        for purchase in purchases:
            current = dict(pending)
            pending = {}
            while current:
                shortfalls = self._round(current, purchase, state, report)
                current, leftover = self._reassign(shortfalls, purchase, state)
                for key, count in leftover.items():
                    pending[key] = pending.get(key, 0) + count
            if not pending:
                break
            if purchase == "spot" and len(purchases) > 1:
                missing = sum(pending.values())
                report.problems.append(f"spot capacity short for {missing} machine(s); "
                                       "trying on-demand")
                log.warning("spot capacity short for %d machine(s): falling back to "
                            "on-demand", missing)
        report.shortfall = sum(pending.values())
        if not report.records and report.shortfall:
            raise ec2_errors.capacity_error([str(g) for g in state.tried], state.codes)
        return report

    def _round(self, wants: Mapping[tuple[str, str], int], purchase: str,
               state: "_LaunchState", report: LaunchReport) -> dict[tuple[str, str], int]:
        """Launch every want once (regions in parallel); return the shortfall per want."""
        by_region: dict[str, list[tuple[str, int]]] = {}
        for (region, instance_type), count in wants.items():
            by_region.setdefault(region, []).append((instance_type, count))
        shortfalls: dict[tuple[str, str], int] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run_region(region: str) -> None:
            for instance_type, count in by_region[region]:
                group = _Group(region, instance_type, purchase)
                try:
                    missing = self._launch_group(group, count, state, report)
                except BaseException as exc:  # collected: other regions must finish first
                    with lock:
                        errors.append(exc)
                    return
                if missing:
                    with lock:
                        shortfalls[(region, instance_type)] = missing

        in_every_region(run_region, by_region, name="vmexec-ec2-launch")
        if errors:
            # A quota error explains more than whatever else failed meanwhile.
            errors.sort(key=lambda e: not isinstance(e, ec2_errors.QuotaError))
            raise errors[0]
        return shortfalls

    def _reassign(self, shortfalls: Mapping[tuple[str, str], int], purchase: str,
                  state: "_LaunchState") -> tuple[dict[tuple[str, str], int],
                                                  dict[tuple[str, str], int]]:
        """Move each shortfall to the next candidate: same region's types, then regions.

        Returns:
            (new wants for this purchase option, leftovers for the next option).
        """
        again: dict[tuple[str, str], int] = {}
        leftover: dict[tuple[str, str], int] = {}
        for (region, instance_type), missing in shortfalls.items():
            slots = missing * self.slots(instance_type)
            target = self._next_candidate(region, instance_type, purchase, state)
            if target is None:
                leftover[(region, instance_type)] = missing
                continue
            count = machines_for(slots, self.slots(target[1]))
            again[target] = again.get(target, 0) + count
            log.info("%d machine(s) of %s in %s had no capacity (%s): trying %d of %s in %s",
                     missing, instance_type, region, purchase, count, target[1], target[0])
        return again, leftover

    def _next_candidate(self, region: str, instance_type: str, purchase: str,
                        state: "_LaunchState") -> Optional[tuple[str, str]]:
        lines = self.plan.lines
        same_region = [ln for ln in lines if ln.region == region]
        other_regions = [ln for ln in lines if ln.region != region]
        for line in same_region + other_regions:
            if _Group(line.region, line.instance_type, purchase) not in state.failed:
                return line.key
        return None

    # -- one group: one CreateFleet call per chunk, zone fallback within -------------
    def _launch_group(self, group: _Group, count: int, state: "_LaunchState",
                      report: LaunchReport) -> int:
        """Launch ``count`` machines of ``group``; return how many could not be started."""
        setup = self.setup(group.region)
        info = self.type_infos[group.instance_type]
        image = setup.images[(info.arch, info.gpus > 0)]
        line_zones = self.plan.line(group.region, group.instance_type).zones
        with state.lock:
            state.tried.append(group)
        missing = count
        while missing > 0:
            zones = [z for z in line_zones
                     if z in setup.subnets and (group, z) not in state.failed_zones]
            if not zones:
                break
            chunk = min(missing, MAX_INSTANCES_PER_CALL)
            started, zone_failures, group_failed = self._create_fleet(
                group, setup, image, zones, chunk, state)
            report.calls += 1
            if started:
                with state.lock:
                    report.records.extend(started)
                self.on_created(started)
            missing -= len(started)
            if len(started) < chunk and not zone_failures or group_failed:
                break  # no zone to drop: the group is out
        if missing > 0:
            with state.lock:
                state.failed.add(group)
        return missing

    def _create_fleet(self, group: _Group, setup: RegionLaunchSetup, image: ImageInfo,
                      zones: list[str], count: int, state: "_LaunchState"
                      ) -> tuple[list[MachineRecord], set[str], bool]:
        """One CreateFleet call. Returns (records, zones that failed, group failed)."""
        key = (group.region, group.instance_type)
        with self._lock:
            # Rotate the first zone between calls so that growth spreads over zones.
            turn = self._rotation.get(key, 0)
            self._rotation[key] = turn + 1
        ordered = zones[turn % len(zones):] + zones[:turn % len(zones)]
        zone_of_subnet = {setup.subnets[z]: z for z in ordered}
        overrides = []
        for priority, subnet_zone in enumerate(ordered):
            override: dict[str, Any] = {"InstanceType": group.instance_type,
                                        "SubnetId": setup.subnets[subnet_zone],
                                        "ImageId": image.image_id}
            if group.purchase == "on-demand":
                override["Priority"] = float(priority)
            if image.image_id in setup.block_devices:
                override["BlockDeviceMappings"] = setup.block_devices[image.image_id]
            overrides.append(override)
        request: dict[str, Any] = {
            "Type": "instant",
            # The same token on every retry: a throttled call that did go through
            # is not launched twice.
            "ClientToken": str(uuid.uuid4()),
            "LaunchTemplateConfigs": [{
                "LaunchTemplateSpecification": {"LaunchTemplateId": setup.launch_template_id,
                                                "Version": "$Latest"},
                "Overrides": overrides,
            }],
            "TargetCapacitySpecification": {"TotalTargetCapacity": count,
                                            "DefaultTargetCapacityType": group.purchase},
        }
        if group.purchase == "spot":
            request["SpotOptions"] = {"AllocationStrategy": "price-capacity-optimized"}
        else:
            request["OnDemandOptions"] = {"AllocationStrategy": "prioritized"}
        ec2 = self.clients[group.region].ec2
        try:
            answer = ec2.create_fleet(**request)
        except ClientError as exc:
            code = retry.error_code(exc)
            kind = ec2_errors.classify(code)
            if kind == "capacity":
                self._note(state, group, None, code, exc)
                return [], set(), True
            if kind == "quota":
                raise self._quota(exc, group, count) from exc
            raise ec2_errors.translate(exc, operation="CreateFleet",
                                       region=group.region) from exc
        records = []
        for entry in answer.get("Instances", []):
            overrides_used = entry.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
            placed = zone_of_subnet.get(overrides_used.get("SubnetId", ""))
            instance_type = entry.get("InstanceType", group.instance_type)
            info = self.type_infos.get(instance_type, self.type_infos[group.instance_type])
            for instance_id in entry.get("InstanceIds", []):
                records.append(MachineRecord(
                    id=instance_id,
                    label=f"{instance_id} ({placed or group.region} {instance_type})",
                    slots=self.slots(instance_type), provider=self.provider_name,
                    state=MachineState.PENDING, region=group.region, zone=placed,
                    instance_type=instance_type, arch=info.arch,
                    spot=entry.get("Lifecycle", group.purchase) == "spot",
                ))
        failed_zones: set[str] = set()
        group_failed = False
        for error in answer.get("Errors", []):
            code = error.get("ErrorCode")
            message = error.get("ErrorMessage", "")
            kind = ec2_errors.classify(code)
            subnet = error.get("LaunchTemplateAndOverrides", {}).get("Overrides", {}) \
                .get("SubnetId")
            failed = zone_of_subnet.get(subnet or "")
            if kind == "capacity":
                self._note(state, group, failed, code, message)
                if failed:
                    failed_zones.add(failed)
                else:
                    group_failed = True
            elif kind == "quota":
                raise self._quota(code, group, count, message)
            elif kind == "throttling":
                group_failed = True  # partial answer under throttling: let fallback retry
                self._note(state, group, failed, code, message)
            else:
                raise VMExecError(f"EC2 CreateFleet in {group.region} failed for "
                                  f"{group.instance_type}: {code}: {message}")
        with state.lock:
            state.failed_zones.update((group, z) for z in failed_zones)
        if len(records) < count:
            log.info("CreateFleet %s: %d of %d started%s", group, len(records), count,
                     f"; no capacity in {', '.join(sorted(failed_zones))}"
                     if failed_zones else "")
        return records, failed_zones, group_failed

    def _note(self, state: "_LaunchState", group: _Group, zone: Optional[str],
              code: Optional[str], detail: Any) -> None:
        where = f"{zone} " if zone else ""
        text = f"{code} for {group.instance_type} {group.purchase} in {where or group.region}"
        with state.lock:
            state.codes.append(f"{code}")
        log.info("%s: %s", text.strip(), detail)

    def _quota(self, exc_or_code: Any, group: _Group, count: int,
               message: str = "") -> ec2_errors.QuotaError:
        info = self.type_infos[group.instance_type]
        return ec2_errors.quota_error(exc_or_code, region=group.region,
                                      instance_type=group.instance_type,
                                      spot=group.purchase == "spot",
                                      vcpus_needed=count * info.vcpus, message=message)


@dataclasses.dataclass
class _LaunchState:
    """Bookkeeping of one launch call, shared by its region threads."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    failed: set[_Group] = dataclasses.field(default_factory=set)
    failed_zones: set[tuple[_Group, str]] = dataclasses.field(default_factory=set)
    tried: list[_Group] = dataclasses.field(default_factory=list)
    codes: list[str] = dataclasses.field(default_factory=list)
