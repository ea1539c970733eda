"""Cost guardrails on EC2 (moto, and the local cloud): refusal before any launch call,
dry runs, and an idle fleet that turns itself off."""

from __future__ import annotations

import pytest

from aws_fixtures import MIXED, REGIONS, TEST_CIDR
from vmexec import BudgetExceeded, ConfigError, VMExecutor

LAUNCHES = ("RunInstances", "CreateFleet")


def _ec2(session, **options):
    return dict(provider="ec2", instance_type=MIXED, regions=REGIONS, ssh_cidr=TEST_CIDR,
                session=session, handle_signals=False, environment=None, **options)


def test_max_hourly_cost_refuses_before_any_launch_call(session, calls):
    with pytest.raises(BudgetExceeded, match=r"max_hourly_cost=\$1\.00/h refuses") as info:
        VMExecutor(2000, **_ec2(session, max_hourly_cost=1.0))
    assert "max_workers=" in str(info.value) and "fits" in str(info.value)
    assert sum(calls[op] for op in LAUNCHES) == 0


def test_dry_run_on_ec2_shows_the_priced_plan_and_launches_nothing(session, calls):
    ex = VMExecutor(16, **_ec2(session, dry_run=True))
    plan = ex.plan
    for word in ("us-east-1", "us-west-2", "c7g.large", "c7i.large", "arm64", "x86_64", "$"):
        assert word in plan
    with pytest.raises(ConfigError, match="dry_run=True"):
        ex.submit(pow, 2, 2)
    ex.shutdown()
    assert sum(calls[op] for op in LAUNCHES) == 0


def test_keepalive_turns_an_idle_local_cloud_fleet_off():
    from vmexec.testing.localcloud import LocalCloud
    from vmexec.testing.sshd import sshd_available

    if sshd_available() is not None:
        pytest.fail(f"the local cloud needs sshd: {sshd_available()}")
    with LocalCloud(regions=["us-east-1"]) as cloud:
        with VMExecutor(2, provider="ec2", instance_type="c7i.large", regions="us-east-1",
                        keepalive="2s", heartbeat_interval=0.5, boot_timeout=120,
                        **cloud.executor_options()) as ex:
            assert ex.submit(pow, 2, 10).result(timeout=180) == 1024
            # Idle now: within keepalive + a heartbeat or two, no instance is running.
            cloud.wait_for(lambda: all(i["State"]["Name"] in ("shutting-down", "terminated")
                                       for i in cloud.instances("us-east-1")),
                           timeout=60, what="the idle machine to be terminated")
            assert ex.fleet == []
            assert ex.submit(pow, 3, 2).result(timeout=180) == 9  # and it grows back
        assert cloud.tagged_resources() == []

