"""Named fleets: found again, and reused, by a later run.

``VMExecutor(..., provider="ec2", name="nightly")`` makes a fleet whose id is
``vmx-nightly`` (``fleet_id_for``), so everything it creates carries the tag
``vmexec:fleet=vmx-nightly``; its SSH keys live in
``userdata.named_fleet_directory(fleet id)`` instead of a temporary folder. At a normal
shutdown its ready machines keep running: each one's dead-man switch turns it off (and
EC2 terminates it) after ``keepalive`` seconds without a client. A later executor with
the same name, by the same owner, *adopts* the machines still running: no launch call, no
boot; the environment install is skipped when the machine's environment hash is the
client's, and only the user's own code is reinstalled when only that changed.

Owns:

* ``find_named(ec2, region, fleet_id)`` — what one region holds of the named fleet:
  running instances, its security group, its launch templates (three describe calls);
* ``check_owner`` — a name in use by another owner is a ``ConfigError`` (their keys are
  not ours: we could not log in, and must not touch their machines);
* ``adopt`` — ``MachineRecord``s for the running instances whose type the new plan
  wants; the others are returned for termination.

Imports boto3 error types only through ``errors``; must not import the scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional

from botocore.exceptions import ClientError

from vmexec.errors import ConfigError
from vmexec.providers.base import MachineRecord
from vmexec.providers.ec2 import errors as ec2_errors
from vmexec.providers.ec2.plan import TypeInfo
from vmexec.providers.ec2.resources import TAG_CLIENT, TAG_FLEET, TAG_OWNER, tags_of

__all__ = ["NamedFleetState", "fleet_id_for", "find_named", "check_owner", "adopt"]

log = logging.getLogger(__name__)


def fleet_id_for(name: str) -> str:
    """The fleet id of a named fleet: the same on every run, so its resources are found."""
    return f"vmx-{name}"


@dataclasses.dataclass
class NamedFleetState:
    """What one region holds of a named fleet before this run launches anything.

    Attributes:
        region: the region.
        instances: ``DescribeInstances`` entries of its pending and running instances.
        security_group: its security group id (reused by this run), or None.
        launch_templates: its launch template ids (replaced: this run's user-data may
            differ).
        owners: the ``vmexec:owner`` tags seen on them.
    """

    region: str
    instances: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    security_group: Optional[str] = None
    launch_templates: list[str] = dataclasses.field(default_factory=list)
    owners: set[str] = dataclasses.field(default_factory=set)


def find_named(ec2: Any, region: str, fleet_id: str) -> NamedFleetState:
    """Look up the named fleet ``fleet_id`` in ``region`` (three describe calls).

    Raises:
        VMExecError/ConfigError: a describe call failed (translated AWS error).
    """
    state = NamedFleetState(region=region)
    tag = {"Name": f"tag:{TAG_FLEET}", "Values": [fleet_id]}
    try:
        for page in ec2.get_paginator("describe_instances").paginate(
                Filters=[tag, {"Name": "instance-state-name",
                               "Values": ["pending", "running"]}]):
            for reservation in page.get("Reservations", []):
                for item in reservation.get("Instances", []):
                    state.instances.append(item)
                    state.owners.add(tags_of(item).get(TAG_OWNER, ""))
    except ClientError as exc:
        raise ec2_errors.translate(exc, operation="DescribeInstances", region=region) from exc
    groups = ec2_errors.call("DescribeSecurityGroups", region, ec2.describe_security_groups,
                             Filters=[tag])
    for item in groups.get("SecurityGroups", []):
        if item.get("GroupName") == f"vmexec-{fleet_id}":
            state.security_group = item["GroupId"]
            state.owners.add(tags_of(item).get(TAG_OWNER, ""))
    templates = ec2_errors.call("DescribeLaunchTemplates", region,
                                ec2.describe_launch_templates, Filters=[tag])
    state.launch_templates = [t["LaunchTemplateId"]
                              for t in templates.get("LaunchTemplates", [])]
    state.owners.discard("")
    return state


def check_owner(states: Mapping[str, NamedFleetState], name: str, me: str) -> None:
    """Refuse a name another owner's fleet uses in any of the regions.

    Raises:
        ConfigError: names the owner and region, and the fix (another ``name=``).
    """
    for region, state in states.items():
        others = sorted(state.owners - {me})
        if others:
            raise ConfigError(
                f"name={name!r}: fleet vmx-{name} in {region} belongs to {others[0]}, not "
                f"to {me}: its machines only accept that owner's key. Pick another name=, "
                f"or ask them to remove it (`vmexec cleanup --fleet vmx-{name} --yes`)")


def adopt(states: Mapping[str, NamedFleetState],
          planned: Mapping[tuple[str, str], TypeInfo], slots: Callable[[str], int],
          provider_name: str) -> tuple[list[MachineRecord], dict[str, list[str]]]:
    """Records for the machines this run can reuse, and the ones it cannot.

    A running instance whose (region, type) the plan contains (``planned``) is reused;
    one of another type (the named fleet's instance types or ``arm=`` changed since) is
    not. One that carries a ``vmexec:client`` tag serves another client right now (or
    did, until that client was killed: then its dead-man switch turns it off soon): it
    is left alone.

    Returns:
        ``(records, unwanted)``: records in state ``pending`` (``connect`` finds them
        running and ready at once), and region -> instance ids to terminate.
    """
    records: list[MachineRecord] = []
    unwanted: dict[str, list[str]] = {}
    busy: list[str] = []
    for region, state in states.items():
        for item in state.instances:
            instance_id = item["InstanceId"]
            itype = item.get("InstanceType", "")
            user = tags_of(item).get(TAG_CLIENT)
            if user:
                busy.append(f"{instance_id} ({user})")
                continue
            info = planned.get((region, itype))
            if info is None:
                unwanted.setdefault(region, []).append(instance_id)
                continue
            zone = item.get("Placement", {}).get("AvailabilityZone")
            records.append(MachineRecord(
                id=instance_id, label=f"{instance_id} ({zone or region} {itype})",
                slots=slots(itype), provider=provider_name, state="pending", region=region,
                zone=zone, instance_type=itype, arch=info.arch,
                spot=item.get("InstanceLifecycle") == "spot"))
    if busy:
        log.warning("named fleet: %d machine(s) serve another client, not reused: %s",
                    len(busy), ", ".join(busy[:5]) + (" ..." if len(busy) > 5 else ""))
    if records or unwanted:
        log.info("named fleet: %d machine(s) to reuse%s", len(records),
                 f", {sum(map(len, unwanted.values()))} of other instance types to "
                 "terminate" if unwanted else "")
    return records, unwanted
