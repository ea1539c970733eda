"""The estimate, the hourly limit, the cost meter's receipt and the leftovers query.

Figures are checked against the bundled table (``prices.json``) and moto's spot price
history (every zone at $0.00001): the arithmetic, not the table against AWS.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import boto3
import pytest

from aws_fixtures import MIXED, REGIONS
from vmexec import BudgetExceeded
from vmexec.errors import ConfigError
from vmexec.guardrails.budget import (
    SECONDS_PER_MONTH,
    CostMeter,
    check_max_hourly_cost,
    estimate,
    find_leftovers,
    format_duration,
    format_usd,
)
from vmexec.guardrails.pricing import PriceBook, bundled_table
from vmexec.providers.base import MachineRecord
from vmexec.providers.ec2 import EC2Provider
from vmexec.providers.ec2.plan import Plan, PlanLine

TABLE = bundled_table()["on_demand"]
MOTO_SPOT = 0.00001


def line(region: str, itype: str, machines: int, vcpus: int = 2,
         arch: str = "arm64") -> PlanLine:
    return PlanLine(region=region, instance_type=itype, arch=arch, vcpus=vcpus,
                    memory_mib=4096, gpus=0, slots_per_machine=vcpus, machines=machines,
                    zones=(f"{region}a",))


def plan_of(*lines: PlanLine, spot: bool = False) -> Plan:
    return Plan(max_workers=sum(ln.slots for ln in lines), spot=spot, lines=list(lines))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(rid: str, itype: str | None = "c7g.large", region: str | None = "us-east-1",
           spot: bool = False, provider: str = "ec2") -> MachineRecord:
    return MachineRecord(id=rid, label=rid, slots=2, provider=provider, region=region,
                         instance_type=itype, spot=spot)


# --- estimate ----------------------------------------------------------------------------

def test_estimate_is_machines_times_table_price() -> None:
    plan = plan_of(line("us-east-1", "c7g.large", 500),
                   line("eu-west-1", "c7i.large", 250, arch="x86_64"),
                   line("eu-west-1", "c7g.large", 0))  # a fallback line: not priced
    cost = estimate(plan, PriceBook(live=False), spot=False)
    expected = 500 * TABLE["us-east-1"]["c7g.large"] + 250 * TABLE["eu-west-1"]["c7i.large"]
    assert cost.total_per_hour == pytest.approx(expected)
    assert cost.lines == [
        ("us-east-1", "c7g.large", "arm64", 500, 1000, False,
         pytest.approx(500 * 0.0725)),
        ("eu-west-1", "c7i.large", "x86_64", 250, 500, False,
         pytest.approx(250 * 0.09576)),
    ]
    assert cost.unknown == [] and cost.total_slots == 1500
    assert cost.per_slot_hour == pytest.approx(expected / 1500)
    text = cost.text()
    for word in ("us-east-1", "eu-west-1", "c7g.large", "c7i.large", "arm64", "x86_64",
                 "500", "1000", format_usd(500 * 0.0725), format_usd(expected), "total"):
        assert word in text, word


def test_estimate_names_unknown_prices() -> None:
    plan = plan_of(line("us-east-1", "c7g.large", 2), line("ap-south-1", "c7g.large", 3))
    cost = estimate(plan, PriceBook(live=False), spot=False)
    assert cost.unknown == ["c7g.large in ap-south-1"]
    assert cost.total_per_hour == pytest.approx(2 * 0.0725)
    assert cost.lines[1][6] is None
    assert "price unknown for c7g.large in ap-south-1" in cost.text()
    assert "unknown" in cost.text().splitlines()[2]


def test_spot_estimate_uses_spot_prices_and_shows_on_demand(session: boto3.Session) -> None:
    plan = plan_of(line("us-east-1", "c7g.large", 10), spot=True)
    cost = estimate(plan, PriceBook(session=session), spot=True)
    assert cost.total_per_hour == pytest.approx(10 * MOTO_SPOT)
    assert cost.on_demand_per_hour == pytest.approx(10 * 0.0725)
    assert cost.sources == {"c7g.large in us-east-1": "spot price history"}
    assert "up to $0.72" in cost.text()


def test_provider_plan_shows_its_price(make_provider: Callable[..., EC2Provider]) -> None:
    provider = make_provider(16)  # 2 regions x 2 types, 2 machines of 2 slots each
    assert isinstance(provider.prices, PriceBook)
    per_line = {ln.key: ln.hourly_cost for ln in provider.plan.lines}
    assert per_line == {(r, t): pytest.approx(2 * TABLE[r][t]) for r in REGIONS for t in MIXED}
    total = sum(2 * TABLE[r][t] for r in REGIONS for t in MIXED)
    assert provider.plan.hourly_cost == pytest.approx(total)
    text = provider.plan.text()
    assert f"about {format_usd(total)}/h" in text
    assert "$0.0725" in text and "$/h" in text and "bundled" in text
    assert estimate(provider.plan, provider.prices, spot=False).total_per_hour == \
        pytest.approx(total)


def test_provider_plan_says_when_a_price_is_unknown(
        make_provider: Callable[..., EC2Provider]) -> None:
    provider = make_provider(4, regions=["ap-south-1"], instance_type="c7g.large")
    assert provider.plan.hourly_cost is None
    text = provider.plan.text()
    assert "unknown" in text and "price unknown for c7g.large in ap-south-1" in text


# --- the hourly limit -------------------------------------------------------------------------

def test_max_hourly_cost_refuses_and_names_what_fits() -> None:
    plan = plan_of(line("us-east-1", "c7g.large", 500),
                   line("us-east-1", "c7i.large", 500, arch="x86_64"))
    cost = estimate(plan, PriceBook(live=False), spot=False)
    total = 500 * 0.0725 + 500 * 0.08925  # $80.875/h for 2000 slots
    fits = math.floor(40 / (total / 2000))
    assert fits == 989
    with pytest.raises(BudgetExceeded) as info:
        check_max_hourly_cost(cost, 40.0, 2000)
    message = str(info.value)
    assert "max_hourly_cost=$40.00/h" in message
    assert format_usd(total) in message  # the plan's $/h
    assert f"max_workers={fits} fits" in message and "max_workers=2000" in message
    assert "80.88" in message  # a limit that would let it pass
    # The suggestion really fits: the same mix at `fits` slots costs at most the limit.
    assert fits * total / 2000 <= 40.0 < (fits + 1) * total / 2000


def test_max_hourly_cost_passes_a_plan_within_it() -> None:
    cost = estimate(plan_of(line("us-east-1", "c7g.large", 10)), PriceBook(live=False), False)
    check_max_hourly_cost(cost, 0.725, 20)  # exactly the plan's $/h
    check_max_hourly_cost(cost, 1, 20)
    with pytest.raises(BudgetExceeded, match="Not even one slot fits"):
        check_max_hourly_cost(cost, 0.01, 20)


def test_max_hourly_cost_with_an_unknown_price_refuses() -> None:
    cost = estimate(plan_of(line("ap-south-1", "c7g.large", 1)), PriceBook(live=False), False)
    with pytest.raises(BudgetExceeded) as info:
        check_max_hourly_cost(cost, 1000.0, 2)
    message = str(info.value)
    assert "c7g.large in ap-south-1 is unknown" in message
    assert "vmexec prices" in message and "pricing:GetProducts" in message


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "40", True])
def test_max_hourly_cost_must_be_a_positive_number(bad: Any) -> None:
    cost = estimate(plan_of(line("us-east-1", "c7g.large", 1)), PriceBook(live=False), False)
    with pytest.raises(ConfigError, match="max_hourly_cost must be a positive number"):
        check_max_hourly_cost(cost, bad, 2)


# --- the cost meter ---------------------------------------------------------------------------

def test_receipt_is_instance_seconds_times_price(session: boto3.Session) -> None:
    clock = FakeClock()
    meter = CostMeter(PriceBook(session=session), clock=clock)
    spot_a, spot_b = record("i-1", spot=True), record("i-2", spot=True)
    od = record("i-3", itype="c7i.large", region="eu-west-1")
    for r in (spot_a, spot_b, od):
        meter.started(r)
    meter.started(spot_a)  # idempotent
    clock.now += 600
    meter.stopped(spot_a)
    meter.stopped(spot_a)  # idempotent
    meter.stopped(record("i-unknown"))  # never started: ignored
    clock.now += 600
    running = 1800 / 3600 * MOTO_SPOT + 1200 / 3600 * 0.09576
    assert meter.total() == pytest.approx(running)  # while machines still run
    meter.stopped(spot_b)
    meter.stopped(od)
    clock.now += 3600  # stopped machines cost nothing more
    assert meter.seconds_by_group() == {("c7g.large", "us-east-1", "spot"): 1800.0,
                                        ("c7i.large", "eu-west-1", "on-demand"): 1200.0}
    assert meter.total() == pytest.approx(running)
    receipt = meter.receipt(deleted={"instance": 3, "security-group": 2}, left=0)
    first, *details = receipt.splitlines()
    assert first == (f"3 machines (2 c7g.large spot, 1 c7i.large), 20m00s, "
                     f"≈ {format_usd(running)}, 0 resources left")
    assert any("c7g.large spot in us-east-1: 0.500 instance-hours x $0.00001/h" in d
               and "spot price history" in d for d in details)
    assert any("c7i.large on-demand in eu-west-1: 0.333 instance-hours x $0.09576/h = "
               f"{format_usd(1200 / 3600 * 0.09576)}" in d for d in details)
    assert "deleted: 3 instance(s), 2 security-group(s)" in receipt


def test_receipt_names_machines_of_unknown_price() -> None:
    clock = FakeClock()
    meter = CostMeter(PriceBook(live=False), clock=clock)
    meter.started(record("i-1"))
    meter.started(record("i-2", region="ap-south-1"))
    meter.started(record("i-3", region="ap-south-1"))
    clock.now += 3600
    assert meter.total() == pytest.approx(0.0725)  # the unknown ones are not priced $0...
    first = meter.receipt(wall_seconds=3600).splitlines()[0]
    # ... they are named.
    assert first == "3 machines (3 c7g.large), 1h00m, ≈ $0.0725 + unknown for 2 c7g.large " \
                    "in ap-south-1"
    assert "price UNKNOWN" in meter.receipt()


def test_receipt_counts_storage() -> None:
    clock = FakeClock()
    meter = CostMeter(PriceBook(live=False), clock=clock, storage_gb_per_machine=8)
    meter.started(record("i-1"))
    meter.started(record("i-2", region="eu-west-1"))  # no bundled gp3 price there
    clock.now += 7200
    storage = 8 * 0.08 * 7200 / SECONDS_PER_MONTH
    assert meter.total() == pytest.approx(2 * 0.0725 + 2 * 0.0775 + storage)
    receipt = meter.receipt()
    assert f"storage: 8 GB gp3 per machine = {format_usd(storage)}" in receipt
    assert "price unknown in eu-west-1" in receipt


def test_local_machines_cost_nothing_and_say_so() -> None:
    clock = FakeClock()
    meter = CostMeter(PriceBook(live=False), clock=clock)
    meter.started(record("local-1", itype=None, region=None, provider="local"))
    meter.started(record("me@host:22", itype=None, region=None, provider="ssh"))
    clock.now += 192
    assert meter.total() == 0.0
    receipt = meter.receipt(left=0)
    assert receipt.splitlines()[0] == \
        "2 machines (1 local, 1 ssh), 3m12s, $0 (your own machines), 0 resources left"
    assert meter.seconds_by_group() == {("local", "", "on-demand"): 192.0,
                                        ("ssh", "", "on-demand"): 192.0}


def test_meter_is_thread_safe() -> None:
    clock = FakeClock()
    meter = CostMeter(PriceBook(live=False), clock=clock)
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait(timeout=10)
        for i in range(200):
            r = record(f"i-{n}-{i}")
            meter.started(r)
            meter.total()
            meter.stopped(r)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert meter.receipt().startswith("1600 machines (1600 c7g.large), 0s, ≈ $0.00")


def test_empty_receipt() -> None:
    assert CostMeter(PriceBook(live=False)).receipt() == "0 machines, 0s, ≈ $0.00"


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (45.4, "45s"), (192, "3m12s"),
                                          (7500, "2h05m"), (97200, "1d03h")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- leftovers ---------------------------------------------------------------------------------

def test_find_leftovers_names_an_earlier_fleet(make_provider: Callable[..., EC2Provider]
                                               ) -> None:
    current = make_provider(8)
    assert find_leftovers(current) == []
    earlier = make_provider(8, name="earlier-run")
    assert earlier.launch(8)  # and never torn down by its client
    lines = find_leftovers(current)
    assert len(lines) == 1
    text = lines[0]
    assert earlier.fleet_id in text and "earlier-run" in text
    assert "4 instance(s)" in text and "security-group(s)" in text
    assert "us-east-1, us-west-2" in text
    assert f"vmexec cleanup --fleet {earlier.fleet_id} --region us-east-1 --region " \
           "us-west-2 --yes" in text
    # A fleet never warns about itself (a named fleet about to be reused).
    assert find_leftovers(earlier) == []


def test_find_leftovers_reports_a_failed_query(make_provider: Callable[..., EC2Provider],
                                               faults: Any) -> None:
    current = make_provider(8, regions="us-east-1")
    faults.add("UnauthorizedOperation", operation="DescribeInstances")
    lines = find_leftovers(current)
    assert len(lines) == 1 and "could not look for vmexec resources" in lines[0]
    assert "vmexec ls" in lines[0]
