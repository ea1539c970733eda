"""The executor's cost guard: estimate before launch, hard limits, running cost, receipt.

``CostGuard`` is built by the executor before anything is launched. It talks to the
provider through the hooks ``vmexec.providers.base.Provider`` declares (``Costed`` below
names them; the base class's defaults mean "machines that cost nothing, no plan"):

* with a cloud plan (``cost_plan()``) it prices the plan at full scale, logs it, and
  refuses it when it costs more than ``max_hourly_cost`` (``BudgetExceeded``, naming the
  largest ``max_workers`` that fits);
* it warns about vmexec resources still alive from earlier runs (``leftovers()``);
* the scheduler reports every machine it starts and stops (``started``/``stopped``),
  checks ``over_budget()`` on every heartbeat tick, and logs ``receipt()`` at shutdown
  (with ``teardown_report()``: what was deleted, left or kept warm).

Machines of the local and ssh providers cost $0: their receipt ("$0, your own machines")
is logged at DEBUG only, and ``receipt()`` returns "" for them, which this logger drops,
so a local run stays quiet by default. Must not import boto3 or any provider: the
provider is reached through its hooks only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Protocol, Sequence

from vmexec.errors import BudgetExceeded, ConfigError
from vmexec.guardrails.budget import CostMeter, CostPlan, Leftover, PlanCost, \
    TeardownReport, check_max_hourly_cost, estimate, find_leftovers, format_usd
from vmexec.guardrails.pricing import PriceBook

logger = logging.getLogger("vmexec.cost")


class _DropEmpty(logging.Filter):
    """Drops records with an empty message: the receipt of a fleet that cost nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(record.getMessage())


# On the logger itself: it applies to every record logged there, before any handler.
logger.addFilter(_DropEmpty())


class Costed(Protocol):
    """What the cost guard asks of a provider (declared, with defaults, on
    ``vmexec.providers.base.Provider``)."""

    name: str

    def cost_plan(self) -> Optional[CostPlan]: ...

    def leftovers(self) -> Sequence[Leftover]: ...

    def teardown_report(self) -> Optional[TeardownReport]: ...


class CostGuard:
    """Prices one executor's fleet and enforces its limits.

    Args:
        provider: the executor's provider.
        max_workers: slots at full scale (for the refusal message).
        max_hourly_cost: refuse a plan costing more per hour (USD); None: no limit.
        budget: total USD; when the running cost reaches it the fleet is shut down and
            pending futures fail with ``BudgetExceeded``; None: no limit.
        check_leftovers: query the plan's regions for vmexec resources of earlier runs.

    Raises:
        ConfigError: a limit that is not a positive number.
        BudgetExceeded: the full-scale plan costs more than ``max_hourly_cost``.
    """

    def __init__(self, provider: Costed, max_workers: Optional[int],
                 max_hourly_cost: Optional[float] = None, budget: Optional[float] = None,
                 check_leftovers: bool = True) -> None:
        for name, value in (("max_hourly_cost", max_hourly_cost), ("budget", budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise ConfigError(f"{name} must be a positive number of US dollars, not "
                                  f"{value!r}")
        self.max_hourly_cost = max_hourly_cost
        self.budget = budget
        self.started_at = time.monotonic()
        planned = provider.cost_plan()
        self.meter = CostMeter(planned.prices if planned is not None else PriceBook(live=False),
                               storage_gb_per_machine=planned.storage_gb_per_machine
                               if planned is not None else 0.0)
        self.plan_cost: Optional[PlanCost] = None
        if planned is not None:
            self.plan_cost = estimate(planned.plan, planned.prices, spot=planned.spot)
            logger.info("plan at full scale (max_workers=%s):\n%s", max_workers,
                        self.plan_cost.text())
            if max_hourly_cost is not None:
                # A spot fleet falls back to on-demand where spot is short, so the limit
                # is checked against that worst case: the bill can never pass it.
                worst = (estimate(planned.plan, planned.prices, spot=False)
                         if planned.spot else self.plan_cost)
                check_max_hourly_cost(worst, max_hourly_cost, max_workers or 0)
        elif max_hourly_cost is not None or budget is not None:
            logger.info("provider %r runs on machines that cost vmexec's estimate nothing: "
                        "max_hourly_cost/budget are trivially met", provider.name)
        if check_leftovers:
            self._warn_leftovers(provider)

    def _warn_leftovers(self, provider: Costed) -> None:
        lines = find_leftovers(provider)
        if lines:
            logger.warning("vmexec resources from earlier runs are still alive:\n  %s",
                           "\n  ".join(lines))

    # -- the scheduler's hooks ------------------------------------------------------------
    def started(self, record: Any) -> None:
        self.meter.started(record)

    def stopped(self, record: Any) -> None:
        self.meter.stopped(record)

    def over_budget(self) -> Optional[BudgetExceeded]:
        """The error to stop the fleet with, once the running cost reaches ``budget``."""
        if self.budget is None:
            return None
        spent = self.meter.total()
        if spent < self.budget:
            return None
        return BudgetExceeded(
            f"budget={format_usd(self.budget)} reached: the fleet has cost about "
            f"{format_usd(spent)}; it was shut down and the remaining tasks were not run. "
            "Raise budget= or use fewer/cheaper machines")

    # -- for the user ---------------------------------------------------------------------
    @property
    def total(self) -> float:
        """Running cost estimate in USD."""
        return self.meter.total()

    def receipt(self, provider: Costed) -> str:
        """The shutdown line for the user: what the fleet cost and what was deleted.

        Returns "" for machines that cost nothing (local, ssh): that receipt goes to
        DEBUG only (nothing was spent, nothing needs a line).
        """
        text = self._receipt_text(provider)
        if self.plan_cost is None and not self.meter.total():
            logger.debug("%s", text)
            return ""
        return text

    def _receipt_text(self, provider: Costed) -> str:
        report = provider.teardown_report()
        if report is None:
            return self.meter.receipt()
        return self.meter.receipt(deleted=report.deleted, left=report.left,
                                  kept=list(report.kept), keepalive=report.keepalive)
