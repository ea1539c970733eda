"""The client's network as EC2 would see it, played on 127.0.0.1.

Owns ``ClientNetwork``, one HTTP server on a free port of 127.0.0.1 that serves:

* the machines' package index (the ``vmexec.testing.wheelhouse`` directory:
  ``/simple/`` and ``/files/``);
* AWS's "what is my IP" endpoint (``/checkip``, answering ``client_address``);
* the instance metadata service (IMDSv2) of a client placed inside a VPC (``place``);

and, with ``firewall=True``, a gate per machine in front of its sshd that admits a
connection only when a tcp/22 rule of the instance's security groups admits the client
as it dials (its public address, or, over a private address, its security group or
private address); a client that moves to another network (``move``) loses every
connection through the gates.

Part of ``LocalCloud`` (``vmexec.testing.localcloud``), whose lock, clients and
instances it uses. Must not import: paramiko, the scheduler, the executor or any
provider.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import socket
import struct
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from vmexec.providers.ec2.resources import TAG_FLEET
from vmexec.testing.faults import LaunchTemplates
from vmexec.testing.motoserver import MOTO_ERRORS
from vmexec.testing.proxy import TCPProxy

if TYPE_CHECKING:
    from vmexec.testing.localcloud import LocalCloud

__all__ = ["ClientNetwork", "Gate", "port22_sources", "in_any"]

log = logging.getLogger(__name__)


class ClientNetwork:
    """The client's address, placement and firewall, and the HTTP server behind them.

    Args:
        cloud: the ``LocalCloud`` it belongs to (its clients and instances).
        lock: the cloud's lock, which guards this state too.
        templates: launch template data, read without faults.
        launch_template_of: the template version an instance was launched from.
        client_address: the address the "what is my IP" endpoint answers.
        firewall: enforce each machine's security group on its SSH port.

    Attributes:
        index_url, find_links, checkip_url, imds_url: its URLs (after ``start``).
        checkip_requests, wheel_requests, firewall_refusals: what it answered or refused.
    """

    def __init__(self, cloud: "LocalCloud", lock: threading.RLock, templates: LaunchTemplates,
                 launch_template_of: Callable[[str, dict[str, Any]], Optional[dict[str, str]]],
                 client_address: str, firewall: bool) -> None:
        self._cloud = cloud
        self._lock = lock
        self._templates = templates
        self._launch_template_of = launch_template_of
        self.firewall = firewall
        self.client_address = str(ipaddress.ip_address(client_address))
        self.client_placement: Optional[dict[str, Any]] = None
        self.index_url = ""
        self.find_links = ""
        self.checkip_url = ""
        self.imds_url = ""
        self.checkip_requests = 0
        self.wheel_requests = 0
        self.firewall_refusals = 0
        self._gates: dict[str, Gate] = {}
        self._dialled: dict[str, str] = {}  # instance id -> "public" | "private"
        self._http: Optional[http.server.ThreadingHTTPServer] = None
        self._http_thread: Optional[threading.Thread] = None

    def start(self, root: Path) -> None:
        """Serve ``root`` (the wheelhouse) and the endpoints on a free port of 127.0.0.1."""
        network = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/checkip":
                    with network._lock:
                        network.checkip_requests += 1
                        answer = network.client_address
                    self._answer(200, answer + "\n")
                    return
                if self.path.startswith("/latest/"):
                    self._metadata()
                    return
                if self.path.endswith(".whl"):
                    with network._lock:
                        network.wheel_requests += 1
                super().do_GET()

            def do_PUT(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/latest/api/token" and network.client_placement is not None:
                    self._answer(200, "local-cloud-imds-token")
                else:
                    self._answer(404, "not found")

            def _metadata(self) -> None:
                placement = network.client_placement
                if placement is None or \
                        self.headers.get("X-aws-ec2-metadata-token") != "local-cloud-imds-token":
                    self._answer(401 if placement is not None else 404, "")
                    return
                interface = f"/latest/meta-data/network/interfaces/macs/{placement['mac']}/"
                answers = {
                    "/latest/meta-data/instance-id": placement["instance_id"],
                    "/latest/meta-data/placement/region": placement["region"],
                    "/latest/meta-data/mac": placement["mac"],
                    "/latest/meta-data/local-ipv4": placement["private_ip"],
                    interface + "vpc-id": placement["vpc_id"],
                    interface + "vpc-ipv4-cidr-blocks": placement["vpc_cidr"],
                    interface + "security-group-ids": placement["security_group"],
                }
                if self.path in answers:
                    self._answer(200, answers[self.path])
                else:
                    self._answer(404, "")

            def _answer(self, status: int, text: str) -> None:
                body = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("index: " + format, *args)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A machine stopped mid-download (its fleet was torn down): not an error.
                log.debug("index: a download to %s ended early", client_address,
                          exc_info=True)

        server = Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._http = server
        self._http_thread = threading.Thread(target=server.serve_forever,
                                             name="localcloud-index", daemon=True)
        self._http_thread.start()
        port = server.server_address[1]
        self.index_url = f"http://127.0.0.1:{port}/simple/"
        self.find_links = f"http://127.0.0.1:{port}/files/"
        self.checkip_url = f"http://127.0.0.1:{port}/checkip"
        self.imds_url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        """Close every gate and the HTTP server (idempotent)."""
        with self._lock:
            gates, self._gates = list(self._gates.values()), {}
        for gate in gates:
            gate.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(10)
            self._http = None

    def gate(self, instance_id: str, address: tuple[str, int], dialled: Optional[str]
             ) -> tuple[str, int]:
        """Where the client dials ``instance_id`` (at ``address``) through its gate, which
        applies its security group to the address it dialled (``dialled``: its public
        or private address)."""
        self._dialled[instance_id] = self._route_of(instance_id, dialled)
        with self._lock:
            gate = self._gates.get(instance_id)
            if gate is None:
                gate = Gate(address[0], address[1], admit=lambda: self._admits(instance_id))
                self._gates[instance_id] = gate
            return gate.host, gate.port

    def place(self, region: str) -> dict[str, Any]:
        """Make the client an instance in ``region``'s default VPC with its own security
        group, as the metadata service then describes it; returns that placement."""
        ec2 = self._cloud.client(region)
        vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
        group = ec2.create_security_group(GroupName=f"notebook-{uuid.uuid4().hex[:6]}",
                                          Description="the client's own instance",
                                          VpcId=vpc["VpcId"])["GroupId"]
        network = ipaddress.ip_network(vpc["CidrBlock"])
        placement = {"region": region, "vpc_id": vpc["VpcId"], "vpc_cidr": str(network),
                     "security_group": group,
                     "private_ip": str(network[4242 % network.num_addresses]),
                     "instance_id": f"i-{uuid.uuid4().hex[:17]}",
                     "mac": "0e:00:00:00:42:01"}
        with self._lock:
            self.client_placement = placement
        log.info("client placed in %s %s (%s, group %s)", region, vpc["VpcId"],
                 placement["private_ip"], group)
        return dict(placement)

    def move(self, address: str) -> int:
        """The client changes networks: the endpoint answers ``address`` from now on,
        and every connection through a gate drops. Returns how many dropped."""
        with self._lock:
            self.client_address = str(ipaddress.ip_address(address))
            gates = list(self._gates.values())
        dropped = sum(gate.cut() for gate in gates)
        log.info("client moved to %s: %d connection(s) dropped", address, dropped)
        return dropped

    def ssh_rules(self, regions: Iterable[str]) -> list[str]:
        """What tcp/22 of the fleets' security groups admits now (CIDRs and group ids),
        in ``regions``, sorted."""
        found: set[str] = set()
        has_tag = [{"Name": "tag-key", "Values": [TAG_FLEET]}]
        for name in regions:
            groups = self._cloud.client(name).describe_security_groups(Filters=has_tag)
            for group in groups["SecurityGroups"]:
                found.update(port22_sources(group))
        return sorted(found)

    def _route_of(self, instance_id: str, address: Optional[str]) -> str:
        if address is None:
            return "public"
        for inst in self._cloud.instances():
            if inst["InstanceId"] == instance_id:
                return "private" if address == inst.get("PrivateIpAddress") else "public"
        return "public"

    def _admits(self, instance_id: str) -> bool:
        """Whether the instance's security groups let the client in on tcp/22 now."""
        inst = next((i for i in self._cloud.instances() if i["InstanceId"] == instance_id), None)
        if inst is None:
            return False
        region = inst["Region"]
        group_ids = [g["GroupId"] for g in inst.get("SecurityGroups", [])]
        if not group_ids:  # moto leaves a launch template's groups off the instance
            template = self._launch_template_of(region, inst)
            data = self._templates.data(region, template) if template else {}
            group_ids = list(data.get("SecurityGroupIds") or [])
        if not group_ids:
            return False
        groups = self._cloud.client(region).describe_security_groups(GroupIds=group_ids)
        sources: set[str] = set()
        for group in groups["SecurityGroups"]:
            sources.update(port22_sources(group))
        with self._lock:
            placement = self.client_placement
            public = self.client_address
        if self._dialled.get(instance_id) == "private":
            if placement is None or placement["vpc_id"] != inst.get("VpcId") \
                    or placement["region"] != region:
                admitted = False  # a private address is not routable from elsewhere
            else:
                admitted = placement["security_group"] in sources or \
                    in_any(placement["private_ip"], sources)
        else:
            admitted = in_any(public, sources)
        if not admitted:
            with self._lock:
                self.firewall_refusals += 1
            log.info("firewall: %s refuses the client (%s; tcp/22 admits %s)", instance_id,
                     self._dialled.get(instance_id, "public"), sorted(sources) or "nobody")
        return admitted


class Gate(TCPProxy):
    """A machine's SSH port as the client reaches it: each new connection is admitted
    only when ``admit()`` says its security group lets the client in (else reset)."""

    def __init__(self, host: str, port: int, admit: Callable[[], bool]) -> None:
        self._admit = admit
        super().__init__(host, port)

    def _start_pair(self, client: socket.socket) -> None:
        try:
            admitted = self._admit()
        except MOTO_ERRORS as exc:
            log.warning("firewall: could not read the security group: %s", exc)
            admitted = False
        if not admitted:
            # Zero linger: the client gets a reset, as from a port nobody may reach.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        super()._start_pair(client)


def port22_sources(group: dict[str, Any]) -> set[str]:
    """CIDRs and group ids that ``group`` admits on tcp/22."""
    found: set[str] = set()
    for rule in group.get("IpPermissions", []):
        if rule.get("IpProtocol") not in ("tcp", "-1") or \
                not rule.get("FromPort", 0) <= 22 <= rule.get("ToPort", 65535):
            continue
        found.update(r["CidrIp"] for r in rule.get("IpRanges", []))
        found.update(r["CidrIpv6"] for r in rule.get("Ipv6Ranges", []))
        found.update(p["GroupId"] for p in rule.get("UserIdGroupPairs", []))
    return found


def in_any(address: str, sources: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    for source in sources:
        try:
            if ip in ipaddress.ip_network(source, strict=False):
                return True
        except ValueError:
            continue  # a group id
    return False
