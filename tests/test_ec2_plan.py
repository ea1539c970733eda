"""The EC2 plan: sizing, balancing, growth, and every ConfigError raised before a launch.

The AWS fixtures live in aws_fixtures.py (``from aws_fixtures
import ...``): fake credentials with every ``AWS_*`` variable from the environment
removed, moto's in-process ``mock_aws``, a guard that fails any TCP connection off
loopback (nothing may reach a real endpoint), a fake clock so retries never sleep, and a
provider factory that tears down what it made.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Optional

import boto3
import pytest

from vmexec.errors import ConfigError
from vmexec.providers.ec2 import EC2Provider, detect_ssh_cidr
from vmexec.providers.ec2.images import ssm_parameter
from vmexec.providers.ec2.plan import (
    Plan,
    PlanLine,
    RegionFacts,
    TypeInfo,
    allocate,
    check_regions,
    make_plan,
)
from vmexec.testing.faults import ApiCallCounter

from aws_fixtures import MIXED, REGIONS, TEST_CIDR, launches, tagged
from helpers import FakeRoute

# --- pure planning --------------------------------------------------------------------

def _facts(regions: list[str], types: dict[str, TypeInfo],
           missing: Optional[dict[str, list[str]]] = None) -> dict[str, RegionFacts]:
    out = {}
    for region in regions:
        absent = (missing or {}).get(region, [])
        zones = {t: (f"{region}a", f"{region}b") for t in types if t not in absent}
        out[region] = RegionFacts(region=region, types=types, zones=zones,
                                  subnets={f"{region}a": "subnet-a", f"{region}b": "subnet-b"})
    return out


TYPES = {
    "c7g.large": TypeInfo("c7g.large", "arm64", 2, 4096),
    "c7i.large": TypeInfo("c7i.large", "x86_64", 2, 4096),
    "c7i.xlarge": TypeInfo("c7i.xlarge", "x86_64", 4, 8192),
}
FOUR_REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1"]


def test_plan_splits_slots_evenly_over_regions_and_architectures() -> None:
    plan = make_plan(_facts(FOUR_REGIONS, TYPES), MIXED, FOUR_REGIONS, max_workers=2000)
    assert len(plan.lines) == 8
    assert {line.machines for line in plan.lines} == {125}
    assert plan.total_machines == 1000 and plan.total_slots == 2000
    assert {line.arch for line in plan.lines} == {"arm64", "x86_64"}
    text = plan.text()
    assert "1000 machine(s), 2000 slots" in text
    assert "eu-central-1  c7i.large  x86_64" in text
    assert plan.hourly_cost is None  # prices come from the guardrails later


def test_plan_never_overshoots_by_more_than_a_machine() -> None:
    plan = make_plan(_facts(REGIONS, TYPES), ["c7i.xlarge"], REGIONS, max_workers=10)
    # 4-slot machines: 3 machines (12 slots), not 2 per region (16).
    assert plan.total_machines == 3 and plan.total_slots == 12
    assert sorted(line.machines for line in plan.lines) == [1, 2]


def test_slots_per_machine_overrides_vcpus() -> None:
    plan = make_plan(_facts(REGIONS, TYPES), MIXED, REGIONS, max_workers=8,
                     slots_per_machine=1)
    assert plan.total_machines == 8
    assert all(line.slots_per_machine == 1 for line in plan.lines)


def test_allocate_grows_with_demand_and_stops_at_the_plan() -> None:
    plan = make_plan(_facts(REGIONS, TYPES), MIXED, REGIONS, max_workers=40)
    first = allocate(plan, {}, 3)
    # Three tasks: two 2-slot machines, one per region, never the whole plan.
    assert sum(first.values()) == 2
    assert {region for region, _ in first} == set(REGIONS)
    live = dict(first)
    second = allocate(plan, live, 4)
    for key, count in second.items():
        live[key] = live.get(key, 0) + count
    # Both architectures appear as soon as there are machines to spread.
    assert {t for _, t in live} == set(MIXED)
    rest = allocate(plan, live, 10_000)
    for key, count in rest.items():
        live[key] = live.get(key, 0) + count
    assert sum(live.values()) == plan.total_machines
    assert allocate(plan, live, 5) == {}


def test_arm_filter() -> None:
    facts = _facts(REGIONS, TYPES)
    plan = make_plan(facts, MIXED, REGIONS, max_workers=8, arm=True)
    assert {line.instance_type for line in plan.lines} == {"c7g.large"}
    with pytest.raises(ConfigError) as info:
        make_plan(facts, ["c7i.large"], REGIONS, max_workers=8, arm=True)
    message = str(info.value)
    assert "arm=True leaves no instance type" in message
    assert "c7i.large (x86_64)" in message and "c7g.large" in message


def test_type_not_offered_in_a_region_names_the_alternatives() -> None:
    facts = _facts(REGIONS, TYPES, missing={"us-west-2": ["c7g.large"]})
    with pytest.raises(ConfigError) as info:
        make_plan(facts, MIXED, REGIONS, max_workers=8)
    message = str(info.value)
    assert "c7g.large is not offered in us-west-2" in message
    assert "offered in us-east-1" in message and "c7i.large" in message


def test_unknown_type_suggests_close_names() -> None:
    facts = {r: RegionFacts(region=r, types={"c7i.large": TYPES["c7i.large"]},
                            unknown=("c7g.lareg",), zones={"c7i.large": (f"{r}a",)},
                            subnets={f"{r}a": "s"},
                            offered_names=("c7g.large", "c7g.xlarge", "m7g.large"))
             for r in REGIONS}
    with pytest.raises(ConfigError, match=r"'c7g.lareg' is not an EC2 instance type.*"
                                          r"c7g\.large"):
        make_plan(facts, ["c7g.lareg", "c7i.large"], REGIONS, max_workers=8)


def test_check_regions() -> None:
    available = {"us-east-1": "opt-in-not-required", "us-west-2": "opt-in-not-required",
                 "af-south-1": "not-opted-in"}
    check_regions(["us-east-1"], available)
    with pytest.raises(ConfigError, match=r"'us-est-1' is not an AWS region\. Did you mean "
                                          r"'us-east-1'.*enabled.*us-west-2"):
        check_regions(["us-est-1"], available)
    with pytest.raises(ConfigError, match=r"'af-south-1' is not enabled.*enable-region"):
        check_regions(["af-south-1"], available)


def test_plan_line_lookup() -> None:
    plan = Plan(max_workers=1, spot=False, lines=[
        PlanLine("r", "t", "arm64", 2, 1024, 0, 2, 1, ("ra",))])
    assert plan.line("r", "t").slots == 2
    with pytest.raises(KeyError):
        plan.line("r", "other")


# --- the provider validates before anything exists -------------------------------------

def test_mixed_plan_from_moto(make_provider: Callable[..., EC2Provider],
                              calls: ApiCallCounter, caplog: pytest.LogCaptureFixture,
                              session: boto3.Session) -> None:
    with caplog.at_level(logging.INFO, logger="vmexec.providers.ec2"):
        provider = make_provider(40)
    plan = provider.plan
    assert plan.total_slots == 40
    assert {(line.region, line.arch) for line in plan.lines} == {
        (r, a) for r in REGIONS for a in ("arm64", "x86_64")}
    assert all(line.zones for line in plan.lines)
    assert "vmexec plan: 20 machine(s), 40 slots" in caplog.text
    # Discovery is a handful of calls per region, and it creates nothing.
    assert calls["DescribeInstanceTypes"] == len(REGIONS)
    assert launches(calls) == 0 and calls["CreateSecurityGroup"] == 0
    # One image per architecture and region, from the public SSM parameters.
    for region in REGIONS:
        ssm = session.client("ssm", region_name=region)
        for arch in ("arm64", "x86_64"):
            expected = ssm.get_parameter(Name=ssm_parameter(arch, False))["Parameter"]["Value"]
            assert provider.images[region][(arch, False)].image_id == expected


@pytest.mark.parametrize("options, pattern", [
    (dict(instance_type="c7g.lareg"), r"'c7g.lareg' is not an EC2 instance type.*c7g\.large"),
    (dict(regions=["us-east-1", "us-wset-2"]), r"'us-wset-2' is not an AWS region.*us-west-2"),
    (dict(instance_type=["hpc7g.4xlarge"]), r"hpc7g.4xlarge is not offered in us-west-2"),
    (dict(instance_type=["c7i.large"], arm=True), r"arm=True leaves no instance type"),
    (dict(instance_type=None), r"needs instance_type="),
    (dict(arm="yes"), r"arm must be True"),
    (dict(tags={"vmexec:fleet": "x"}), r"reserved prefix"),
    (dict(ssh_cidr="not-a-network"), r"ssh_cidr must be a network"),
    (dict(packages="numpy"), r"packages must be a list of strings, not one string"),
    (dict(ami="image-1"), r"ami must be an image id"),
    (dict(ami="ami-0123456789abcdef0"), r"ami-0123456789abcdef0.*(not found|does not exist)"),
    (dict(root_volume_gb=2), r"root_volume_gb=2 is smaller than"),
    (dict(name="no spaces"), r"name must be"),
    (dict(slots_per_machine=0), r"slots_per_machine must be a positive integer"),
    (dict(unexpected=1), r"does not take option\(s\) unexpected; it accepts instance_type"),
])
def test_bad_configuration_fails_before_any_launch(
        make_provider: Callable[..., EC2Provider], calls: ApiCallCounter,
        session: boto3.Session, options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        make_provider(8, **options)
    assert launches(calls) == 0
    assert calls["CreateSecurityGroup"] == calls["CreateLaunchTemplate"] == 0
    assert tagged(session, REGIONS) == []


def test_max_workers_is_required(make_provider: Callable[..., EC2Provider]) -> None:
    with pytest.raises(ConfigError, match="needs max_workers"):
        make_provider(None)


def test_missing_credentials(moto: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with pytest.raises(ConfigError, match="no AWS credentials found"):
        EC2Provider(4, instance_type="c7g.large", ssh_cidr=TEST_CIDR, handle_signals=False,
                    environment=None)


def test_gpu_type_without_a_gpu_image_asks_for_ami(
        make_provider: Callable[..., EC2Provider], calls: ApiCallCounter) -> None:
    # moto publishes no Deep Learning AMI parameter: the message must say what to do.
    with pytest.raises(ConfigError, match=r"no GPU image for x86_64 in us-east-1.*ami="):
        make_provider(4, instance_type="g5.xlarge", regions="us-east-1")
    assert launches(calls) == 0


def test_ami_override(make_provider: Callable[..., EC2Provider], session: boto3.Session
                      ) -> None:
    ssm = session.client("ssm", region_name="us-east-1")
    arm_image = ssm.get_parameter(Name=ssm_parameter("arm64", False))["Parameter"]["Value"]
    provider = make_provider(4, regions="us-east-1",
                             ami={("us-east-1", "arm64"): arm_image})
    assert provider.images["us-east-1"][("arm64", False)].source == "ami="
    assert provider.images["us-east-1"][("x86_64", False)].source.startswith("/aws/service/")
    # One image id cannot serve both architectures.
    with pytest.raises(ConfigError, match=r"is arm64, but the x86_64 instance types"):
        make_provider(4, regions="us-east-1", ami=arm_image)


# --- the client's address --------------------------------------------------------------

def test_ssh_cidr_default_is_this_clients_public_address(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(socket, "socket", FakeRoute("1.2.3.4"))
    assert detect_ssh_cidr() == "1.2.3.4/32"


def test_ssh_cidr_default_refuses_a_private_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "socket", FakeRoute("192.168.1.23"))
    with pytest.raises(ConfigError, match=r"192\.168\.1\.23 is private.*ssh_cidr="):
        detect_ssh_cidr()
