#!/usr/bin/env python3
"""Regenerate vmexec's bundled price table from the public AWS Price List bulk API.

    python scripts/update_prices.py                       # the default families and regions
    python scripts/update_prices.py --regions us-east-1 eu-west-1 --families c7g c7i
    python scripts/update_prices.py --from-file us-east-1=offer.csv   # a downloaded file

For each region it reads the region index of the AmazonEC2 offer
(``https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/region_index.json``),
downloads that region's current offer as CSV (``currentVersionUrl`` with ``.csv``), and keeps

* on-demand USD per hour of ``Compute Instance`` products that run Linux on shared
  tenancy with no pre-installed software (``Pre Installed S/W`` = NA) and capacity
  status ``Used`` (not the $0 rows of unused reservations), for the chosen families;
* EBS USD per GB-month of the chosen volume types (``Storage``, ``Volume API Name``).

The offer files are large (us-east-1's CSV is several GB): they are streamed row by row,
never held in memory. The table is written as ``vmexec/guardrails/prices.json`` with the
offer's publication date and the URLs it came from; ``vmexec.guardrails.pricing`` reads
it. No AWS credentials are needed (the bulk API is public).

Standard library only: this runs where vmexec's dependencies may not be installed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import urllib.request
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "vmexec" / "guardrails" / "prices.json"
BASE = "https://pricing.us-east-1.amazonaws.com"
REGION_INDEX = f"{BASE}/offers/v1.0/aws/AmazonEC2/current/region_index.json"
FAMILIES = ("c6g", "c6i", "c7a", "c7g", "c7i", "m6g", "m6i", "m7g", "m7i", "r7g", "r7i",
            "t3", "t4g", "g5", "g6", "p4d")
SIZES = ("large", "xlarge", "2xlarge", "4xlarge", "24xlarge")
REGIONS = ("us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "eu-west-1",
           "eu-west-2", "eu-central-1", "eu-north-1", "ap-northeast-1", "ap-southeast-1",
           "ap-southeast-2")
VOLUME_TYPES = ("gp3",)
# Rows before the CSV header: FormatVersion, Disclaimer, Publication Date, Version, OfferCode.
_PREAMBLE_ROWS = 5
_TIMEOUT = 60


def read_offer(lines: Iterable[str], families: Iterable[str],
               volume_types: Iterable[str]) -> tuple[dict[str, float], dict[str, float], str]:
    """Filter one region's offer CSV.

    Args:
        lines: the CSV text, line by line (a file or a streamed HTTP body).
        families: instance families to keep (``c7g`` keeps ``c7g.*``).
        volume_types: EBS volume API names to keep (``gp3``).

    Returns:
        ``(instance type -> USD/hour, volume type -> USD/GB-month, publication date)``.

    Raises:
        ValueError: the file is not an offer CSV (no header where expected).
    """
    families = set(families)
    volume_types = set(volume_types)
    rows = csv.reader(lines)
    published = ""
    for _ in range(_PREAMBLE_ROWS):
        meta = next(rows, [])
        if len(meta) >= 2 and meta[0] == "Publication Date":
            published = meta[1][:10]
    header = next(rows, [])
    if "PricePerUnit" not in header:
        raise ValueError(f"not an AWS offer CSV: header {header[:5]}...")
    col = {name: i for i, name in enumerate(header)}

    def get(row: list[str], name: str) -> str:
        index = col.get(name)
        return row[index] if index is not None and index < len(row) else ""

    prices: dict[str, float] = {}
    ebs: dict[str, float] = {}
    for row in rows:
        if get(row, "TermType") != "OnDemand" or get(row, "Currency") != "USD":
            continue
        try:
            usd = float(get(row, "PricePerUnit"))
        except ValueError:
            continue
        if usd <= 0:
            continue  # $0 rows: unused reservations, host fees
        family = get(row, "Product Family")
        if family == "Compute Instance":
            itype = get(row, "Instance Type")
            if (itype.split(".")[0] in families and get(row, "Unit") == "Hrs"
                    and get(row, "Operating System") == "Linux"
                    and get(row, "Tenancy") == "Shared"
                    and get(row, "Pre Installed S/W") == "NA"
                    and get(row, "CapacityStatus") == "Used"):
                # Several rows can remain (usage types); the plain box usage is the lowest.
                prices[itype] = min(usd, prices.get(itype, usd))
        elif family == "Storage" and get(row, "Unit") == "GB-Mo":
            volume = get(row, "Volume API Name")
            if volume in volume_types:
                ebs[volume] = min(usd, ebs.get(volume, usd))
    return prices, ebs, published


def _open_url(url: str) -> TextIO:
    response = urllib.request.urlopen(url, timeout=_TIMEOUT)  # noqa: S310 (a fixed https URL)
    return io.TextIOWrapper(response, encoding="utf-8", newline="")


def offer_urls(regions: Sequence[str]) -> dict[str, str]:
    """Region -> URL of its current AmazonEC2 offer CSV, from the region index."""
    with urllib.request.urlopen(REGION_INDEX, timeout=_TIMEOUT) as response:  # noqa: S310
        index = json.load(response)
    out = {}
    for region in regions:
        entry = index.get("regions", {}).get(region)
        if entry is None:
            raise SystemExit(f"update_prices: {region} is not in the AWS price list region "
                             "index")
        out[region] = BASE + entry["currentVersionUrl"].replace(".json", ".csv")
    return out


def build(sources: dict[str, str], families: Sequence[str],
          keep_sizes: Optional[Sequence[str]]) -> dict[str, object]:
    """Read every region's offer and assemble the document ``prices.json`` holds."""
    on_demand: dict[str, dict[str, float]] = {}
    ebs: dict[str, dict[str, float]] = {}
    dates = set()
    for region, where in sources.items():
        print(f"update_prices: reading {region} from {where}", file=sys.stderr, flush=True)
        stream = _open_url(where) if where.startswith("https://") else \
            open(where, encoding="utf-8", newline="")
        with stream:
            prices, volumes, published = read_offer(stream, families, VOLUME_TYPES)
        if keep_sizes:
            prices = {t: p for t, p in prices.items() if t.split(".", 1)[1] in keep_sizes}
        on_demand[region] = dict(sorted(prices.items()))
        for volume, usd in volumes.items():
            ebs.setdefault(volume, {})[region] = usd
        if published:
            dates.add(published)
    return {
        "about": ("On-demand USD per instance-hour for Linux, shared tenancy, no "
                  "pre-installed software (capacity status Used), and EBS USD per GB-month. "
                  "Generated by scripts/update_prices.py from the AWS Price List bulk API."),
        "date": max(dates) if dates else "",
        "currency": "USD",
        "sources": [{"what": f"{region}: families {', '.join(families)}", "where": where,
                     "date": ", ".join(sorted(dates))} for region, where in sources.items()],
        "on_demand": on_demand,
        "ebs_gb_month": ebs,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Regenerate the table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", nargs="+", default=list(REGIONS))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--sizes", nargs="*", default=None,
                        help=f"sizes to keep (default: all; e.g. {' '.join(SIZES)})")
    parser.add_argument("--from-file", action="append", default=[], metavar="REGION=PATH",
                        help="read a region's offer CSV from a file instead of the web")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.from_file:
        sources = dict(item.split("=", 1) for item in args.from_file)
    else:
        sources = offer_urls(args.regions)
    document = build(sources, args.families, args.sizes)
    on_demand: dict[str, dict[str, float]] = document["on_demand"]  # type: ignore[assignment]
    if not any(on_demand.values()):
        print("update_prices: no price matched; the table is left unchanged", file=sys.stderr)
        return 1
    args.output.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    count = sum(len(t) for t in on_demand.values())
    print(f"update_prices: wrote {count} prices dated {document['date']} to {args.output}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
