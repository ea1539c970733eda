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

Their end (teardown, keep warm, sweep, ``vmexec cleanup``) is ``teardown.py``.

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

from botocore.exceptions import ClientError

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
    "owner",
    "caller_owner",
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
    "parse_age",
    "is_gone",
    "delete_if_present",
    "LIVE_INSTANCE_STATES",
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

#: Instance states that still hold (or may again hold) resources.
LIVE_INSTANCE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
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
        delete_if_present(ec2.delete_launch_template,
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
                                      "Values": LIVE_INSTANCE_STATES}],
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


# --- deleting one resource ----------------------------------------------------------

def is_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says the resource does not exist (any more)."""
    code = retry.error_code(exc) or ""
    return code.endswith(".NotFound") or code.endswith("NotFound") or code in (
        "InvalidGroup.NotFound", "InvalidLaunchTemplateId.NotFound")


def delete_if_present(fn: Any, resource: Resource, **kwargs: Any) -> bool:
    """Delete one resource; False when it was already gone."""
    try:
        fn(**kwargs)
    except ClientError as exc:
        if is_gone(exc):
            return False
        raise
    return True


# Moved to teardown.py; ``from vmexec.providers.ec2.resources import delete_listed`` (the
# CLI) keeps working. New code imports them from ``teardown``.
_MOVED = frozenset({"TeardownSummary", "delete_resources", "teardown", "keep_warm",
                    "delete_listed", "sweep"})


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from vmexec.providers.ec2 import teardown as _teardown

        return getattr(_teardown, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
