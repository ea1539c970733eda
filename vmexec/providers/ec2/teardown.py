"""The end of a fleet's resources: teardown, keeping warm, sweeps and ``vmexec cleanup``.

Owns:

* **Teardown** (``teardown``): terminate every instance of the fleet (one call per region
  and 1000 ids), wait until they are terminated (EC2's ``instance_terminated`` waiter),
  delete launch templates, key pairs, leftover volumes and the security groups (retrying
  ``DependencyViolation`` while the instances' network interfaces detach), then **verify
  by tag** that nothing of the fleet remains in any region. Regions run at once. The
  ``TeardownSummary`` counts what was deleted (the cost receipt uses it) and lists what
  remains.
* **Keeping warm** (``keep_warm``): a named fleet's shutdown, which keeps its running
  machines and removes the rest.
* **Sweeping** (``sweep``): the same as teardown for resources of earlier runs;
  ``delete_listed`` deletes exactly a list of resources a person saw (``vmexec
  cleanup``), never what a second query finds.

The functions take boto3 EC2 clients (region -> client), the provider's or the CLI's;
their calls retry throttling (``clients.retrying``). Finding by tag is ``resources``.

Imports boto3 error types; lives under ``providers/ec2``. Must not import the scheduler,
the executor or the CLI.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from botocore.exceptions import ClientError, WaiterError

from vmexec import retry
from vmexec.providers.ec2 import errors as ec2_errors
from vmexec.providers.ec2.clients import in_every_region, retrying
from vmexec.providers.ec2.resources import LIVE_INSTANCE_STATES, TAG_CLIENT, Resource, \
    delete_if_present, find_resources, is_gone

__all__ = [
    "TeardownSummary",
    "delete_resources",
    "teardown",
    "keep_warm",
    "delete_listed",
    "sweep",
]

log = logging.getLogger(__name__)

_TERMINATE_CHUNK = 1000
# Seconds between the instance_terminated waiter's polls (EC2 takes a minute or so).
_WAIT_DELAY = 5


def _is_dependency(exc: BaseException) -> bool:
    return retry.error_code(exc) in ("DependencyViolation", "InvalidGroup.InUse",
                                     "VolumeInUse")


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
                                                  "Values": LIVE_INSTANCE_STATES}])
    except ClientError as exc:
        if is_gone(exc):
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
            if delete_if_present(ec2.delete_launch_template, resource, LaunchTemplateId=resource.id):
                deleted["launch-template"] += 1
        for resource in by_kind["key-pair"]:
            key = ({"KeyPairId": resource.id} if resource.id.startswith("key-")
                   else {"KeyName": resource.id})
            if delete_if_present(ec2.delete_key_pair, resource, **key):
                deleted["key-pair"] += 1
        for resource in by_kind["volume"]:
            if resource.state in ("available", "error"):
                if delete_if_present(ec2.delete_volume, resource, VolumeId=resource.id):
                    deleted["volume"] += 1
        for resource in by_kind["security-group"]:
            policy = retry.dependency(_is_dependency, f"deleting {resource.id} in {region}",
                                      timeout=dependency_timeout, clock=clock)
            if policy(delete_if_present, ec2.delete_security_group, resource, GroupId=resource.id):
                deleted["security-group"] += 1
    except ClientError as exc:
        raise ec2_errors.translate(exc, operation=exc.operation_name, region=region) from exc
    return deleted


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
