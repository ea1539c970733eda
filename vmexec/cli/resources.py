"""``vmexec ls`` and ``vmexec cleanup``: the vmexec-tagged resources of an account.

Owns finding what fleets left behind (by tag, across regions), printing it as a table,
and deleting exactly what was printed. The finding and deleting are
``vmexec.providers.ec2.resources``'s; this module chooses and shows.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any, Optional

from vmexec.cli.aws import aws_session, ec2_clients
from vmexec.cli.options import aws_options, confirm_options, fleet_options, region_options
from vmexec.cli.registry import command
from vmexec.errors import VMExecError

__all__ = ["ls", "cleanup"]


def _find(args: argparse.Namespace, clients: dict[str, Any]) -> list[Any]:
    from vmexec.providers.ec2.resources import find_all

    return find_all(clients, fleet=getattr(args, "fleet", None),
                    older_than=getattr(args, "older_than", None))


def _show(args: argparse.Namespace, if_none: str) -> tuple[dict[str, Any], list[Any]]:
    """Find the resources ``args`` select and print them (or ``if_none``)."""
    clients = ec2_clients(args)
    found = _find(args, clients)
    print(_table(found) if found else f"{if_none} in {len(clients)} region(s)")
    return clients, found


def _age_text(age: Optional[datetime.timedelta]) -> str:
    if age is None:
        return "?"
    seconds = max(0, int(age.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(resources: list[Any]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [("REGION", "KIND", "ID", "FLEET", "NAME", "STATE", "AGE", "OWNER", "DETAIL")]
    for r in resources:
        rows.append((r.region, r.kind, r.id, r.fleet or "-", r.name or "-", r.state or "-",
                     _age_text(r.age(now)), r.owner or "-", r.detail or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def _counts(resources: list[Any]) -> str:
    kinds: dict[str, int] = {}
    for r in resources:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    fleets = {r.fleet for r in resources if r.fleet}
    return (", ".join(f"{n} {k}(s)" for k, n in sorted(kinds.items()))
            + f" in {len(fleets)} fleet(s)")


@command("ls", "list vmexec resources (by tag) across regions",
         aws_options, region_options, fleet_options)
def ls(args: argparse.Namespace) -> int:
    """Print every vmexec-tagged instance, volume, security group, launch template and
    key pair, with its fleet, owner and age."""
    clients, found = _show(args, "no vmexec resources")
    if found:
        print(f"\n{_counts(found)} in {len(clients)} region(s) searched")
    return 0


def _caller_owner(args: argparse.Namespace) -> str:
    """The caller's AWS identity (STS), as in the ``vmexec:owner`` tag it creates."""
    from vmexec.providers.ec2.resources import caller_owner

    session = aws_session(args)
    return caller_owner(session.client("sts", region_name=session.region_name or "us-east-1",
                                       endpoint_url=args.endpoint_url))


@command("cleanup", "delete vmexec resources left behind (dry run unless --yes)",
         aws_options, region_options, fleet_options, confirm_options)
def cleanup(args: argparse.Namespace) -> int:
    """Delete what ``ls`` shows of *your* resources (optionally one fleet, or older than
    an age); ``--all-owners`` includes everyone's.

    Your resources are those whose ``vmexec:owner`` tag is your AWS identity (STS
    ``GetCallerIdentity``). Dry run by default: prints what would be deleted. With
    ``--yes``, deletes exactly the resources it printed (terminates the instances, waits,
    deletes the rest) and checks that they are gone; anything created meanwhile is left.
    """
    from vmexec.providers.ec2.teardown import delete_listed

    clients = ec2_clients(args)
    found = _find(args, clients)
    others = []
    if not args.all_owners:
        me = _caller_owner(args)
        others = [r for r in found if r.owner != me]
        found = [r for r in found if r.owner == me]
    print(_table(found) if found else
          f"nothing to clean up in {len(clients)} region(s)"
          + ("" if args.all_owners else " (of your resources)"))
    if others:
        owners = sorted({r.owner or "(no owner tag)" for r in others})
        print(f"\nleft out {len(others)} resource(s) of other owners "
              f"({', '.join(owners[:3])}{' ...' if len(owners) > 3 else ''}): "
              "add --all-owners to include them")
    if not found:
        return 0
    if not args.yes:
        print(f"\nwould delete {_counts(found)}; run again with --yes to delete them")
        return 0
    regions = {r.region for r in found}
    summary = delete_listed({r: c for r, c in clients.items() if r in regions}, found)
    print(f"\n{summary.text()}")
    if args.fleet:
        # A named fleet kept warm keeps its staged environment for its next run.
        from vmexec.environment.stage import delete_staging

        try:
            deleted = delete_staging(aws_session(args), sorted(regions), args.fleet,
                                     endpoint_url=args.endpoint_url)
        except VMExecError as exc:
            print(f"staged artifacts of {args.fleet} not deleted: {exc} (the staging "
                  "bucket's lifecycle rule expires them within a day)", file=sys.stderr)
        else:
            if any(deleted.values()):
                print(f"deleted {sum(deleted.values())} staged object(s) of {args.fleet}")
    return 0 if summary.clean else 1
