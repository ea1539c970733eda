"""Per region, once: who may reach the machines, and the resources every launch uses.

Owns:

* ``Reach`` — for each region, who may reach port 22 and which address to dial
  (``network.ClientNetwork`` finds it when the first machine is launched there, never
  for a plan), and following this computer when its public address changes (the
  fleet's security groups admit the new address and drop the old one).
* ``RegionSetups`` — the fleet's security group and launch template in a region,
  created on first use (or, for a named fleet, the group an earlier run left, its
  ingress narrowed to this client); what a failed setup created is removed at once.

Lives under ``providers/ec2``. Must not import the scheduler, the executor, transports.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import threading
import time
from typing import Any, Callable, Mapping, Optional

from vmexec.providers.ec2 import network as client_network
from vmexec.providers.ec2 import resources, teardown
from vmexec.providers.ec2.fleet import RegionClients, RegionLaunchSetup
from vmexec.providers.ec2.images import ImageInfo
from vmexec.providers.ec2.named import Ledger, NamedFleetState
from vmexec.providers.ec2.network import ClientNetwork, RegionAccess
from vmexec.providers.ec2.plan import RegionFacts

__all__ = ["Reach", "RegionSetups"]


class Reach:
    """How this computer reaches the fleet's machines, region by region; thread-safe.

    Args:
        network: finds this computer's address (or uses ``ssh_cidr=``).
        facts: region -> its facts (the VPC a client inside EC2 may share).
        clients: region -> its clients (to follow an address change).
    """

    def __init__(self, network: ClientNetwork, facts: Mapping[str, RegionFacts],
                 clients: Mapping[str, RegionClients]) -> None:
        self.network = network
        self._facts = facts
        self._clients = clients
        self._lock = threading.Lock()
        self._access: dict[str, RegionAccess] = {}  # region -> how its machines are reached
        self._groups: dict[str, str] = {}  # region -> the fleet's security group
        self.moved_at = -math.inf  # when the security groups last followed the address

    def access(self, region: str) -> RegionAccess:
        """Who may reach port 22 in ``region`` and which address to dial (found once).

        Raises:
            ConfigError: this computer's address cannot be found (names ``ssh_cidr=``).
        """
        with self._lock:
            known = self._access.get(region)
        if known is not None:
            return known
        access = self.network.access(region, self._facts[region].vpc_id)
        with self._lock:
            return self._access.setdefault(region, access)

    def uses_group(self, region: str, group_id: str) -> None:
        """The fleet's security group in ``region`` (followed when the address moves)."""
        with self._lock:
            self._groups[region] = group_id

    @property
    def automatic(self) -> bool:
        """Whether some region admits this computer's looked-up address (which may move)."""
        with self._lock:
            return any(a.automatic for a in self._access.values())

    def dial_address(self, region: str, entry: Mapping[str, Any]) -> Optional[str]:
        """The address of a running instance to SSH to: private in the client's own VPC,
        else public (private when it has none)."""
        access = self._access.get(region)
        if access is not None and access.private:
            return entry.get("PrivateIpAddress") or entry.get("PublicIpAddress")
        return entry.get("PublicIpAddress") or entry.get("PrivateIpAddress")

    def follow(self, force: bool = False) -> None:
        """After an SSH failure: if this computer's public address changed (another
        network), admit the new one and revoke the old in every region dialled by it."""
        moved = self.network.moved(force=force)
        if moved is None:
            return
        self.moved_at = time.monotonic()
        old, new = moved
        with self._lock:
            regions = [r for r, a in self._access.items() if a.automatic]
            for region in regions:
                self._access[region] = dataclasses.replace(self._access[region], cidr=new)
            groups = {r: self._groups[r] for r in regions if r in self._groups}
        for region, group_id in groups.items():
            client_network.follow(self._clients[region].ec2, region, group_id, old, new)


class RegionSetups:
    """The fleet's security group and launch template per region, made on first use.

    Args:
        fleet_id, tags: the fleet, and the tags of what it creates.
        reach: who may reach port 22 (asked before the group is made).
        clients, facts, images: per region.
        named: a named fleet's resources an earlier run left (reused).
        ledger: a named fleet's record of what this computer created.
        template_data: ``(region, group_id, images) -> (launch template data, root
            mappings per image)``.
    """

    def __init__(self, *, fleet_id: str, tags: Mapping[str, str], reach: Reach,
                 clients: Mapping[str, RegionClients], facts: Mapping[str, RegionFacts],
                 images: Mapping[str, Mapping[tuple[str, bool], ImageInfo]],
                 named: Mapping[str, NamedFleetState], ledger: Optional[Ledger],
                 template_data: Callable[[str, str, Mapping[tuple[str, bool], ImageInfo]],
                                         tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]]
                 ) -> None:
        self.fleet_id = fleet_id
        self.tags = tags
        self.reach = reach
        self._clients = clients
        self._facts = facts
        self._images = images
        self._named = named
        self._ledger = ledger
        self._template_data = template_data
        self._lock = threading.Lock()
        self._setups: dict[str, RegionLaunchSetup] = {}
        self._region_locks = {r: threading.Lock() for r in clients}

    def regions(self) -> set[str]:
        """The regions set up so far."""
        with self._lock:
            return set(self._setups)

    def forget(self, region: str) -> None:
        """``region``'s resources were removed (a failed launch's undo)."""
        with self._lock:
            self._setups.pop(region, None)

    def get(self, region: str) -> RegionLaunchSetup:
        """The region's security group and launch template, created on first use.

        Raises:
            ConfigError, VMExecError: AWS refused; what this call created is removed.
        """
        with self._region_locks[region]:
            with self._lock:
                setup = self._setups.get(region)
            if setup is not None:
                return setup
            ec2 = self._clients[region].ec2
            images = self._images[region]
            named = self._named.get(region)
            access = self.reach.access(region)
            if named is not None and named.security_group:
                # A named fleet's group, from an earlier run: its machines still use it.
                group_id = named.security_group
                resources.allow_ssh(ec2, region, group_id, access.cidr)
                if access.source_groups:
                    client_network.allow_groups(ec2, region, group_id, access.source_groups)
                # Earlier runs' addresses go: only this client's way in stays open.
                resources.restrict_ingress(ec2, region, group_id, access.cidr,
                                           access.source_groups or ())
                for template_id in named.launch_templates:
                    resources.delete_launch_template(ec2, region, template_id)
            else:
                group_id = resources.create_security_group(
                    ec2, region, vpc_id=self._facts[region].vpc_id, fleet_id=self.fleet_id,
                    ssh_cidr=access.cidr, tags=self.tags)
                if self._ledger is not None:
                    self._ledger.add(region, group=group_id)
                if access.source_groups:
                    try:
                        client_network.allow_groups(ec2, region, group_id,
                                                    access.source_groups)
                    except BaseException:
                        teardown.teardown({region: ec2}, self.fleet_id)
                        raise
            self.reach.uses_group(region, group_id)
            try:
                data, block_devices = self._template_data(region, group_id, images)
                template_id = resources.create_launch_template(
                    ec2, region, fleet_id=self.fleet_id, data=data, tags=self.tags)
            except BaseException:
                teardown.teardown({region: ec2}, self.fleet_id)
                raise
            setup = RegionLaunchSetup(region=region, launch_template_id=template_id,
                                      images=images, subnets=self._facts[region].subnets,
                                      block_devices=block_devices)
            with self._lock:
                self._setups[region] = setup
            return setup


def template_data(*, region: str, group_id: str,
                  images: Mapping[tuple[str, bool], ImageInfo], userdata: str,
                  tags: Mapping[str, str], root_volume_gb: Optional[int],
                  iam_instance_profile: Optional[str]
                  ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Launch template data, and per-image root mappings when images differ."""
    def root(image: ImageInfo) -> list[dict[str, Any]]:
        ebs: dict[str, Any] = {"Encrypted": True, "DeleteOnTermination": True,
                               "VolumeType": "gp3"}
        if root_volume_gb:
            ebs["VolumeSize"] = root_volume_gb
        return [{"DeviceName": image.root_device, "Ebs": ebs}]

    first = next(iter(images.values()))
    data: dict[str, Any] = {
        "ImageId": first.image_id,
        "SecurityGroupIds": [group_id],
        "UserData": base64.b64encode(userdata.encode("utf-8")).decode("ascii"),
        # IMDSv2 only: a server-side request forgery on the machine cannot read the
        # instance's role credentials with a plain GET.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 1},
        # The agent's watchdog and the dead-man loop power off: that must end billing.
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": resources.tag_specifications(["instance", "volume"], tags),
    }
    if iam_instance_profile:
        key = "Arn" if iam_instance_profile.startswith("arn:") else "Name"
        data["IamInstanceProfile"] = {key: iam_instance_profile}
    block_devices: dict[str, list[dict[str, Any]]] = {}
    if len({image.root_device for image in images.values()}) == 1:
        data["BlockDeviceMappings"] = root(first)
    else:
        block_devices = {image.image_id: root(image) for image in images.values()}
    return data, block_devices
