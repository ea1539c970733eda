"""``vmexec prices``: price per hour and per vCPU-hour of instance types, and its source.

Prices come from ``vmexec.guardrails.pricing`` (live where the credentials allow, else
the bundled table); vCPUs from ``DescribeInstanceTypes``, else from the size's name.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Optional

from vmexec.cli.aws import aws_errors, aws_session, brief
from vmexec.cli.options import aws_options, prices_options, regions_options
from vmexec.cli.registry import command

__all__ = ["prices"]


#: Size name -> vCPUs for the common sizes (used when DescribeInstanceTypes is unavailable).
_SIZE_VCPUS = {"nano": 2, "micro": 2, "small": 2, "medium": 1, "large": 2, "xlarge": 4}


def _vcpus_by_name(instance_type: str) -> Optional[int]:
    size = instance_type.partition(".")[2]
    if instance_type.startswith("t") and size in ("nano", "micro", "small", "medium"):
        return 2  # burstable types have 2 vCPUs from nano up
    if size in _SIZE_VCPUS:
        return _SIZE_VCPUS[size]
    match = re.fullmatch(r"(\d+)xlarge", size)
    return int(match.group(1)) * 4 if match else None


def _vcpus(session: Any, args: argparse.Namespace, region: str,
           types: list[str]) -> dict[str, Optional[int]]:
    """vCPUs per type: ``DescribeInstanceTypes`` where credentials allow, else by size."""
    found: dict[str, Optional[int]] = {t: _vcpus_by_name(t) for t in types}
    if session is None or args.offline:
        return found
    ec2 = session.client("ec2", region_name=region, endpoint_url=args.endpoint_url)
    for instance_type in types:
        try:
            answer = ec2.describe_instance_types(InstanceTypes=[instance_type])
        except aws_errors() as exc:
            # An unknown name, no permission or no network: keep the size-name figure.
            print(f"vmexec prices: {instance_type}: {brief(exc)}", file=sys.stderr)
            continue
        for item in answer.get("InstanceTypes", []):
            found[instance_type] = int(item.get("VCpuInfo", {}).get("DefaultVCpus", 0)) or None
    return found


@command("prices", "show instance prices per hour and per vCPU-hour, and their source",
         aws_options, regions_options, prices_options)
def prices(args: argparse.Namespace) -> int:
    """Print $/h, $/vCPU-h and the source of each type's price in each region.

    Live prices (AWS Price List API, spot price history) when the credentials allow,
    else the bundled table; an unknown price is printed as such and the exit status is 1.
    """
    from vmexec.guardrails.budget import format_usd
    from vmexec.guardrails.pricing import PriceBook

    types = list(dict.fromkeys(t.strip() for arg in args.types for t in arg.split(",")
                               if t.strip()))
    session = None if args.offline else aws_session(args, required=False)
    home = (session.region_name if session is not None else None) or "us-east-1"
    regions = list(dict.fromkeys(args.regions or [home]))
    book = PriceBook(session=session, endpoint_url=args.endpoint_url,
                     live=session is not None)
    vcpus = _vcpus(session, args, regions[0], types)
    rows = [("TYPE", "REGION", "PURCHASE", "VCPUS", "$/H", "$/VCPU-H", "SOURCE")]
    unknown = 0
    for instance_type in types:
        for region in regions:
            price = book.hourly(instance_type, region, spot=args.spot)
            cpus = vcpus.get(instance_type)
            if price is None:
                unknown += 1
                rows.append((instance_type, region, "spot" if args.spot else "on-demand",
                             str(cpus or "?"), "unknown", "unknown",
                             f"not in the bundled table ({book.bundled_date}) and no live "
                             "price"))
                continue
            rows.append((instance_type, region, "spot" if args.spot else "on-demand",
                         str(cpus or "?"), format_usd(price.usd_per_hour),
                         format_usd(price.usd_per_hour / cpus) if cpus else "?",
                         price.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                    for row in rows))
    if unknown:
        print(f"\n{unknown} price(s) unknown: vmexec does not guess. With AWS credentials "
              "that allow pricing:GetProducts, live prices fill the gaps; "
              "scripts/update_prices.py regenerates the bundled table.")
    return 1 if unknown else 0
