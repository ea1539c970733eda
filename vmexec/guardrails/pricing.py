"""Prices: what an instance-hour and a GB-month of EBS cost, and where the figure came from.

Owns ``Price`` and ``PriceBook``. A lookup tries, in order::

    on-demand  pricing:GetProducts (us-east-1 endpoint; Linux, shared tenancy, no
               pre-installed software, capacity Used)  -> "aws pricing api"
               the bundled table prices.json           -> "bundled <date>"
    spot       ec2:DescribeSpotPriceHistory, the latest price in each availability
               zone, their MEDIAN                       -> "spot price history"
               the on-demand price above, as an upper bound (EC2 never charges more
               for spot than on-demand)                -> "... (on-demand: spot costs at most this)"
    EBS        pricing:GetProducts (volumeApiName)      -> the bundled table

The median, not the minimum, because a fleet spreads over every zone of a region and
pays each zone's price; the cheapest zone alone would understate the bill.

When the account may not call an API (AccessDenied), the endpoint does not implement it
(moto) or the network fails, the book falls back to the table for the rest of its life,
with one INFO line saying why: one refused call per process, not one per lookup. A price
that is in neither place is ``None`` — unknown, never guessed — and every caller says so.

boto3 is used here (and in the CLI's AWS helpers) only: everything else in guardrails
takes a ``PriceBook``. Must not import transports, the scheduler or the executor.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import statistics
import threading
from importlib import resources
from typing import Any, Mapping, Optional

__all__ = ["Price", "PriceBook", "bundled_table", "PRICING_REGION"]

log = logging.getLogger(__name__)

#: The Price List query API answers only in a few regions; us-east-1 serves every region.
PRICING_REGION = "us-east-1"
_ON_DEMAND_FILTERS = (
    ("operatingSystem", "Linux"),
    ("tenancy", "Shared"),
    ("preInstalledSw", "NA"),
    ("capacitystatus", "Used"),
)
# Lookups happen while a plan is shown or a receipt is written: fail fast, fall back.
_CLIENT_CONFIG = {"retries": {"mode": "standard", "total_max_attempts": 2},
                  "connect_timeout": 5, "read_timeout": 15}


@dataclasses.dataclass(frozen=True)
class Price:
    """An hourly price and where it came from.

    Attributes:
        usd_per_hour: US dollars per instance-hour.
        source: ``"bundled <date>"``, ``"aws pricing api"`` or ``"spot price history"``
            (a spot lookup that fell back says so after the bundled date).
    """

    usd_per_hour: float
    source: str


@functools.lru_cache(maxsize=1)
def bundled_table() -> Mapping[str, Any]:
    """The bundled ``prices.json`` (read once).

    Returns:
        The parsed document: ``date``, ``sources``, ``on_demand`` (region -> type ->
        USD/hour) and ``ebs_gb_month`` (volume type -> region -> USD/GB-month).
    """
    text = resources.files("vmexec.guardrails").joinpath("prices.json").read_text("utf-8")
    return json.loads(text)


class PriceBook:
    """Prices by instance type, region and purchase option; thread-safe.

    Args:
        session: a ``boto3.Session`` for live prices (default: a new one from the
            environment, made on the first live lookup).
        endpoint_url: AWS endpoint for every client (e.g. a moto server).
        live: False uses the bundled table only (no AWS call at all).

    Attributes:
        bundled_date: the date of the bundled table's figures (``YYYY-MM-DD``).
    """

    def __init__(self, session: Any = None, endpoint_url: Optional[str] = None,
                 live: bool = True) -> None:
        table = bundled_table()
        self.bundled_date: str = str(table["date"])
        self._on_demand: Mapping[str, Mapping[str, float]] = table["on_demand"]
        self._ebs: Mapping[str, Mapping[str, float]] = table.get("ebs_gb_month", {})
        self._session = session
        self._endpoint_url = endpoint_url
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}
        self._cache: dict[tuple[str, str, str], Optional[Price]] = {}
        self._ebs_cache: dict[tuple[str, str], Optional[float]] = {}
        # Set once an API refuses or fails: the table answers from then on.
        self._live = {"pricing": live, "spot": live}

    @property
    def bundled_source(self) -> str:
        return f"bundled {self.bundled_date}"

    # -- public lookups ----------------------------------------------------------------
    def hourly(self, instance_type: str, region: str, spot: bool = False) -> Optional[Price]:
        """The price of one ``instance_type`` machine in ``region`` for an hour.

        Args:
            instance_type: e.g. ``"c7g.large"``.
            region: e.g. ``"us-east-1"``.
            spot: the spot price (median of the zones' latest prices) instead of
                on-demand; without spot prices, the on-demand price as an upper bound.

        Returns:
            The price, or None when it is unknown (never a guess).
        """
        key = (instance_type, region, "spot" if spot else "on-demand")
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        price = self._spot(instance_type, region) if spot else \
            self._on_demand_price(instance_type, region)
        with self._lock:
            self._cache[key] = price
        return price

    def ebs_gb_month(self, region: str, volume_type: str = "gp3") -> Optional[float]:
        """USD per GB-month of ``volume_type`` EBS storage in ``region``; None if unknown."""
        key = (region, volume_type)
        with self._lock:
            if key in self._ebs_cache:
                return self._ebs_cache[key]
        value = self._live_ebs(region, volume_type)
        if value is None:
            value = self._ebs.get(volume_type, {}).get(region)
        with self._lock:
            self._ebs_cache[key] = value
        return value

    def bundled(self, instance_type: str, region: str) -> Optional[Price]:
        """The bundled table's on-demand price only (no AWS call)."""
        value = self._on_demand.get(region, {}).get(instance_type)
        return None if value is None else Price(float(value), self.bundled_source)

    # -- on-demand -----------------------------------------------------------------------
    def _on_demand_price(self, instance_type: str, region: str) -> Optional[Price]:
        live = self._live_on_demand(instance_type, region)
        return live if live is not None else self.bundled(instance_type, region)

    def _live_on_demand(self, instance_type: str, region: str) -> Optional[Price]:
        filters = [("instanceType", instance_type), ("regionCode", region),
                   *_ON_DEMAND_FILTERS]
        values = self._get_products(filters, unit="Hrs", what=f"{instance_type} in {region}")
        if not values:
            return None
        if len(set(values)) > 1:
            log.debug("%d on-demand prices for %s in %s: %s; using the lowest",
                      len(values), instance_type, region, sorted(values))
        return Price(min(values), "aws pricing api")

    def _live_ebs(self, region: str, volume_type: str) -> Optional[float]:
        filters = [("productFamily", "Storage"), ("volumeApiName", volume_type),
                   ("regionCode", region)]
        values = self._get_products(filters, unit="GB-Mo",
                                    what=f"EBS {volume_type} in {region}")
        return min(values) if values else None

    def _get_products(self, filters: list[tuple[str, str]], *, unit: str,
                      what: str) -> list[float]:
        """Positive USD prices per ``unit`` of the on-demand terms GetProducts returns."""
        client = self._client("pricing", PRICING_REGION)
        if client is None:
            return []
        from botocore.exceptions import BotoCoreError, ClientError

        request = {"ServiceCode": "AmazonEC2", "MaxResults": 100,
                   "Filters": [{"Type": "TERM_MATCH", "Field": f, "Value": v}
                               for f, v in filters]}
        try:
            pages = client.get_paginator("get_products").paginate(**request)
            documents = [item for page in pages for item in page.get("PriceList", [])]
        except (ClientError, BotoCoreError) as exc:
            self._give_up("pricing", "the AWS Price List API (pricing:GetProducts)", exc)
            return []
        values = []
        for document in documents:
            product = json.loads(document) if isinstance(document, str) else document
            values += _on_demand_usd(product, unit)
        if not values:
            log.debug("the AWS Price List API has no on-demand price for %s", what)
        return values

    # -- spot ----------------------------------------------------------------------------
    def _spot(self, instance_type: str, region: str) -> Optional[Price]:
        live = self._live_spot(instance_type, region)
        if live is not None:
            return live
        on_demand = self._on_demand_price(instance_type, region)
        if on_demand is None:
            return None
        return Price(on_demand.usd_per_hour,
                     f"{on_demand.source} (on-demand: spot costs at most this)")

    def _live_spot(self, instance_type: str, region: str) -> Optional[Price]:
        client = self._client("ec2", region, kind="spot")
        if client is None:
            return None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = client.describe_spot_price_history(
                InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX"],
                StartTime=datetime.datetime.now(datetime.timezone.utc))
        except (ClientError, BotoCoreError) as exc:
            self._give_up("spot", "spot price history (ec2:DescribeSpotPriceHistory)", exc)
            return None
        latest: dict[str, tuple[Any, float]] = {}
        for item in answer.get("SpotPriceHistory", []):
            zone, moment = item.get("AvailabilityZone", ""), item.get("Timestamp")
            try:
                value = float(item["SpotPrice"])
            except (KeyError, TypeError, ValueError):
                continue
            if zone not in latest or (moment is not None and latest[zone][0] is not None
                                      and moment > latest[zone][0]):
                latest[zone] = (moment, value)
        if not latest:
            log.debug("no spot price history for %s in %s", instance_type, region)
            return None
        return Price(float(statistics.median(v for _, v in latest.values())),
                     "spot price history")

    # -- clients -------------------------------------------------------------------------
    def _client(self, service: str, region: str, kind: Optional[str] = None) -> Any:
        """A client, or None when live lookups of ``kind`` are off or impossible."""
        kind = kind or service
        with self._lock:
            if not self._live.get(kind, False):
                return None
            client = self._clients.get((service, region))
            if client is not None:
                return client
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                self._live = {k: False for k in self._live}
                log.debug("boto3 is not installed: bundled prices only")
                return None
            # boto3 sessions are not thread-safe: clients are made under the lock.
            if self._session is None:
                self._session = boto3.Session()
            if self._session.get_credentials() is None:
                self._live = {k: False for k in self._live}
                log.info("no AWS credentials: using the bundled price table (%s)",
                         self.bundled_date)
                return None
            client = self._session.client(service, region_name=region,
                                          endpoint_url=self._endpoint_url,
                                          config=Config(**_CLIENT_CONFIG))
            self._clients[(service, region)] = client
            return client

    def _give_up(self, kind: str, what: str, exc: BaseException) -> None:
        with self._lock:
            was_live, self._live[kind] = self._live[kind], False
        if was_live:
            log.info("could not use %s (%s); using the bundled price table dated %s%s", what,
                     _short(exc), self.bundled_date,
                     "; on-demand prices stand in for spot prices as an upper bound"
                     if kind == "spot" else "")


def _on_demand_usd(product: Mapping[str, Any], unit: str) -> list[float]:
    """Positive USD prices per ``unit`` in one Price List product's on-demand terms."""
    values = []
    for term in product.get("terms", {}).get("OnDemand", {}).values():
        for dimension in term.get("priceDimensions", {}).values():
            if dimension.get("unit") != unit:
                continue
            try:
                value = float(dimension.get("pricePerUnit", {}).get("USD", ""))
            except ValueError:
                continue
            if value > 0:  # $0 entries are placeholders (reservations, host fees)
                values.append(value)
    return values


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
