"""Prices: the bundled table, live prices through moto, and the fallback when AWS refuses.

moto implements ``DescribeSpotPriceHistory`` (every zone at $0.00001) but not the Price
List query API (``GetProducts`` answers 404), so the live on-demand path is exercised
with an answer in the Price List's own format handed back through botocore's
``before-call`` event, and refusals are injected the same way (or with
``FaultInjector`` for EC2 calls).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from vmexec.guardrails.pricing import Price, PriceBook, bundled_table
from vmexec.testing.faults import ApiCallCounter, FaultInjector, client_error

ROOT = Path(__file__).resolve().parents[1]
TABLE = bundled_table()
BUNDLED = f"bundled {TABLE['date']}"


def product(instance_type: str, usd: str, unit: str = "Hrs") -> str:
    """One entry of GetProducts' ``PriceList``, shaped as the Price List API returns it."""
    return json.dumps({
        "product": {"productFamily": "Compute Instance",
                    "attributes": {"instanceType": instance_type, "operatingSystem": "Linux"}},
        "terms": {"OnDemand": {"SKU.JRTCKXETXF": {"priceDimensions": {
            "SKU.JRTCKXETXF.6YS6EN2CT7": {"unit": unit, "pricePerUnit": {"USD": usd},
                                          "description": "per On Demand Linux hour"}}}}},
    })


class PricingAnswers:
    """Answers ``pricing:GetProducts`` calls made through ``session`` (records requests)."""

    def __init__(self, session: boto3.Session, price_list: list[str],
                 error: str | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.price_list = price_list
        self.error = error
        session.events.register("before-parameter-build.pricing.GetProducts", self._record)
        session.events.register("before-call.pricing.GetProducts", self._answer)

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        self.requests.append(json.loads(json.dumps(params)))

    def _answer(self, **_: Any) -> Any:
        if self.error:
            raise client_error(self.error, "GetProducts", "User is not authorized to "
                               "perform: pricing:GetProducts")
        return AWSResponse("https://pricing.invalid/", 200, {}, None), \
            {"PriceList": self.price_list, "FormatVersion": "aws_v1"}


# --- the bundled table ---------------------------------------------------------------

def test_bundled_table_is_dated_and_sourced() -> None:
    assert TABLE["date"] and TABLE["sources"] and TABLE["currency"] == "USD"
    book = PriceBook(live=False)
    assert book.bundled_date == TABLE["date"]
    assert book.hourly("c7g.large", "us-east-1") == Price(0.0725, BUNDLED)
    assert book.hourly("c7i.xlarge", "eu-west-1") == Price(0.19152, BUNDLED)
    assert book.ebs_gb_month("us-east-1") == 0.08


def test_unknown_is_none_never_a_guess() -> None:
    book = PriceBook(live=False)
    assert book.hourly("c7g.large", "ap-south-1") is None  # region not bundled
    assert book.hourly("c9z.large", "us-east-1") is None  # no such type
    assert book.hourly("c9z.large", "us-east-1", spot=True) is None
    assert book.ebs_gb_month("eu-west-1") is None


def test_bundled_prices_are_consistent() -> None:
    # Catches a slip when the table is edited by hand: within a family, each size costs
    # twice the one below it (GPU sizes are not linear and are left out).
    for region, types in TABLE["on_demand"].items():
        for name, usd in types.items():
            assert 0 < usd < 100, (region, name)
        for family in {t.split(".")[0] for t in types} - {"g5", "g6", "p4d"}:
            ladder = [f"{family}.{s}" for s in ("large", "xlarge", "2xlarge", "4xlarge")
                      if f"{family}.{s}" in types]
            for small, big in zip(ladder, ladder[1:]):
                assert types[big] / types[small] == pytest.approx(2, rel=0.01), \
                    (region, small, big)


def test_offline_book_makes_no_client(monkeypatch: pytest.MonkeyPatch) -> None:
    book = PriceBook(live=False)
    monkeypatch.setattr(book, "_session", None)
    assert book.hourly("c7g.large", "us-east-1", spot=True) == Price(
        0.0725, f"{BUNDLED} (on-demand: spot costs at most this)")
    assert book._clients == {}


# --- live prices -------------------------------------------------------------------------

def test_live_on_demand_price_from_the_price_list_api(session: boto3.Session) -> None:
    answers = PricingAnswers(session, [product("c7g.large", "0.0730000000"),
                                       product("c7g.large", "0.0000000000")])
    book = PriceBook(session=session)
    assert book.hourly("c7g.large", "eu-west-1") == Price(0.073, "aws pricing api")
    # Cached: a second lookup asks nothing.
    assert book.hourly("c7g.large", "eu-west-1") == Price(0.073, "aws pricing api")
    assert len(answers.requests) == 1
    request = answers.requests[0]
    assert request["ServiceCode"] == "AmazonEC2"
    filters = {f["Field"]: f["Value"] for f in request["Filters"]}
    assert filters == {"instanceType": "c7g.large", "regionCode": "eu-west-1",
                       "operatingSystem": "Linux", "tenancy": "Shared",
                       "preInstalledSw": "NA", "capacitystatus": "Used"}


def test_live_ebs_price(session: boto3.Session) -> None:
    answers = PricingAnswers(session, [product("", "0.0880000000", unit="GB-Mo")])
    assert PriceBook(session=session).ebs_gb_month("eu-west-1") == 0.088
    filters = {f["Field"]: f["Value"] for f in answers.requests[0]["Filters"]}
    assert filters == {"productFamily": "Storage", "volumeApiName": "gp3",
                       "regionCode": "eu-west-1"}


def test_no_live_price_falls_back_to_the_table(session: boto3.Session) -> None:
    PricingAnswers(session, [])
    assert PriceBook(session=session).hourly("c7g.large", "us-east-1") == \
        Price(0.0725, BUNDLED)


def test_access_denied_falls_back_once(session: boto3.Session,
                                       caplog: pytest.LogCaptureFixture) -> None:
    answers = PricingAnswers(session, [], error="AccessDeniedException")
    calls = ApiCallCounter(session, service="pricing")
    book = PriceBook(session=session)
    with caplog.at_level(logging.INFO, logger="vmexec.guardrails.pricing"):
        assert book.hourly("c7g.large", "us-east-1") == Price(0.0725, BUNDLED)
        assert book.hourly("c7i.large", "eu-west-1") == Price(0.09576, BUNDLED)
        assert book.hourly("c7i.large", "ap-south-1") is None
        assert book.ebs_gb_month("us-east-1") == 0.08
    assert calls["GetProducts"] == 1  # refused once, then the table answers
    said = [r.getMessage() for r in caplog.records if "could not use" in r.getMessage()]
    assert len(said) == 1 and "AccessDeniedException" in said[0] and answers.requests


def test_moto_without_price_list_api_falls_back(session: boto3.Session) -> None:
    # moto answers GetProducts with 404 "Not yet implemented": the table stands in.
    assert PriceBook(session=session).hourly("c6i.2xlarge", "us-west-2") == \
        Price(0.34, BUNDLED)


def test_spot_price_is_the_median_of_the_zones_latest(session: boto3.Session) -> None:
    import datetime

    def history(parsed: dict[str, Any], **_: Any) -> None:
        old = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        new = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)
        parsed["SpotPriceHistory"] = [
            {"AvailabilityZone": "us-east-1a", "SpotPrice": "0.0300", "Timestamp": new},
            {"AvailabilityZone": "us-east-1a", "SpotPrice": "0.0900", "Timestamp": old},
            {"AvailabilityZone": "us-east-1b", "SpotPrice": "0.0500", "Timestamp": new},
            {"AvailabilityZone": "us-east-1c", "SpotPrice": "0.0400", "Timestamp": new},
        ]

    session.events.register("after-call.ec2.DescribeSpotPriceHistory", history)
    assert PriceBook(session=session).hourly("c7g.large", "us-east-1", spot=True) == \
        Price(0.04, "spot price history")


def test_spot_price_from_moto(session: boto3.Session) -> None:
    price = PriceBook(session=session).hourly("c7g.large", "us-west-2", spot=True)
    assert price == Price(0.00001, "spot price history")


def test_spot_refused_uses_on_demand_as_upper_bound(session: boto3.Session,
                                                    faults: FaultInjector) -> None:
    faults.add("UnauthorizedOperation", operation="DescribeSpotPriceHistory")
    calls = ApiCallCounter(session)
    book = PriceBook(session=session)
    for _ in range(2):
        price = book.hourly("c7i.large", "eu-west-1", spot=True)
        assert price == Price(0.09576, f"{BUNDLED} (on-demand: spot costs at most this)")
    assert book.hourly("c7g.large", "eu-west-1", spot=True).usd_per_hour == 0.0775
    assert calls["DescribeSpotPriceHistory"] == 1


def test_no_credentials_uses_the_table(aws_env: None, no_network: list[Any],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    book = PriceBook()
    assert book.hourly("c7g.large", "us-east-1", spot=True).usd_per_hour == 0.0725
    assert book._clients == {}


# --- scripts/update_prices.py -------------------------------------------------------------

def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("update_prices",
                                                  ROOT / "scripts" / "update_prices.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFFER_CSV = '''"FormatVersion","v1.0"
"Disclaimer","This pricing list is for informational purposes only."
"Publication Date","2026-02-03T18:40:13Z"
"Version","20260203184013"
"OfferCode","AmazonEC2"
"SKU","OfferTermCode","RateCode","TermType","PriceDescription","EffectiveDate","StartingRange","EndingRange","Unit","PricePerUnit","Currency","Product Family","Instance Type","Tenancy","Operating System","License Model","Pre Installed S/W","CapacityStatus","Region Code","Volume API Name"
"A1","JRTCKXETXF","A1.1","OnDemand","$0.0725 per On Demand Linux c7g.large Instance Hour","2026-02-01","0","Inf","Hrs","0.0725000000","USD","Compute Instance","c7g.large","Shared","Linux","No License required","NA","Used","us-east-1",""
"A2","JRTCKXETXF","A2.1","OnDemand","Windows","2026-02-01","0","Inf","Hrs","0.1645000000","USD","Compute Instance","c7g.large","Shared","Windows","No License required","NA","Used","us-east-1",""
"A3","JRTCKXETXF","A3.1","OnDemand","Dedicated","2026-02-01","0","Inf","Hrs","0.0800000000","USD","Compute Instance","c7g.large","Dedicated","Linux","No License required","NA","Used","us-east-1",""
"A4","4NA7Y494T4","A4.1","Reserved","1yr","2026-02-01","0","Inf","Hrs","0.0460000000","USD","Compute Instance","c7g.large","Shared","Linux","No License required","NA","Used","us-east-1",""
"A5","JRTCKXETXF","A5.1","OnDemand","reservation","2026-02-01","0","Inf","Hrs","0.0000000000","USD","Compute Instance","c7g.large","Shared","Linux","No License required","NA","UnusedCapacityReservation","us-east-1",""
"A6","JRTCKXETXF","A6.1","OnDemand","SQL","2026-02-01","0","Inf","Hrs","0.5000000000","USD","Compute Instance","c7g.large","Shared","Linux","No License required","SQL Std","Used","us-east-1",""
"A7","JRTCKXETXF","A7.1","OnDemand","big","2026-02-01","0","Inf","Hrs","0.5800000000","USD","Compute Instance","c7g.4xlarge","Shared","Linux","No License required","NA","Used","us-east-1",""
"A8","JRTCKXETXF","A8.1","OnDemand","other family","2026-02-01","0","Inf","Hrs","0.0960000000","USD","Compute Instance","m5.large","Shared","Linux","No License required","NA","Used","us-east-1",""
"V1","JRTCKXETXF","V1.1","OnDemand","$0.08 per GB-month of General Purpose (gp3)","2026-02-01","0","Inf","GB-Mo","0.0800000000","USD","Storage","","","","","","","us-east-1","gp3"
'''


def test_update_script_filters_the_offer_file(tmp_path: Path) -> None:
    script = load_script()
    offer = tmp_path / "us-east-1.csv"
    offer.write_text(OFFER_CSV)
    prices, ebs, published = script.read_offer(offer.open(encoding="utf-8"),
                                               families={"c7g"}, volume_types={"gp3"})
    assert prices == {"c7g.large": 0.0725, "c7g.4xlarge": 0.58}
    assert ebs == {"gp3": 0.08}
    assert published == "2026-02-03"
    out = tmp_path / "prices.json"
    assert script.main(["--from-file", f"us-east-1={offer}", "--families", "c7g",
                        "--output", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["date"] == "2026-02-03"
    assert document["on_demand"] == {"us-east-1": {"c7g.4xlarge": 0.58, "c7g.large": 0.0725}}
    assert document["ebs_gb_month"] == {"gp3": {"us-east-1": 0.08}}
    assert "us-east-1" in document["sources"][0]["where"]
