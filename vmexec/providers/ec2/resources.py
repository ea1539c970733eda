"""The fleet's resources on EC2: tags, security group, launch template — and their end.

Owns:

* **Tags.** Every resource gets ``vmexec:fleet``, ``vmexec:owner`` (the AWS caller
  identity's ARN, from STS: ``caller_owner``; not a self-asserted user@host),
  ``vmexec:created`` (ISO UTC), ``Name`` and the user's ``tags``, at creation (through
  ``TagSpecifications``), so anything left behind can be found with no local state.
* **Creation** of the per-fleet security group (tcp/22 from ``ssh_cidr`` only, in the
  default VPC) and launch template.
* **Finding** vmexec resources by tag (``find_resources``): instances, volumes, security
  groups, launch templates, key pairs; optionally of one fleet, older than an age.
* **Teardown** (``teardown``): terminate every instance of the fleet (one call per region
  and 1000 ids), wait until they are terminated, delete launch templates, key pairs,
  leftover volumes and the security groups (retrying ``DependencyViolation`` while the
  instances' network interfaces detach), then **verify by tag** that nothing of the fleet
  remains in any region. Regions run in parallel. The ``TeardownSummary`` counts what was
  deleted (the guardrails' cost receipt uses it) and lists what remains.
* **Sweeping** (``sweep``): the same for resources of earlier runs; ``delete_listed``
  deletes exactly a list of resources a person saw (``vmexec cleanup``), never what a
  second query finds.

The functions take boto3 EC2 clients (region -> client), the provider's or the CLI's;
their calls retry throttling (``clients.retrying``) and regions run at once
(``clients.in_every_region``).

Imports boto3 error types; lives under ``providers/ec2``. Must not import the scheduler,
the executor or the CLI.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import getpass
import ipaddress
import logging
import math
import socket
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from botocore.exceptions import ClientError, WaiterError

from vmexec import retry
from vmexec.errors import ConfigError
from vmexec.providers.ec2 import errors as ec2_errors
from vmexec.providers.ec2.clients import in_every_region, retrying

__all__ = [
    "TAG_FLEET",
    "TAG_OWNER",
    "TAG_CREATED",
    "TAG_NAME",
    "TAG_CLIENT",
    "KINDS",
    "Resource",
    "TeardownSummary",
    "owner",
    "caller_owner",
    "delete_listed",
    "utc_now",
    "fleet_tags",
    "validate_user_tags",
    "tag_specifications",
    "tag_resources",
    "create_security_group",
    "create_launch_template",
    "allow_ssh",
    "restrict_ingress",
    "delete_launch_template",
    "find_resources",
    "find_all",
    "delete_resources",
    "teardown",
    "keep_warm",
    "sweep",
    "parse_age",
]

log = logging.getLogger(__name__)

TAG_FLEET = "vmexec:fleet"
TAG_OWNER = "vmexec:owner"
TAG_CREATED = "vmexec:created"
TAG_NAME = "vmexec:name"
#: On a named fleet's machines while a client uses them (removed when it keeps them warm).
TAG_CLIENT = "vmexec:client"

#: Resource kinds vmexec creates or looks for, in the order teardown deletes them.
KINDS = ("instance", "launch-template", "key-pair", "volume", "security-group")

_LIVE_INSTANCE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
_TERMINATE_CHUNK = 1000
# Seconds between the instance_terminated waiter's polls (EC2 takes a minute or so).
_WAIT_DELAY = 5
_PAGE = 200


def owner() -> str:
    """``user@host`` of this client, for the ``vmexec:owner`` tag."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def caller_owner(sts: Any) -> str:
    """The ``vmexec:owner`` of resources this caller creates: its AWS identity's ARN.

    STS says who the credentials belong to (``arn:aws:iam::123456789012:user/alice``,
    or ``arn:aws:sts::...:assumed-role/Role/session``); unlike ``user@host`` nobody can
    claim another's. ``vmexec cleanup`` deletes only the caller's own resources by it.

    Args:
        sts: an STS client of the session vmexec uses.

    Raises:
        ConfigError/VMExecError: STS refused (no valid credentials).
    """
    sts = retrying(sts)  # a client of the CLI too: its calls retry throttling
    identity = ec2_errors.call("GetCallerIdentity", None, sts.get_caller_identity)
    return str(identity["Arn"])


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_user_tags(tags: Any) -> dict[str, str]:
    """Check ``tags=``: a mapping of strings, not using the reserved prefixes.

    Raises:
        ConfigError: naming the bad key.
    """
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ConfigError(f"tags must be a dict of str -> str, e.g. {{'project': 'x'}}, "
                          f"not {tags!r}")
    out = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"tags: keys and values must be strings, got {key!r}: {value!r}")
        if key.lower().startswith(("vmexec:", "aws:")):
            raise ConfigError(f"tags: {key!r} uses a reserved prefix (vmexec:, aws:); "
                              "vmexec sets its own vmexec: tags")
        if not 0 < len(key) <= 128 or len(value) > 256:
            raise ConfigError(f"tags: {key!r} is too long (keys 1-128, values 0-256 chars)")
        out[key] = value
    if len(out) > 40:
        raise ConfigError(f"tags: {len(out)} tags given; EC2 allows 50 per resource and "
                          "vmexec uses up to 5 (Name and vmexec:*); pass at most 40")
    return out


def fleet_tags(fleet_id: str, *, name: Optional[str] = None,
               user_tags: Optional[Mapping[str, str]] = None,
               created: Optional[datetime.datetime] = None,
               owner_label: Optional[str] = None) -> dict[str, str]:
    """The tags every resource of the fleet carries."""
    tags = dict(user_tags or {})
    tags.update({
        TAG_FLEET: fleet_id,
        TAG_OWNER: owner_label or owner(),
        TAG_CREATED: _iso(created or utc_now()),
        "Name": name or f"vmexec-{fleet_id}",
    })
    if name:
        tags[TAG_NAME] = name
    return tags


def tag_resources(ec2: Any, region: str, ids: list[str], tag: Mapping[str, str]) -> None:
    """Add ``tag`` (``{"Key": ..., "Value": ...}``) to resources ``ids`` (one call).

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    ec2_errors.call("CreateTags", region, ec2.create_tags, Resources=ids, Tags=[dict(tag)])


def tag_specifications(resource_types: Iterable[str], tags: Mapping[str, str]
                       ) -> list[dict[str, Any]]:
    """``TagSpecifications`` for ``resource_types`` (e.g. ``["instance", "volume"]``)."""
    pairs = [{"Key": k, "Value": v} for k, v in tags.items()]
    return [{"ResourceType": rtype, "Tags": list(pairs)} for rtype in resource_types]


# --- creation -------------------------------------------------------------------------

def create_security_group(ec2: Any, region: str, *, vpc_id: str, fleet_id: str,
                          ssh_cidr: str, tags: Mapping[str, str]) -> str:
    """Create the fleet's security group: inbound tcp/22 from ``ssh_cidr`` only.

    Outbound stays open (the boot script installs packages). If opening port 22 fails,
    the group is deleted again before raising.

    Returns:
        The group id.

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    group_id = ec2_errors.call(
        "CreateSecurityGroup", region, ec2.create_security_group,
        GroupName=f"vmexec-{fleet_id}",
        Description=f"vmexec fleet {fleet_id}: SSH from {ssh_cidr} only",
        VpcId=vpc_id,
        TagSpecifications=tag_specifications(["security-group"], tags),
    )["GroupId"]
    try:
        allow_ssh(ec2, region, group_id, ssh_cidr)
    except BaseException:
        _delete_quietly(ec2.delete_security_group, "security group", group_id, GroupId=group_id)
        raise
    log.info("%s: created security group %s (tcp/22 from %s)", region, group_id, ssh_cidr)
    return str(group_id)


def allow_ssh(ec2: Any, region: str, group_id: str, ssh_cidr: str) -> None:
    """Open tcp/22 of ``group_id`` to ``ssh_cidr`` (nothing if that rule exists: a named
    fleet's group reused from the same address).

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    network = ipaddress.ip_network(ssh_cidr, strict=False)
    ranges: dict[str, Any] = (
        {"IpRanges": [{"CidrIp": str(network), "Description": "vmexec client"}]}
        if network.version == 4 else
        {"Ipv6Ranges": [{"CidrIpv6": str(network), "Description": "vmexec client"}]})
    try:
        ec2.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **ranges}])
    except ClientError as exc:
        if retry.error_code(exc) == "InvalidPermission.Duplicate":
            return
        raise ec2_errors.translate(exc, operation="AuthorizeSecurityGroupIngress",
                                   region=region) from exc


def restrict_ingress(ec2: Any, region: str, group_id: str, ssh_cidr: str,
                     source_groups: Iterable[str] = ()) -> list[str]:
    """Revoke every inbound rule of ``group_id`` but tcp/22 from ``ssh_cidr`` (and from
    ``source_groups``): a named fleet's group reused from another address must not stay
    open to the addresses of earlier runs (a café's, a former employer's).

    Returns:
        The revoked sources, for the log.

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    wanted = str(ipaddress.ip_network(ssh_cidr, strict=False))
    keep_groups = set(source_groups)
    answer = ec2_errors.call("DescribeSecurityGroups", region, ec2.describe_security_groups,
                             GroupIds=[group_id])
    stale: list[dict[str, Any]] = []
    revoked: list[str] = []
    for group in answer.get("SecurityGroups", []):
        for rule in group.get("IpPermissions", []):
            ssh = (rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == 22
                   and rule.get("ToPort") == 22)
            base = {k: rule[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in rule}
            ranges = [r for r in rule.get("IpRanges", [])
                      if not (ssh and r.get("CidrIp") == wanted)]
            ranges6 = [r for r in rule.get("Ipv6Ranges", [])
                       if not (ssh and r.get("CidrIpv6") == wanted)]
            pairs = [p for p in rule.get("UserIdGroupPairs", [])
                     if not (ssh and p.get("GroupId") in keep_groups)]
            lists = {"IpRanges": [{"CidrIp": r["CidrIp"]} for r in ranges],
                     "Ipv6Ranges": [{"CidrIpv6": r["CidrIpv6"]} for r in ranges6],
                     "UserIdGroupPairs": [{"GroupId": p["GroupId"]} for p in pairs],
                     "PrefixListIds": [{"PrefixListId": p["PrefixListId"]}
                                       for p in rule.get("PrefixListIds", [])]}
            lists = {k: v for k, v in lists.items() if v}
            if lists:
                stale.append({**base, **lists})
                revoked += [str(r.get("CidrIp") or r.get("CidrIpv6") or r.get("GroupId")
                                or r.get("PrefixListId")) for v in lists.values() for r in v]
    if stale:
        ec2_errors.call("RevokeSecurityGroupIngress", region,
                        ec2.revoke_security_group_ingress, GroupId=group_id,
                        IpPermissions=stale)
        log.info("%s: revoked stale inbound rules of %s: %s", region, group_id,
                 ", ".join(revoked))
    return revoked


def delete_launch_template(ec2: Any, region: str, template_id: str) -> None:
    """Delete a launch template an earlier run of a named fleet left (gone: fine).

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    try:
        _delete(ec2.delete_launch_template,
                Resource(region=region, kind="launch-template", id=template_id),
                LaunchTemplateId=template_id)
    except ClientError as exc:
        raise ec2_errors.translate(exc, operation="DeleteLaunchTemplate",
                                   region=region) from exc


def create_launch_template(ec2: Any, region: str, *, fleet_id: str, data: Mapping[str, Any],
                           tags: Mapping[str, str]) -> str:
    """Create the fleet's launch template in ``region``; return its id.

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    answer = ec2_errors.call(
        "CreateLaunchTemplate", region, ec2.create_launch_template,
        LaunchTemplateName=f"vmexec-{fleet_id}",
        VersionDescription="vmexec fleet launch template",
        LaunchTemplateData=dict(data),
        TagSpecifications=tag_specifications(["launch-template"], tags),
    )
    template_id = answer["LaunchTemplate"]["LaunchTemplateId"]
    log.info("%s: created launch template %s", region, template_id)
    return str(template_id)


def _delete_quietly(fn: Any, kind: str, rid: str, **kwargs: Any) -> None:
    """Best-effort delete during cleanup of a failed creation; failures are logged."""
    try:
        fn(**kwargs)
    except ClientError as exc:
        log.warning("could not delete %s %s while undoing a failed step: %s; `vmexec "
                    "cleanup` will find it by tag", kind, rid, exc)


# --- finding --------------------------------------------------------------------------

@dataclasses.dataclass
class Resource:
    """One vmexec-tagged resource."""

    region: str
    kind: str
    id: str
    fleet: str = ""
    name: str = ""
    state: str = ""
    owner: str = ""
    created: Optional[datetime.datetime] = None
    detail: str = ""

    def age(self, now: Optional[datetime.datetime] = None) -> Optional[datetime.timedelta]:
        if self.created is None:
            return None
        return (now or utc_now()) - self.created


def tags_of(item: Mapping[str, Any]) -> dict[str, str]:
    """The ``Tags`` of a describe-call entry as a dict."""
    return {t["Key"]: t["Value"] for t in item.get("Tags", []) or []}


def _parse_time(value: Any) -> Optional[datetime.datetime]:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    if isinstance(value, str) and value:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)
    return None


def _resource(region: str, kind: str, rid: str, item: Mapping[str, Any], state: str,
              api_time: Any = None, detail: str = "") -> Resource:
    tags = tags_of(item)
    return Resource(region=region, kind=kind, id=rid, fleet=tags.get(TAG_FLEET, ""),
                    name=tags.get(TAG_NAME, tags.get("Name", "")), state=state,
                    owner=tags.get(TAG_OWNER, ""),
                    created=_parse_time(tags.get(TAG_CREATED)) or _parse_time(api_time),
                    detail=detail)


def find_resources(ec2: Any, region: str, *, fleet: Optional[str] = None,
                   older_than: Optional[datetime.timedelta] = None,
                   now: Optional[datetime.datetime] = None) -> list[Resource]:
    """Every vmexec-tagged resource in ``region`` (five describe calls, paginated).

    Args:
        ec2: the region's EC2 client.
        region: its name.
        fleet: only this fleet's resources (tag ``vmexec:fleet``).
        older_than: only resources created longer ago than this (resources whose age is
            unknown are left out).
        now: the current time (for tests).

    Returns:
        Instances that are not terminated, volumes, security groups, launch templates
        and key pairs, in ``KINDS`` order.

    Raises:
        VMExecError/ConfigError: a describe call failed.
    """
    ec2 = retrying(ec2)
    tag_filter = ({"Name": f"tag:{TAG_FLEET}", "Values": [fleet]} if fleet else
                  {"Name": "tag-key", "Values": [TAG_FLEET]})
    found: list[Resource] = []
    try:
        # Pages of 200: a thousand described instances at once cost tens of MB of
        # parsed XML, and teardown runs one of these per region in parallel.
        for page in ec2.get_paginator("describe_instances").paginate(
                Filters=[tag_filter, {"Name": "instance-state-name",
                                      "Values": _LIVE_INSTANCE_STATES}],
                PaginationConfig={"PageSize": _PAGE}):
            for reservation in page.get("Reservations", []):
                for item in reservation.get("Instances", []):
                    found.append(_resource(
                        region, "instance", item["InstanceId"], item,
                        item.get("State", {}).get("Name", ""), item.get("LaunchTime"),
                        f"{item.get('InstanceType', '')} "
                        f"{item.get('Placement', {}).get('AvailabilityZone', '')}".strip()))
        templates = ec2.describe_launch_templates(Filters=[tag_filter])
        for item in templates.get("LaunchTemplates", []):
            found.append(_resource(region, "launch-template", item["LaunchTemplateId"], item,
                                   "available", item.get("CreateTime"),
                                   item.get("LaunchTemplateName", "")))
        keys = ec2.describe_key_pairs(Filters=[tag_filter])
        for item in keys.get("KeyPairs", []):
            found.append(_resource(region, "key-pair", item.get("KeyPairId", item["KeyName"]),
                                   item, "available", item.get("CreateTime"),
                                   item.get("KeyName", "")))
        for page in ec2.get_paginator("describe_volumes").paginate(
                Filters=[tag_filter], PaginationConfig={"PageSize": _PAGE}):
            for item in page.get("Volumes", []):
                found.append(_resource(region, "volume", item["VolumeId"], item,
                                       item.get("State", ""), item.get("CreateTime"),
                                       f"{item.get('Size', '?')} GB"))
        for page in ec2.get_paginator("describe_security_groups").paginate(
                Filters=[tag_filter]):
            for item in page.get("SecurityGroups", []):
                found.append(_resource(region, "security-group", item["GroupId"], item,
                                       "available", None, item.get("GroupName", "")))
    except ClientError as exc:
        raise ec2_errors.translate(exc, operation=exc.operation_name, region=region) from exc
    if older_than is not None:
        moment = now or utc_now()
        found = [r for r in found if r.created is not None and moment - r.created > older_than]
    return found


def find_all(clients: Mapping[str, Any], *, fleet: Optional[str] = None,
             older_than: Optional[datetime.timedelta] = None) -> list[Resource]:
    """``find_resources`` in every region of ``clients`` (region -> EC2 client), in
    parallel; results in the order of ``clients``.

    Raises:
        VMExecError/ConfigError: a region's describe calls failed.
    """
    found: list[Resource] = []
    for part in in_every_region(
            lambda region: find_resources(clients[region], region, fleet=fleet,
                                          older_than=older_than),
            clients, name="vmexec-ec2-find").values():
        found += part
    return found


def parse_age(text: str) -> datetime.timedelta:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1d"``, ``"1w"`` (or a bare number of hours).

    Raises:
        ConfigError: anything else.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in units else "h"
    number = value[:-1] if value[-1:] in units else value
    try:
        amount = float(number)
    except ValueError:
        raise ConfigError(f"cannot read the age {text!r}: use e.g. 90s, 30m, 2h, 1d") from None
    if amount < 0:
        raise ConfigError(f"an age cannot be negative: {text!r}")
    return datetime.timedelta(seconds=amount * units[unit])


# --- deleting -------------------------------------------------------------------------

def _is_dependency(exc: BaseException) -> bool:
    return retry.error_code(exc) in ("DependencyViolation", "InvalidGroup.InUse",
                                     "VolumeInUse")


def _is_gone(exc: BaseException) -> bool:
    code = retry.error_code(exc) or ""
    return code.endswith(".NotFound") or code.endswith("NotFound") or code in (
        "InvalidGroup.NotFound", "InvalidLaunchTemplateId.NotFound")


def _wait_terminated(ec2: Any, region: str, ids: list[str], timeout: float,
                     clock: retry.Clock) -> list[str]:
    """Wait for ``ids`` to be terminated (EC2's ``instance_terminated`` waiter); return
    those still not terminated after ``timeout`` seconds."""
    deadline = clock.monotonic() + timeout
    waiter = ec2.get_waiter("instance_terminated")
    left: list[str] = []
    for start in range(0, len(ids), _TERMINATE_CHUNK):
        chunk = ids[start:start + _TERMINATE_CHUNK]
        while chunk:
            attempts = max(1, math.ceil((deadline - clock.monotonic()) / _WAIT_DELAY))
            try:
                waiter.wait(InstanceIds=chunk,
                            WaiterConfig={"Delay": _WAIT_DELAY, "MaxAttempts": attempts})
                break
            except WaiterError:
                # Out of time, or an instance in a state the waiter calls a failure
                # ('pending' or 'stopping' on its way down), or ids EC2 has forgotten.
                chunk = _alive(ec2, chunk)
            if chunk and clock.monotonic() >= deadline:
                left += chunk
                break
            if chunk:
                clock.sleep(_WAIT_DELAY)
    return left


def _alive(ec2: Any, ids: list[str]) -> list[str]:
    """Those of ``ids`` not terminated yet (one call; none when EC2 forgot them)."""
    try:
        # Ask only for the ones not terminated: the answer shrinks to nothing.
        answer = ec2.describe_instances(InstanceIds=ids,
                                        Filters=[{"Name": "instance-state-name",
                                                  "Values": _LIVE_INSTANCE_STATES}])
    except ClientError as exc:
        if _is_gone(exc):
            return []  # already forgotten by EC2: terminated long ago
        raise
    return [item["InstanceId"] for reservation in answer.get("Reservations", [])
            for item in reservation.get("Instances", [])]


def delete_resources(ec2: Any, region: str, resources: Iterable[Resource], *,
                     wait_timeout: float = 600.0, dependency_timeout: float = 300.0,
                     clock: Optional[retry.Clock] = None) -> collections.Counter[str]:
    """Delete ``resources`` (all in ``region``) in a safe order; return counts by kind.

    Instances are terminated first and waited for (their volumes go with them:
    ``DeleteOnTermination``); then launch templates, key pairs, volumes that are left
    ``available``, and security groups, whose deletion is retried while EC2 still sees
    them in use.

    Raises:
        VMExecError/ConfigError: a deletion failed for another reason than "already
            gone" (what was deleted before stays deleted).
    """
    clock = clock or retry.current_clock()
    ec2 = retrying(ec2)
    by_kind: dict[str, list[Resource]] = collections.defaultdict(list)
    for resource in resources:
        by_kind[resource.kind].append(resource)
    deleted: collections.Counter[str] = collections.Counter()
    try:
        instance_ids = [r.id for r in by_kind["instance"]]
        for start in range(0, len(instance_ids), _TERMINATE_CHUNK):
            chunk = instance_ids[start:start + _TERMINATE_CHUNK]
            ec2.terminate_instances(InstanceIds=chunk)
            deleted["instance"] += len(chunk)
        if instance_ids:
            left = _wait_terminated(ec2, region, instance_ids, wait_timeout, clock)
            if left:
                log.warning("%s: %d instance(s) not terminated after %.0fs: %s", region,
                            len(left), wait_timeout, ", ".join(left[:10]))
        for resource in by_kind["launch-template"]:
            if _delete(ec2.delete_launch_template, resource, LaunchTemplateId=resource.id):
                deleted["launch-template"] += 1
        for resource in by_kind["key-pair"]:
            key = ({"KeyPairId": resource.id} if resource.id.startswith("key-")
                   else {"KeyName": resource.id})
            if _delete(ec2.delete_key_pair, resource, **key):
                deleted["key-pair"] += 1
        for resource in by_kind["volume"]:
            if resource.state in ("available", "error"):
                if _delete(ec2.delete_volume, resource, VolumeId=resource.id):
                    deleted["volume"] += 1
        for resource in by_kind["security-group"]:
            policy = retry.dependency(_is_dependency, f"deleting {resource.id} in {region}",
                                      timeout=dependency_timeout, clock=clock)
            if policy(_delete, ec2.delete_security_group, resource, GroupId=resource.id):
                deleted["security-group"] += 1
    except ClientError as exc:
        raise ec2_errors.translate(exc, operation=exc.operation_name, region=region) from exc
    return deleted


def _delete(fn: Any, resource: Resource, **kwargs: Any) -> bool:
    """Delete one resource; False when it was already gone."""
    try:
        fn(**kwargs)
    except ClientError as exc:
        if _is_gone(exc):
            return False
        raise
    return True


@dataclasses.dataclass
class TeardownSummary:
    """What a teardown or sweep removed, and what is still there.

    Attributes:
        fleet: the fleet id (None for a sweep across fleets).
        regions: the regions checked.
        deleted: kind -> how many were deleted.
        remaining: resources still found by tag afterwards (should be empty).
        errors: per-region errors that stopped part of the work.
        seconds: wall time.
        kept: a named fleet's machines left running for reuse (``keep_warm``).
        keepalive: seconds those machines stay on without a client.
    """

    fleet: Optional[str]
    regions: list[str]
    deleted: dict[str, int] = dataclasses.field(default_factory=dict)
    remaining: list[Resource] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    kept: list[Resource] = dataclasses.field(default_factory=list)
    keepalive: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.remaining and not self.errors

    def text(self) -> str:
        done = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(self.deleted.items()) if n)
        what = f"fleet {self.fleet}" if self.fleet else "vmexec resources"
        line = (f"{what}: deleted {done or 'nothing'} in {len(self.regions)} region(s) "
                f"in {self.seconds:.1f}s")
        if self.remaining:
            left = ", ".join(f"{r.kind} {r.id} ({r.region})" for r in self.remaining[:10])
            line += (f"; STILL PRESENT: {left}" + (" ..." if len(self.remaining) > 10 else "")
                     + " — run `vmexec cleanup"
                     + (f" --fleet {self.fleet}" if self.fleet else "") + " --yes`")
        if self.kept:
            line += (f"; kept {len(self.kept)} machine(s) warm for reuse by name (each "
                     f"powers off after {self.keepalive:.0f}s without a client; `vmexec "
                     f"cleanup --fleet {self.fleet} --yes` ends them now)")
        if self.errors:
            line += "; errors: " + "; ".join(self.errors)
        return line


def _clean_region(ec2: Any, region: str, fleet: Optional[str],
                  older_than: Optional[datetime.timedelta], extra_instances: Iterable[str],
                  clock: retry.Clock, dependency_timeout: float,
                  select: Optional[Callable[[Resource], bool]] = None
                  ) -> tuple[collections.Counter[str], list[Resource]]:
    def find() -> list[Resource]:
        return [r for r in find_resources(ec2, region, fleet=fleet, older_than=older_than)
                if select is None or select(r)]

    found = find()
    known = {r.id for r in found}
    # Instances launched a moment ago may not be visible to a tag filter yet (EC2 reads
    # are eventually consistent): also terminate the ids the caller knows of.
    for instance_id in extra_instances:
        if instance_id not in known:
            found.insert(0, Resource(region=region, kind="instance", id=instance_id,
                                     fleet=fleet or ""))
    deleted = delete_resources(ec2, region, found, clock=clock,
                               dependency_timeout=dependency_timeout)
    if deleted:
        log.info("%s: deleted %s", region,
                 ", ".join(f"{n} {k}(s)" for k, n in sorted(deleted.items())))
    # Verify by tag. A volume still 'deleting' or an instance 'shutting-down' a moment
    # after the waits is on its way out: look again a few times before reporting it.
    remaining: list[Resource] = []
    for pause in (0.0, 1.0, 2.0, 4.0, 8.0):
        if pause:
            clock.sleep(pause)
        remaining = find()
        if not remaining or any(r.state not in ("deleting", "shutting-down")
                                for r in remaining):
            break
    return deleted, remaining


def _run_regions(clients: Mapping[str, Any], fleet: Optional[str],
                 older_than: Optional[datetime.timedelta],
                 extra: Mapping[str, Iterable[str]], clock: Optional[retry.Clock],
                 dependency_timeout: float,
                 select: Optional[Callable[[Resource], bool]] = None) -> TeardownSummary:
    clock = clock or retry.current_clock()

    def one(region: str) -> _RegionOutcome:
        deleted, remaining = _clean_region(clients[region], region, fleet, older_than,
                                           extra.get(region, ()), clock, dependency_timeout,
                                           select)
        return deleted, remaining, []

    return _summarize(TeardownSummary(fleet=fleet, regions=list(clients)), one,
                      "vmexec-ec2-cleanup")


# What one region's cleanup did: deleted (kind -> count), still there, kept on purpose.
_RegionOutcome = tuple[collections.Counter[str], list[Resource], list[Resource]]


def _summarize(summary: TeardownSummary, one: Callable[[str], _RegionOutcome],
               thread_name: str) -> TeardownSummary:
    """Run ``one`` for every region of ``summary`` in parallel and fold the outcomes in.

    A region that fails is reported in ``summary.errors``; the others carry on.
    """
    started = time.monotonic()

    def guarded(region: str) -> Any:
        try:
            return one(region)
        except Exception as exc:
            log.error("%s: cleanup failed: %s", region, exc)
            return exc

    totals: collections.Counter[str] = collections.Counter()
    for region, outcome in in_every_region(guarded, summary.regions,
                                           name=thread_name).items():
        if isinstance(outcome, BaseException):
            summary.errors.append(f"{region}: {outcome}")
            continue
        deleted, remaining, kept = outcome
        totals.update(deleted)
        summary.remaining.extend(remaining)
        summary.kept.extend(kept)
    summary.deleted = dict(totals)
    summary.seconds = time.monotonic() - started
    return summary


def teardown(clients: Mapping[str, Any], fleet_id: str, *,
             instance_ids: Optional[Mapping[str, Iterable[str]]] = None,
             clock: Optional[retry.Clock] = None,
             dependency_timeout: float = 300.0) -> TeardownSummary:
    """Delete everything of ``fleet_id`` in every region of ``clients`` and verify it.

    Args:
        clients: region -> EC2 client (every region the fleet may have used).
        fleet_id: the fleet.
        instance_ids: region -> instance ids known to the caller (terminated even if a
            tag query does not show them yet).
        clock: time source for waits.
        dependency_timeout: how long to retry deleting a security group still in use.

    Returns:
        The summary; ``summary.clean`` is False if anything remains or a region failed.
    """
    summary = _run_regions(clients, fleet_id, None, instance_ids or {}, clock,
                           dependency_timeout)
    if summary.clean:
        log.info("%s", summary.text())
    else:
        log.error("%s", summary.text())
    return summary


def keep_warm(clients: Mapping[str, Any], fleet_id: str, *,
              instance_ids: Mapping[str, Iterable[str]], keepalive: float,
              clock: Optional[retry.Clock] = None,
              dependency_timeout: float = 300.0) -> TeardownSummary:
    """A named fleet's shutdown: keep its running machines, remove everything else.

    In each region: terminate ``instance_ids`` (machines not fit for reuse: still
    booting, lost, draining), delete the fleet's launch templates and key pairs (a later
    run makes its own), and keep the other running instances with their volumes and the
    security group they need. A region where no machine stays is cleaned completely, as
    by ``teardown``. Then verify by tag.

    Returns:
        The summary; ``kept`` lists the machines left running, ``remaining`` anything
        else still present (should be empty).
    """
    clock = clock or retry.current_clock()

    def one(region: str) -> _RegionOutcome:
        ec2 = retrying(clients[region])
        doomed = set(instance_ids.get(region, ()))
        found = find_resources(ec2, region, fleet=fleet_id)
        warm = [r for r in found if r.kind == "instance" and r.id not in doomed
                and r.state in ("pending", "running")]
        if not warm:
            deleted, remaining = _clean_region(ec2, region, fleet_id, None, doomed, clock,
                                               dependency_timeout)
            return deleted, remaining, []
        removable = [Resource(region=region, kind="instance", id=i, fleet=fleet_id)
                     for i in sorted(doomed)]
        removable += [r for r in found if r.kind in ("launch-template", "key-pair")
                      or (r.kind == "volume" and r.state in ("available", "error"))]
        deleted = delete_resources(ec2, region, removable, clock=clock,
                                   dependency_timeout=dependency_timeout)
        kept_ids = {r.id for r in warm}
        # Free for the next client: it adopts only machines nobody is using.
        ec2_errors.call("DeleteTags", region, ec2.delete_tags,
                        Resources=sorted(kept_ids), Tags=[{"Key": TAG_CLIENT}])
        after = find_resources(ec2, region, fleet=fleet_id)
        kept = [r for r in after if r.kind == "instance" and r.id in kept_ids]
        remaining = [r for r in after if not (
            r.kind == "security-group" or (r.kind == "volume" and r.state == "in-use")
            or (r.kind == "instance" and (r.id in kept_ids or r.state == "shutting-down")))]
        return deleted, remaining, kept

    summary = _summarize(TeardownSummary(fleet=fleet_id, regions=list(clients),
                                         keepalive=keepalive), one, "vmexec-ec2-keep")
    (log.info if summary.clean else log.error)("%s", summary.text())
    return summary


def delete_listed(clients: Mapping[str, Any], listed: Iterable[Resource], *,
                  clock: Optional[retry.Clock] = None,
                  dependency_timeout: float = 120.0) -> TeardownSummary:
    """Delete exactly ``listed`` (what ``vmexec cleanup`` showed), then check they are gone.

    No second query chooses what to delete: a resource created after the listing (a
    colleague's fleet starting, another owner's) is never touched. The check afterwards
    describes again, but only reports the listed resources still present.

    Args:
        clients: region -> EC2 client, for every region of ``listed``.
        listed: the resources to delete.
        clock: time source for waits.
        dependency_timeout: how long to retry deleting a security group still in use.
    """
    by_region: dict[str, list[Resource]] = collections.defaultdict(list)
    for resource in listed:
        by_region[resource.region].append(resource)
    clock = clock or retry.current_clock()

    def one(region: str) -> _RegionOutcome:
        ec2 = retrying(clients[region])
        mine = by_region[region]
        deleted = delete_resources(ec2, region, mine, clock=clock,
                                   dependency_timeout=dependency_timeout)
        ids = {r.id for r in mine}
        remaining: list[Resource] = []
        for pause in (0.0, 1.0, 2.0, 4.0, 8.0):
            if pause:
                clock.sleep(pause)
            remaining = [r for r in find_resources(ec2, region) if r.id in ids]
            if not remaining or any(r.state not in ("deleting", "shutting-down")
                                    for r in remaining):
                break
        return deleted, remaining, []

    summary = _summarize(TeardownSummary(fleet=None, regions=sorted(by_region)), one,
                         "vmexec-ec2-cleanup")
    log.info("%s", summary.text())
    return summary


def sweep(clients: Mapping[str, Any], *, fleet: Optional[str] = None,
          older_than: Optional[datetime.timedelta] = None,
          select: Optional[Callable[[Resource], bool]] = None,
          clock: Optional[retry.Clock] = None,
          dependency_timeout: float = 120.0) -> TeardownSummary:
    """Delete vmexec resources left by earlier runs in the regions of ``clients``.

    Args:
        clients: region -> EC2 client.
        fleet: only this fleet.
        older_than: only resources older than this.
        select: only resources for which this is true (e.g. one owner's).
        clock: time source for waits.
        dependency_timeout: how long to retry deleting a security group still in use.
    """
    summary = _run_regions(clients, fleet, older_than, {}, clock, dependency_timeout,
                           select)
    log.info("%s", summary.text())
    return summary
