"""The executor's cost guard: estimate before launch, hard limits, running cost, receipt.

``CostGuard`` is built by the executor before anything is launched:

* with a cloud plan (the provider has ``plan`` and ``prices``) it prices the plan at full
  scale, logs it, and refuses it when it costs more than ``max_hourly_cost``
  (``BudgetExceeded``, naming the largest ``max_workers`` that fits);
* it warns about vmexec resources still alive from earlier runs (a quick tag query);
* the scheduler reports every machine it starts and stops (``started``/``stopped``),
  checks ``over_budget()`` on every heartbeat tick, and logs ``receipt()`` at shutdown.

Machines of the local and ssh providers cost $0: their receipt ("$0, your own machines")
is logged at DEBUG only, and ``receipt()`` returns "" for them, which this logger drops,
so a local run stays quiet by default. Must not import boto3
directly (pricing and the tag query go through ``pricing``/``budget``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from vmexec.errors import BudgetExceeded, ConfigError
from vmexec.guardrails.budget import CostMeter, PlanCost, check_max_hourly_cost, estimate
from vmexec.guardrails.budget import find_leftovers, format_usd
from vmexec.guardrails.pricing import PriceBook

logger = logging.getLogger("vmexec.cost")


class _DropEmpty(logging.Filter):
    """Drops records with an empty message: the receipt of a fleet that cost nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(record.getMessage())


# On the logger itself: it applies to every record logged there, before any handler.
logger.addFilter(_DropEmpty())


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

    def __init__(self, provider: Any, max_workers: Optional[int],
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
        prices = getattr(provider, "prices", None)
        self.meter = CostMeter(prices if prices is not None else PriceBook(live=False),
                               storage_gb_per_machine=_storage_gb(provider))
        self.plan_cost: Optional[PlanCost] = None
        plan = getattr(provider, "plan", None)
        if plan is not None and prices is not None:
            self.plan_cost = estimate(plan, prices, spot=bool(getattr(provider, "spot", False)))
            logger.info("plan at full scale (max_workers=%s):\n%s", max_workers,
                        self.plan_cost.text())
            if max_hourly_cost is not None:
                # A spot fleet falls back to on-demand where spot is short, so the limit
                # is checked against that worst case: the bill can never pass it.
                worst = (estimate(plan, prices, spot=False)
                         if getattr(provider, "spot", False) else self.plan_cost)
                check_max_hourly_cost(worst, max_hourly_cost, max_workers or 0)
        elif max_hourly_cost is not None or budget is not None:
            logger.info("provider %r runs on machines that cost vmexec's estimate nothing: "
                        "max_hourly_cost/budget are trivially met", getattr(provider, "name", "?"))
        if check_leftovers and getattr(provider, "session", None) is not None \
                and getattr(provider, "regions", None):
            self._warn_leftovers(provider)

    def _warn_leftovers(self, provider: Any) -> None:
        lines = find_leftovers(provider.session, provider.regions,
                               endpoint_url=getattr(provider, "endpoint_url", None),
                               exclude_fleet=getattr(provider, "fleet_id", None))
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

    def receipt(self, provider: Any) -> str:
        """The shutdown line for the user: what the fleet cost and what was deleted.

        Returns "" for machines that cost nothing (local, ssh): that receipt goes to
        DEBUG only (nothing was spent, nothing needs a line).
        """
        text = self._receipt_text(provider)
        if self.plan_cost is None and not self.meter.total():
            logger.debug("%s", text)
            return ""
        return text

    def _receipt_text(self, provider: Any) -> str:
        summary = getattr(provider, "teardown_summary", None)
        deleted = getattr(summary, "deleted", None) if summary is not None else None
        remaining = getattr(summary, "remaining", None) if summary is not None else None
        kept = getattr(summary, "kept", None) if summary is not None else None
        return self.meter.receipt(deleted=deleted,
                                  left=len(remaining) if remaining is not None else None,
                                  kept=[r.id for r in kept or ()],
                                  keepalive=getattr(summary, "keepalive", 0.0))


def _storage_gb(provider: Any) -> float:
    size = getattr(provider, "root_volume_gb", None)
    if size:
        return float(size)
    images = getattr(provider, "images", None) or {}
    sizes = [getattr(image, "root_size_gb", None) for per_region in images.values()
             for image in (per_region.values() if isinstance(per_region, dict) else [])]
    known = [float(s) for s in sizes if s]
    return max(known) if known else 0.0
