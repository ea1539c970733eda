"""The ``vmexec`` command: ``vmexec ls``, ``vmexec cleanup`` (``prices``/``doctor`` later).

Each subcommand is one function registered with ``@command``; its arguments are built
from small reusable groups (``aws_options``, ``region_options``, ...)::

    @command("prices", "show the price per slot-hour of instance types",
             aws_options, region_options)
    def prices(args: argparse.Namespace) -> int:
        ...
        return 0

``main(argv)`` builds the parser from the registry, runs the chosen function and turns
vmexec's errors into a one-line message and an exit status (0 ok, 1 something remains or
failed, 2 usage/configuration error).

boto3 is imported only inside the AWS helpers below (``_ec2_clients``), and vmexec's
EC2 modules only when a command needs them, so ``vmexec --help`` works without the
``aws`` extra. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from typing import Any, Callable, Optional, Sequence

from vmexec._version import __version__
from vmexec.errors import ConfigError, ProviderNotAvailable, VMExecError

__all__ = ["main", "command", "COMMANDS"]

Handler = Callable[[argparse.Namespace], int]
ArgumentGroup = Callable[[argparse.ArgumentParser], None]


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered subcommand."""

    name: str
    help: str
    run: Handler
    arguments: tuple[ArgumentGroup, ...]


#: Subcommands by name, in registration order.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *arguments: ArgumentGroup) -> Callable[[Handler], Handler]:
    """Register ``fn(args) -> exit status`` as ``vmexec <name>``.

    Args:
        name: the subcommand.
        help: one line for ``vmexec --help``.
        *arguments: functions adding arguments to the subcommand's parser.
    """
    def register(run: Handler) -> Handler:
        COMMANDS[name] = Command(name, help, run, arguments)
        return run

    return register


# --- argument groups ---------------------------------------------------------------------

def aws_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AWS")
    group.add_argument("--profile", help="AWS profile (default: the environment's)")
    group.add_argument("--endpoint-url", metavar="URL",
                       help="AWS endpoint for every client, e.g. a moto server "
                            "(default: AWS_ENDPOINT_URL or AWS)")


def region_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", dest="regions", action="append", metavar="REGION",
                        help="a region to look in; repeat for several (default: every "
                             "region enabled for the account)")


def fleet_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", metavar="ID", help="only the fleet with this id "
                                                      "(the vmexec:fleet tag, vmx-...)")
    parser.add_argument("--older-than", metavar="AGE", type=_age,
                        help="only resources older than AGE (90s, 30m, 2h, 1d)")


def confirm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true",
                        help="really delete (without it, only show what would be deleted)")


def _age(text: str) -> datetime.timedelta:
    from vmexec.providers.ec2.resources import parse_age

    try:
        return parse_age(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- AWS helpers (the only place the CLI touches boto3) ---------------------------------

def _ec2_clients(args: argparse.Namespace) -> dict[str, Any]:
    """Region -> EC2 client for ``--region`` (default: every enabled region).

    Raises:
        ConfigError: no credentials, or boto3 missing.
    """
    try:
        import boto3
    except ImportError:
        raise ProviderNotAvailable("vmexec's AWS commands need boto3: "
                                   "pip install 'vmexec[aws]'") from None
    session = boto3.Session(profile_name=args.profile) if args.profile else boto3.Session()
    if session.get_credentials() is None:
        raise ConfigError("no AWS credentials found: configure them (`aws configure`, "
                          "AWS_PROFILE, --profile)")
    home = session.region_name or "us-east-1"

    def client(region: str) -> Any:
        return session.client("ec2", region_name=region, endpoint_url=args.endpoint_url)

    regions = args.regions
    if not regions:
        from vmexec.providers.ec2.fleet import describe_regions

        regions = sorted(r for r, status in describe_regions(client(home)).items()
                         if status != "not-opted-in")
    return {region: client(region) for region in dict.fromkeys(regions)}


def _find(args: argparse.Namespace, clients: dict[str, Any]) -> list[Any]:
    from vmexec.providers.ec2.resources import find_all

    return find_all(clients, fleet=getattr(args, "fleet", None),
                    older_than=getattr(args, "older_than", None))


def _show(args: argparse.Namespace, if_none: str) -> tuple[dict[str, Any], list[Any]]:
    """Find the resources ``args`` select and print them (or ``if_none``)."""
    clients = _ec2_clients(args)
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


# --- commands ---------------------------------------------------------------------------

@command("ls", "list vmexec resources (by tag) across regions",
         aws_options, region_options, fleet_options)
def ls(args: argparse.Namespace) -> int:
    """Print every vmexec-tagged instance, volume, security group, launch template and
    key pair, with its fleet, owner and age."""
    clients, found = _show(args, "no vmexec resources")
    if found:
        print(f"\n{_counts(found)} in {len(clients)} region(s) searched")
    return 0


@command("cleanup", "delete vmexec resources left behind (dry run unless --yes)",
         aws_options, region_options, fleet_options, confirm_options)
def cleanup(args: argparse.Namespace) -> int:
    """Delete what ``ls`` shows (optionally one fleet, or older than an age).

    Dry run by default: prints what would be deleted. With ``--yes``, terminates the
    instances, waits, deletes the rest, and checks by tag that it is gone.
    """
    from vmexec.providers.ec2.resources import sweep

    clients, found = _show(args, "nothing to clean up")
    if not found:
        return 0
    if not args.yes:
        print(f"\nwould delete {_counts(found)}; run again with --yes to delete them")
        return 0
    regions = {r.region for r in found}
    summary = sweep({r: c for r, c in clients.items() if r in regions}, fleet=args.fleet,
                    older_than=args.older_than)
    print(f"\n{summary.text()}")
    return 0 if summary.clean else 1


# --- entry point --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``vmexec`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="vmexec", description="vmexec: run concurrent.futures work on fleets of VMs. "
                                   "These commands manage what fleets leave in the cloud.")
    parser.add_argument("--version", action="version", version=f"vmexec {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for add in cmd.arguments:
            add(sub)
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``vmexec`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"vmexec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except VMExecError as exc:
        print(f"vmexec {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vmexec {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # botocore's own errors (no region, endpoint unreachable, bad profile) are
        # configuration problems the user can fix: one line, not a traceback.
        if not type(exc).__module__.startswith("botocore"):
            raise
        print(f"vmexec {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
