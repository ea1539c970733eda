"""Reaching the machines from where users are (issue 11, items 1-5): the public address
found by asking an endpoint (emulated on loopback), planning and cost checks that never
wait for it, a client inside a VPC, and a client whose address changes mid-run.

The first part runs on moto with an HTTP endpoint of the test's own on 127.0.0.1; the
second end to end on the local cloud, whose gates enforce the security groups.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from typing import Any, Iterator

import pytest

from aws_fixtures import MIXED, REGIONS
from helpers import FakeRoute
from vmexec import BudgetExceeded, ConfigError, VMExecutor
from vmexec.providers.ec2 import EC2Provider
from vmexec.providers.ec2.network import ClientNetwork, lookup_public_address, read_imds


class Endpoint:
    """A loopback HTTP endpoint answering every GET with ``status`` and ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = "198.51.100.23\n"
        self.requests = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                endpoint.requests += 1
                data = endpoint.body.encode()
                self.send_response(endpoint.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    yield server
    server.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def _ec2(session: Any, **options: Any) -> dict[str, Any]:
    return dict(provider="ec2", instance_type=MIXED, regions=REGIONS, session=session,
                handle_signals=False, environment=None, **options)


# --- the lookup itself -----------------------------------------------------------------

def test_public_address_is_asked_once_and_becomes_a_slash_32(endpoint: Endpoint) -> None:
    network = ClientNetwork(None, endpoint.url)
    assert network.public_cidr() == "198.51.100.23/32"
    assert network.access("us-east-1", "vpc-1").cidr == "198.51.100.23/32"
    assert network.access("us-west-2", "vpc-2").automatic
    assert endpoint.requests == 1  # cached for the run


def test_an_ipv6_answer_becomes_a_slash_128(endpoint: Endpoint) -> None:
    endpoint.body = "2001:db8::42\n"
    assert ClientNetwork(None, endpoint.url).public_cidr() == "2001:db8::42/128"


@pytest.mark.parametrize("status, body, why", [
    (503, "busy", "HTTP 503"),
    (200, "<html>captive portal</html>", "not an IP address"),
])
def test_a_failed_lookup_is_a_config_error_naming_ssh_cidr(endpoint: Endpoint, status: int,
                                                           body: str, why: str) -> None:
    endpoint.status, endpoint.body = status, body
    network = ClientNetwork(None, endpoint.url)
    with pytest.raises(ConfigError, match=rf"ssh_cidr=.*|{why}") as info:
        network.public_cidr()
    assert "ssh_cidr=" in str(info.value) and why in str(info.value)
    with pytest.raises(ConfigError):  # the failure is kept for the run too
        network.public_cidr()
    assert endpoint.requests == 1


def test_an_endpoint_that_does_not_answer_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(OSError, match="failed"):
        lookup_public_address(_closed_port_url(), timeout=2.0)
    assert time.monotonic() - started < 2.0


def test_an_explicit_ssh_cidr_asks_nobody(endpoint: Endpoint) -> None:
    network = ClientNetwork("192.0.2.0/24", endpoint.url)
    assert network.access("us-east-1", "vpc-1").cidr == "192.0.2.0/24"
    assert network.moved(force=True) is None
    assert endpoint.requests == 0


def test_no_metadata_service_means_not_inside_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    assert read_imds(_closed_port_url(), timeout=1.0) is None
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert read_imds() is None  # disabled: not even asked


def test_moved_reports_a_new_address_once(endpoint: Endpoint) -> None:
    network = ClientNetwork(None, endpoint.url)
    assert network.public_cidr() == "198.51.100.23/32"
    endpoint.body = "198.51.100.99"
    assert network.moved() is None  # asked a moment ago: not again so soon
    assert network.moved(force=True) == ("198.51.100.23/32", "198.51.100.99/32")
    assert network.moved(force=True) is None
    assert network.public_cidr() == "198.51.100.99/32"


# --- the order of checks (moto) --------------------------------------------------------

def test_dry_run_and_budget_refusal_never_wait_for_the_lookup(session: Any, calls: Any,
                                                              no_network: list[Any]) -> None:
    # The default: AWS's own endpoint. The no_network guard fails the test if anything
    # tries to reach it (or any other address off this machine).
    ex = VMExecutor(16, **_ec2(session, dry_run=True))
    assert "c7g.large" in ex.plan and "$" in ex.plan
    ex.shutdown()
    with pytest.raises(BudgetExceeded, match="max_hourly_cost"):
        VMExecutor(2000, **_ec2(session, max_hourly_cost=1.0))
    assert no_network == []
    assert calls["CreateSecurityGroup"] == 0 and calls["CreateFleet"] == 0


def test_a_bad_option_is_still_a_config_error_before_any_call(session: Any, calls: Any
                                                              ) -> None:
    with pytest.raises(ConfigError, match="address_lookup must be"):
        VMExecutor(4, **_ec2(session, address_lookup="ftp://example.invalid/"))
    with pytest.raises(ConfigError, match="ssh_cidr must be a network"):
        VMExecutor(4, **_ec2(session, ssh_cidr="my laptop"))
    assert calls.total == 0


def test_launch_stops_before_creating_anything_when_the_lookup_fails(
        session: Any, calls: Any) -> None:
    provider = EC2Provider(4, instance_type="c7i.large", regions="us-east-1",
                           session=session, handle_signals=False, environment=None,
                           address_lookup=_closed_port_url())
    try:
        with pytest.raises(ConfigError, match=r"could not find this computer's public "
                                              r"address.*ssh_cidr="):
            provider.launch(2)
        assert calls["CreateSecurityGroup"] == 0 and calls["CreateFleet"] == 0
    finally:
        provider.terminate(None)


def test_lookup_off_uses_only_the_routes_address(session: Any, calls: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    provider = EC2Provider(4, instance_type="c7i.large", regions="us-east-1",
                           session=session, handle_signals=False, environment=None,
                           address_lookup=False)
    try:
        monkeypatch.setattr(socket, "socket", FakeRoute("192.168.1.23"))
        with pytest.raises(ConfigError, match=r"192\.168\.1\.23 is private.*"
                                              r"address_lookup=False.*ssh_cidr="):
            provider.launch(2)
    finally:
        monkeypatch.undo()
        provider.terminate(None)
    assert calls["CreateSecurityGroup"] == 0


def test_the_security_group_admits_the_looked_up_address(session: Any, calls: Any,
                                                         endpoint: Endpoint) -> None:
    provider = EC2Provider(2, instance_type="c7i.large", regions="us-east-1",
                           session=session, handle_signals=False, environment=None,
                           address_lookup=endpoint.url)
    try:
        records = provider.launch(2)
        assert records
        ec2 = session.client("ec2", region_name="us-east-1")
        group = ec2.describe_security_groups(
            Filters=[{"Name": "tag:vmexec:fleet", "Values": [provider.fleet_id]}]
        )["SecurityGroups"][0]
        cidrs = [r["CidrIp"] for p in group["IpPermissions"] for r in p["IpRanges"]]
        assert cidrs == ["198.51.100.23/32"]
        assert endpoint.requests == 1
    finally:
        provider.terminate(None)


# --- end to end on the local cloud -----------------------------------------------------

REGION = "us-east-1"
OTHER_REGION = "us-west-2"
TIMING = dict(boot_timeout=180, heartbeat_interval=0.5, heartbeat_timeout=10)


def _where(x: int) -> tuple[int, str]:
    import os

    return x, os.environ.get("VMEXEC_ROOT", "")


def _slow(x: int) -> int:
    time.sleep(0.3)
    return x * x


@pytest.fixture
def firewalled() -> Iterator[Any]:
    from vmexec.testing.localcloud import LocalCloud
    from vmexec.testing.sshd import sshd_available

    missing = sshd_available()
    if missing is not None:
        pytest.fail(f"the local cloud needs OpenSSH's sshd: {missing}")
    with LocalCloud(regions=[REGION], firewall=True) as cloud:
        yield cloud
        assert cloud.offmachine_requests == []


def test_e2e_default_path_admits_the_address_the_endpoint_reports(firewalled: Any) -> None:
    cloud = firewalled
    options = cloud.executor_options()
    assert "ssh_cidr" not in options
    with VMExecutor(2, provider="ec2", instance_type="c7i.large", regions=REGION,
                    **TIMING, **options) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=240) == 1024
        assert cloud.ssh_rules() == ["203.0.113.7/32"]
        assert cloud.checkip_requests >= 1
    assert cloud.tagged_resources() == []


def test_e2e_the_firewall_refuses_a_client_the_group_does_not_admit(firewalled: Any) -> None:
    cloud = firewalled
    with VMExecutor(2, provider="ec2", instance_type="c7i.large", regions=REGION,
                    max_retries=0, **{**TIMING, "boot_timeout": 20},
                    **cloud.executor_options(ssh_cidr="192.0.2.0/24")) as ex:
        future = ex.submit(pow, 2, 3)
        with pytest.raises(Exception, match="not ready within|no machine can run"):
            future.result(timeout=240)
    assert cloud.firewall_refusals >= 1


def test_e2e_client_inside_a_vpc_uses_private_addresses_there(firewalled: Any) -> None:
    cloud = firewalled
    placement = cloud.place_client(REGION)
    with VMExecutor(4, provider="ec2", instance_type="c7i.large",
                    regions=[REGION, OTHER_REGION], **TIMING,
                    **cloud.executor_options()) as ex:
        cloud.wait_for(lambda: len(ex.fleet) >= 2 or not list(ex.map(_where, range(8))),
                       240, "a machine in each region")
        results = list(ex.map(_where, range(20)))
        fleet = {m.id: m for m in ex.fleet}
        home = cloud.ssh_rules(REGION)
        other = cloud.ssh_rules(OTHER_REGION)
        described = {i["InstanceId"]: i for i in cloud.instances()}
    assert [r[0] for r in results] == list(range(20))
    assert {m.region for m in fleet.values()} == {REGION, OTHER_REGION}
    # Same region and VPC: the client's security group; elsewhere its public address.
    assert placement["security_group"] in home and "203.0.113.7/32" not in home
    assert other == ["203.0.113.7/32"]
    for instance_id, machine in fleet.items():
        inst = described[instance_id]
        expected = inst["PrivateIpAddress"] if machine.region == REGION else \
            inst["PublicIpAddress"]
        assert machine.address == expected
    assert cloud.tagged_resources() == []


def test_e2e_a_client_that_changes_networks_loses_no_task(firewalled: Any) -> None:
    cloud = firewalled
    # Heartbeats are not what is tested: a generous timeout, so that a busy computer
    # cannot lose the machine for another reason than the move.
    timing = {**TIMING, "heartbeat_timeout": 120}
    with VMExecutor(2, provider="ec2", instance_type="c7i.large", regions=REGION,
                    max_retries=5, **timing, **cloud.executor_options()) as ex:
        assert ex.submit(pow, 3, 2).result(timeout=240) == 9
        assert cloud.ssh_rules() == ["203.0.113.7/32"]
        machines = {m.id for m in ex.fleet}
        futures = [ex.submit(_slow, i) for i in range(24)]
        futures[0].result(timeout=120)
        assert cloud.move_client("198.51.100.99") >= 1  # the open connections drop
        assert [f.result(timeout=300) for f in futures] == [i * i for i in range(24)]
        # The new address was authorized and the old one revoked ...
        assert cloud.ssh_rules() == ["198.51.100.99/32"]
        # ... and the client reconnected to the same machines: nothing new was launched.
        assert {m.id for m in ex.fleet} == machines
        assert {i["InstanceId"] for i in cloud.instances()} == machines
    assert cloud.tagged_resources() == []


def test_a_machine_reconnected_to_is_billed_all_along() -> None:
    from vmexec.guardrails.budget import CostMeter
    from vmexec.guardrails.pricing import PriceBook
    from vmexec.providers.base import MachineRecord

    now = [0.0]
    meter = CostMeter(PriceBook(live=False), clock=lambda: now[0])
    record = MachineRecord(id="i-1", label="i-1", slots=2, provider="ec2",
                           region="us-east-1", instance_type="c7i.large")
    meter.started(record)
    now[0] = 1800.0
    meter.stopped(record)  # the scheduler let it go: its connection broke
    now[0] = 1900.0
    meter.started(record)  # handed back and reconnected: it ran all along
    now[0] = 3600.0
    assert meter.seconds_by_group() == {("c7i.large", "us-east-1", "on-demand"): 3600.0}
