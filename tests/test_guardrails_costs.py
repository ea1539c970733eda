"""Cost guardrails wired into the executor: receipt, dry_run, max_hourly_cost, budget."""

from __future__ import annotations

import logging

import pytest

import helpers
from vmexec import BudgetExceeded, ConfigError, VMExecutor
from vmexec.guardrails.budget import CostMeter
from vmexec.guardrails.costs import CostGuard


def test_local_fleet_receipt_says_it_cost_nothing_at_debug_only(caplog):
    caplog.set_level(logging.INFO, logger="vmexec.cost")
    with VMExecutor(2, provider="local") as ex:
        assert ex.submit(helpers.add, 1).result(timeout=60) == 1
        assert ex.cost == 0.0
        assert "$0" in ex.plan
    # Nothing was spent: no receipt by default (not even an empty line) ...
    assert [r for r in caplog.records if r.name == "vmexec.cost"] == []
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="vmexec.cost")
    with VMExecutor(2, provider="local") as ex:
        assert ex.submit(helpers.add, 1).result(timeout=60) == 1
    # ... and at DEBUG, the receipt is there.
    receipts = [r.getMessage() for r in caplog.records if r.name == "vmexec.cost"]
    assert len(receipts) == 1 and receipts[0].startswith("1 machine")
    assert "$0 (your own machines)" in receipts[0]


def test_local_fleet_prints_nothing_at_shutdown_without_logging_configured(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "quiet.py"
    script.write_text(textwrap.dedent("""
        from vmexec import VMExecutor
        if __name__ == "__main__":
            with VMExecutor(2, provider="local") as ex:
                print(ex.submit(pow, 2, 5).result(timeout=60))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "32\n"
    assert done.stderr == ""


def test_dry_run_shows_the_plan_and_launches_nothing():
    ex = VMExecutor(4, provider="local", dry_run=True)
    assert "slots" in ex.plan
    with pytest.raises(ConfigError, match="dry_run=True"):
        ex.submit(helpers.add, 1)
    with pytest.raises(ConfigError, match="dry_run=True"):
        ex.map(helpers.add, [1])
    ex.shutdown()
    assert ex.fleet == [] and ex.provider.describe() == []


def test_limits_must_be_positive_numbers():
    with pytest.raises(ConfigError, match="max_hourly_cost"):
        VMExecutor(1, provider="local", max_hourly_cost=-1)
    with pytest.raises(ConfigError, match="budget"):
        VMExecutor(1, provider="local", budget="lots")


class _ExpensiveMeter(CostMeter):
    """A meter whose machines have already cost more than the budget."""

    def total(self) -> float:
        return 12.5


def test_budget_reached_mid_run_fails_pending_futures_and_tears_down():
    ex = VMExecutor(1, provider="local", budget=10.0, heartbeat_interval=0.2,
                    heartbeat_timeout=20.0, watchdog_timeout=30.0)
    guard: CostGuard = ex._cost
    with ex:
        assert ex.submit(helpers.add, 1).result(timeout=60) == 1
        pending = [ex.submit(helpers.sleep_and_return, 0.5, i) for i in range(20)]
        guard.meter = _ExpensiveMeter(guard.meter.prices)  # the cost passes the budget now
        outcomes = []
        for future in pending:
            try:
                outcomes.append(future.result(timeout=60))
            except BudgetExceeded as exc:
                outcomes.append(exc)
        errors = [o for o in outcomes if isinstance(o, BudgetExceeded)]
        assert errors and "budget=$10.00 reached" in str(errors[0])
        with pytest.raises(BudgetExceeded):
            ex.submit(helpers.add, 2)
    assert ex._scheduler.torn_down.wait(30)
    assert ex.provider.describe() == []
