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
* ``Ledger`` — the ids of the instances and security groups this computer launched
  for the fleet, kept with the fleet's keys (``named_fleet_directory``). Tags are not
  proof: anyone allowed to create resources in the account can tag an instance
  ``vmexec:fleet=vmx-<name>``, and adopting it would hand it the user's tasks and
  data. Only recorded ids are adopted (``trust_recorded``); a resource without an
  owner tag never is;
* ``adopt`` — ``MachineRecord``s for the running instances whose type the new plan
  wants; the others are returned for termination.

Imports boto3 error types only through ``errors``; must not import the scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from typing import Any, Callable, Iterable, Mapping, Optional

from botocore.exceptions import ClientError

from vmexec.errors import ConfigError
from vmexec.providers.base import MachineRecord, MachineState
from vmexec.providers.ec2 import errors as ec2_errors
from vmexec.providers.ec2.plan import TypeInfo
from vmexec.providers.ec2.resources import TAG_CLIENT, TAG_FLEET, TAG_OWNER, tags_of

__all__ = ["NamedFleetState", "Ledger", "fleet_id_for", "find_named", "check_owner",
           "trust_recorded", "adopt"]

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
        fleet_id: the fleet.
        group_owner: the security group's ``vmexec:owner`` tag ("" when it has none).
    """

    region: str
    instances: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    security_group: Optional[str] = None
    launch_templates: list[str] = dataclasses.field(default_factory=list)
    owners: set[str] = dataclasses.field(default_factory=set)
    fleet_id: str = ""
    group_owner: str = ""


def find_named(ec2: Any, region: str, fleet_id: str) -> NamedFleetState:
    """Look up the named fleet ``fleet_id`` in ``region`` (three describe calls).

    Raises:
        VMExecError/ConfigError: a describe call failed (translated AWS error).
    """
    state = NamedFleetState(region=region, fleet_id=fleet_id)
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
            state.group_owner = tags_of(item).get(TAG_OWNER, "")
            state.owners.add(state.group_owner)
    templates = ec2_errors.call("DescribeLaunchTemplates", region,
                                ec2.describe_launch_templates, Filters=[tag])
    state.launch_templates = [t["LaunchTemplateId"]
                              for t in templates.get("LaunchTemplates", [])]
    state.owners.discard("")
    return state


class Ledger:
    """What this computer launched for a named fleet: instance and security group ids
    per region, in ``ledger.json`` next to the fleet's keys (0600, in a 0700 folder).

    It goes with the keys: when the fleet is removed, so is the folder.
    """

    FILE = "ledger.json"

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, self.FILE)
        self._data: dict[str, dict[str, list[str]]] = {}
        # Regions launch in parallel threads, each recording its ids: one writer at a
        # time, or two threads race on the temporary file.
        self._lock = threading.Lock()
        if os.path.exists(self.path):
            if os.stat(self.path).st_mode & 0o077:
                raise ConfigError(f"{self.path} is writable or readable by other users: a "
                                  f"named fleet's records must be private (chmod 600 "
                                  f"{self.path}), or delete {directory} to start afresh")
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {self.path} ({exc}): delete {directory} "
                                  "to start the named fleet afresh") from None
            self._data = {str(region): {"instances": [str(i) for i in v.get("instances", [])],
                                        "groups": [str(g) for g in v.get("groups", [])]}
                          for region, v in dict(data).items()}

    def instances(self, region: str) -> set[str]:
        return set(self._data.get(region, {}).get("instances", []))

    def groups(self, region: str) -> set[str]:
        return set(self._data.get(region, {}).get("groups", []))

    def add(self, region: str, *, instances: Iterable[str] = (),
            group: Optional[str] = None) -> None:
        """Record ids this client created (written to disk at once)."""
        with self._lock:
            entry = self._data.setdefault(region, {"instances": [], "groups": []})
            entry["instances"] = sorted(set(entry["instances"]) | set(instances))
            if group is not None:
                entry["groups"] = sorted(set(entry["groups"]) | {group})
            self._save()

    def keep_only(self, region: str, instances: Iterable[str]) -> None:
        """Forget recorded instances that no longer run (the file stays small)."""
        with self._lock:
            entry = self._data.get(region)
            if entry is not None:
                alive = set(instances)
                entry["instances"] = [i for i in entry["instances"] if i in alive]
                self._save()

    def _save(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"  # two processes: two files
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._data, f, indent=1, sort_keys=True)
        os.replace(temporary, self.path)


def trust_recorded(states: Mapping[str, NamedFleetState], ledger: Ledger, me: str) -> None:
    """Keep in ``states`` only what this computer launched (``ledger``) and ``me`` owns.

    An instance or group that carries the fleet's tag but is not recorded, or has no
    owner tag (or another owner's), is dropped: never adopted, never used. A security
    group of the fleet's name that is not recorded is an error: a new one of that name
    cannot be created next to it.

    Raises:
        ConfigError: an unrecorded security group holds the fleet's name.
    """
    for region, state in states.items():
        recorded = ledger.instances(region)
        trusted: list[str] = []
        ignored: list[str] = []
        for item in state.instances:
            owner = tags_of(item).get(TAG_OWNER, "")
            (trusted if item["InstanceId"] in recorded and owner == me
             else ignored).append(item["InstanceId"])
        if ignored:
            log.warning("named fleet: %s: not adopting %d instance(s) this computer did "
                        "not launch (or without the owner tag %s): %s", region,
                        len(ignored), me, ", ".join(ignored[:5]))
        state.instances = [i for i in state.instances if i["InstanceId"] in trusted]
        ledger.keep_only(region, trusted)
        if state.security_group and (state.security_group not in ledger.groups(region)
                                     or state.group_owner != me):
            raise ConfigError(
                f"named fleet: the security group {state.security_group} in {region} has "
                f"this fleet's name but this computer did not create it (it is not in "
                f"{ledger.path}): vmexec will not use it. Remove it (`vmexec cleanup "
                f"--fleet {state.fleet_id} --all-owners --yes`) or pick "
                "another name=")


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
                slots=slots(itype), provider=provider_name, state=MachineState.PENDING,
                region=region,
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
