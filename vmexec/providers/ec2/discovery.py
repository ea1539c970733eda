"""What AWS offers a fleet, found before anything is created: ``discover(options, ...)``.

::

    STS (owner) -> DescribeRegions (check the regions) -> per region, all at once:
    instance types, zones, default subnets -> Plan -> images per (arch, gpu) and region
    -> the plan priced -> a named fleet's machines left by an earlier run (adoptable)
    -> the environment captured, resolved and built per architecture of the plan

Every step is a describe call or local work: a wrong region, type, image or package is a
``ConfigError``/``EnvSyncError`` here, before the first resource exists (and before
anything costs money). ``EC2Provider`` keeps the ``Discovery`` it returns.

Lives under ``providers/ec2``. Must not import the scheduler, the executor, transports.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from vmexec.environment import PreparedEnvironment, prepare_environment
from vmexec.environment.preflight import manylinux_for_images
from vmexec.guardrails.pricing import PriceBook
from vmexec.providers.base import MachineRecord
from vmexec.providers.ec2 import resources
from vmexec.providers.ec2.clients import ClientFactory, in_every_region
from vmexec.providers.ec2.fleet import RegionClients, describe_region, describe_regions
from vmexec.providers.ec2.images import ImageInfo, check_root_volume, resolve_images
from vmexec.providers.ec2.named import Ledger, NamedFleetState, adopt, check_owner, \
    find_named, trust_recorded
from vmexec.providers.ec2.options import EC2Options
from vmexec.providers.ec2.plan import Plan, RegionFacts, TypeInfo, check_regions, make_plan
from vmexec.providers.ec2.userdata import named_fleet_directory

__all__ = ["Discovery", "discover"]

log = logging.getLogger(__name__)

Images = dict[str, dict[tuple[str, bool], ImageInfo]]  # region -> (arch, gpu) -> image


@dataclasses.dataclass
class Discovery:
    """What ``discover`` found.

    Attributes:
        owner: the caller's AWS identity (``vmexec:owner`` of what the fleet creates).
        clients: region -> its EC2 and SSM clients.
        facts: region -> what it offers (types, zones, subnets, VPC).
        plan: the priced plan at full scale.
        type_infos: instance type -> its facts.
        images: region -> (arch, gpu) -> image.
        named: a named fleet's resources found per region (empty for other fleets).
        adoptable: a named fleet's running machines this client may reuse.
        unwanted: region -> ids of a named fleet's machines the plan has no use for.
        ledger: a named fleet's record of the ids this computer launched.
        environment: what the machines install (None: the image's Python and pip).
    """

    owner: str
    clients: dict[str, RegionClients]
    facts: dict[str, RegionFacts]
    plan: Plan
    type_infos: dict[str, TypeInfo]
    images: Images
    named: dict[str, NamedFleetState] = dataclasses.field(default_factory=dict)
    adoptable: list[MachineRecord] = dataclasses.field(default_factory=list)
    unwanted: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    ledger: Optional[Ledger] = None
    environment: Optional[PreparedEnvironment] = None


def discover(options: EC2Options, aws: ClientFactory, prices: PriceBook, fleet_id: str,
             provider_name: str) -> Discovery:
    """Validate the options against AWS and plan the fleet (see the module docstring).

    Raises:
        ConfigError: a region, type or image is unknown or unavailable, the credentials
            are refused, or a named fleet belongs to someone else.
        EnvSyncError: the environment cannot be built for an architecture of the plan.
    """
    regions = list(options.regions)
    clients = {r: RegionClients(r, aws.ec2(r), aws.ssm(r)) for r in regions}
    # Who owns what this fleet creates: the AWS identity (STS), which nobody can claim
    # for another, so that `vmexec cleanup` deletes only the caller's own.
    owner = resources.caller_owner(aws.sts(options.home))
    check_regions(regions, describe_regions(aws.ec2(options.home)))
    instance_types = list(options.instance_type)
    facts: dict[str, RegionFacts] = in_every_region(
        lambda r: describe_region(clients[r], instance_types), regions,
        name="vmexec-ec2-describe")
    plan = make_plan(facts, instance_types, regions, max_workers=options.max_workers,
                     arm=options.arm, spot=options.spot,
                     slots_per_machine=options.slots_per_machine)
    type_infos = {t: info for f in facts.values() for t, info in f.types.items()}

    def images_for(region: str) -> dict[tuple[str, bool], ImageInfo]:
        wanted = {(line.arch, line.gpus > 0) for line in plan.lines if line.region == region}
        return resolve_images(clients[region].ssm, clients[region].ec2, region, wanted,
                              options.ami)

    images: Images = in_every_region(images_for, regions, name="vmexec-ec2-describe")
    for region, per_region in images.items():
        check_root_volume(per_region, options.root_volume_gb, region)
    _price(plan, prices, regions, options.spot)
    log.info("fleet %s plan:\n%s", fleet_id, plan.text())
    found = Discovery(owner=owner, clients=clients, facts=facts, plan=plan,
                      type_infos=type_infos, images=images)
    if options.name:
        # What an earlier run left running, to reuse (describe calls only). Only the ids
        # this computer's ledger recorded are adopted, never what merely carries the
        # fleet's tag.
        found.named = in_every_region(lambda r: find_named(clients[r].ec2, r, fleet_id),
                                      regions, name="vmexec-ec2-describe")
        check_owner(found.named, options.name, owner)
        found.ledger = Ledger(named_fleet_directory(fleet_id))
        trust_recorded(found.named, found.ledger, owner)
        planned = {(line.region, line.instance_type): type_infos[line.instance_type]
                   for line in plan.lines}
        slots = {line.instance_type: line.slots_per_machine for line in plan.lines}
        found.adoptable, found.unwanted = adopt(found.named, planned, slots.__getitem__,
                                                provider_name)
    # Capture, resolve per architecture and build before anything exists: a package
    # without a build for an arch of the plan is an EnvSyncError now, not on machine
    # 1,731.
    found.environment = prepare_environment(
        options.environment, sorted({line.arch for line in plan.lines}),
        exclude=options.exclude, env=options.env, forward_env=options.forward_env,
        index_url=options.index_url, find_links=options.find_links,
        # Wheels built for the images' own glibc (Amazon Linux 2023: 2.34) install there.
        manylinux=manylinux_for_images(
            f"{image.source} {image.name}" for per_region in images.values()
            for image in per_region.values()))
    return found


def _price(plan: Plan, prices: PriceBook, regions: list[str], spot: bool) -> None:
    """Fill the plan's $/h from ``prices``: every line, regions at once."""
    def region_prices(region: str) -> dict[tuple[str, str], Any]:
        found: dict[tuple[str, str], Any] = {}
        for line in plan.lines:
            if line.region == region:
                price = prices.hourly(line.instance_type, region, spot=spot)
                found[line.key] = None if price is None else \
                    (price.usd_per_hour, price.source)
        return found

    merged: dict[tuple[str, str], Any] = {}
    for part in in_every_region(region_prices, regions, name="vmexec-ec2-describe").values():
        merged.update(part)
    plan.set_prices(merged)
