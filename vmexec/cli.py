"""The ``vmexec`` command: ``vmexec ls``, ``cleanup``, ``prices`` and ``doctor``.

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

boto3 is imported only inside the AWS helpers below (``_ec2_clients``, ``_aws_session``),
and vmexec's EC2, pricing and SSH modules only when a command needs them, so ``vmexec
--help`` works without the ``aws`` extra. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import re
import shlex
import os
import sys
import threading
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
    parser.add_argument("--all-owners", action="store_true",
                        help="also resources whose vmexec:owner tag is not your AWS identity "
                             "(default: only your own)")


def _age(text: str) -> datetime.timedelta:
    from vmexec.providers.ec2.resources import parse_age

    try:
        return parse_age(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def regions_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regions", dest="regions", nargs="+", action="extend",
                        metavar="REGION", help="regions to look at (default: the AWS "
                                                "profile's region, else us-east-1)")
    parser.add_argument("--region", dest="regions", action="append", metavar="REGION",
                        help=argparse.SUPPRESS)


def prices_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("types", nargs="+", metavar="TYPE",
                        help="instance types, e.g. c7g.large c7i.large (or c7g.large,c7i.large)")
    parser.add_argument("--spot", action="store_true",
                        help="spot prices (median of the zones' latest) instead of on-demand")
    parser.add_argument("--offline", action="store_true",
                        help="the bundled price table only: no AWS call")


def doctor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--types", action="append", default=[], metavar="FAMILIES",
                        help="instance families or types whose vCPU quotas to check, e.g. "
                             "c7g,c7i or g5.xlarge (default: the standard families)")
    parser.add_argument("--hosts", nargs="+", action="extend", default=[],
                        metavar="USER@HOST:PORT",
                        help="SSH hosts (the ssh provider's) to check: sshd answers, the key "
                             "logs in, and vmexec imports there")
    parser.add_argument("--ssh-key", metavar="FILE",
                        help="private key for --hosts (default: ssh-agent and ~/.ssh/id_*)")
    parser.add_argument("--known-hosts", metavar="FILE",
                        help="known_hosts for --hosts (default: ~/.ssh/known_hosts)")
    parser.add_argument("--python", default="python3", metavar="PATH",
                        help="the interpreter on --hosts (default: python3)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="seconds to reach each host (default: 10)")


# --- AWS helpers (the only place the CLI touches boto3) ---------------------------------

def _aws_session(args: argparse.Namespace, required: bool = True) -> Any:
    """A ``boto3.Session`` for ``--profile``; None when not ``required`` and boto3 or
    credentials are missing.

    Raises:
        ProviderNotAvailable: boto3 is missing (``required``).
        ConfigError: no credentials (``required``).
    """
    try:
        import boto3
    except ImportError:
        if not required:
            return None
        raise ProviderNotAvailable("vmexec's AWS commands need boto3: "
                                   "pip install 'vmexec[aws]'") from None
    session = boto3.Session(profile_name=args.profile) if args.profile else boto3.Session()
    if session.get_credentials() is None:
        if not required:
            return None
        raise ConfigError("no AWS credentials found: configure them (`aws configure`, "
                          "AWS_PROFILE, --profile)")
    return session


def _aws_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def _brief(exc: BaseException) -> str:
    """An AWS error in one short phrase: its code and the start of its message."""
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    text = f"{error.get('Code')}: {error.get('Message', '')}" if error.get("Code") else str(exc)
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."

def _ec2_clients(args: argparse.Namespace) -> dict[str, Any]:
    """Region -> EC2 client for ``--region`` (default: every enabled region).

    Raises:
        ConfigError: no credentials, or boto3 missing.
    """
    session = _aws_session(args)
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


def _caller_owner(args: argparse.Namespace) -> str:
    """The caller's AWS identity (STS), as in the ``vmexec:owner`` tag it creates."""
    from vmexec.providers.ec2.resources import caller_owner

    session = _aws_session(args)
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
    from vmexec.providers.ec2.resources import delete_listed

    clients = _ec2_clients(args)
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
            deleted = delete_staging(_aws_session(args), sorted(regions), args.fleet,
                                     endpoint_url=args.endpoint_url)
        except VMExecError as exc:
            print(f"staged artifacts of {args.fleet} not deleted: {exc} (the staging "
                  "bucket's lifecycle rule expires them within a day)", file=sys.stderr)
        else:
            if any(deleted.values()):
                print(f"deleted {sum(deleted.values())} staged object(s) of {args.fleet}")
    return 0 if summary.clean else 1


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
        except _aws_errors() as exc:
            # An unknown name, no permission or no network: keep the size-name figure.
            print(f"vmexec prices: {instance_type}: {_brief(exc)}", file=sys.stderr)
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
    session = None if args.offline else _aws_session(args, required=False)
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


# --- doctor ---------------------------------------------------------------------------------

#: vCPU quota codes (service "ec2"): (name, on-demand code, spot code). Families missing
#: here are reported as "not known to vmexec", never mapped to a guess.
_QUOTAS = {
    "standard": ("Standard (A, C, D, H, I, M, R, T, Z) instances", "L-1216C47A",
                 "L-34B43A08"),
    "g": ("G and VT instances", "L-DB2E81BA", "L-3819A6DF"),
    "p": ("P instances", "L-417A185B", "L-7212CCBC"),
    "dl": ("DL instances", "L-6E869C2A", "L-85EED4F7"),
}
_OTHER_QUOTAS = ("inf", "trn", "hpc", "mac", "u-", "u7", "x", "f", "vt1")


def _quota_group(family: str) -> Optional[str]:
    family = family.lower()
    if family.startswith("dl"):
        return "dl"
    if family.startswith("vt") or family.startswith("g"):
        return "g"
    if family.startswith(_OTHER_QUOTAS):
        return None
    if family.startswith("p"):
        return "p"
    if family[:1] in "acdhimrtz":
        return "standard"
    return None


class _Report:
    """Collects doctor's checks and prints each as it is made."""

    def __init__(self) -> None:
        self.failed = self.warned = self.passed = 0

    def ok(self, text: str) -> None:
        self.passed += 1
        print(f"ok    {text}", flush=True)

    def warn(self, text: str) -> None:
        self.warned += 1
        print(f"warn  {text}", flush=True)

    def fail(self, text: str) -> None:
        self.failed += 1
        print(f"FAIL  {text}", flush=True)


def _doctor_aws(args: argparse.Namespace, report: _Report) -> None:
    try:
        session = _aws_session(args, required=True)
    except ConfigError as exc:
        report.fail(f"AWS: {exc}")
        return
    home = session.region_name or "us-east-1"
    errors = _aws_errors()

    def client(service: str, region: str) -> Any:
        return session.client(service, region_name=region, endpoint_url=args.endpoint_url)

    try:
        who = client("sts", home).get_caller_identity()
        report.ok(f"AWS credentials: account {who.get('Account')}, {who.get('Arn')}")
    except errors as exc:
        report.fail(f"AWS credentials are present but not accepted: {_brief(exc)}")
        return
    families = list(dict.fromkeys(t.strip().split(".")[0] for arg in args.types
                                  for t in arg.split(",") if t.strip()))
    groups: dict[str, list[str]] = {}
    for family in families or ["standard"]:
        group = "standard" if family == "standard" else _quota_group(family)
        if group is None:
            report.warn(f"vCPU quota of the {family} family: its quota code is not known to "
                        "vmexec; see Service Quotas -> Amazon EC2 in the AWS console")
            continue
        groups.setdefault(group, []).append(family)
    for region in dict.fromkeys(args.regions or [home]):
        try:
            vpcs = client("ec2", region).describe_vpcs(
                Filters=[{"Name": "isDefault", "Values": ["true"]}]).get("Vpcs", [])
        except errors as exc:
            report.fail(f"{region}: could not look for the default VPC: {_brief(exc)}")
            continue
        if vpcs:
            report.ok(f"{region}: default VPC {vpcs[0]['VpcId']}")
        else:
            report.fail(f"{region}: no default VPC (vmexec launches into it): create one with "
                        f"`aws ec2 create-default-vpc --region {region}`")
        quotas = client("service-quotas", region)
        for group, members in groups.items():
            name, on_demand, spot = _QUOTAS[group]
            for purchase, code in (("on-demand", on_demand), ("spot", spot)):
                what = (f"{region}: {purchase} vCPU quota for {name} ({code}"
                        + (f"; {', '.join(m for m in members if m != 'standard')}"
                           if any(m != "standard" for m in members) else "") + ")")
                try:
                    value = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)[
                        "Quota"]["Value"]
                except errors as exc:
                    report.warn(f"{what}: could not read it ({_brief(exc)}); see Service "
                                "Quotas -> Amazon EC2 in the console")
                    continue
                if value <= 0:
                    report.fail(f"{what}: 0 vCPUs: request an increase in Service Quotas "
                                f"(quota code {code})")
                else:
                    report.ok(f"{what}: {value:g} vCPUs")


def _parse_host(text: str) -> tuple[str, str, int]:
    """``user@host:port`` (user and port optional; ``[v6]:port``) -> (user, host, port)."""
    user, _, rest = text.rpartition("@")
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+)(?::(\d+))?", rest)
    if not match:
        raise ConfigError(f"--hosts: cannot read {text!r}: use user@host or user@host:port")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 22)
    return user or getpass.getuser(), host, port


def _doctor_host(args: argparse.Namespace, text: str, report: _Report) -> None:
    from vmexec import __version__ as local_version
    from vmexec.errors import TransportError
    from vmexec.transports.ssh import open_ssh_transport

    try:
        user, host, port = _parse_host(text)
    except ConfigError as exc:
        report.fail(str(exc))
        return
    label = f"{user}@{host}:{port}"
    probe = (f"{shlex.quote(args.python)} -c "
             + shlex.quote("import sys, vmexec; print('vmexec', vmexec.__version__, "
                           "'%d.%d' % sys.version_info[:2])"))
    try:
        transport = open_ssh_transport(host, port, user, key_filename=args.ssh_key,
                                       known_hosts=args.known_hosts, host_key_policy="reject",
                                       command=probe, timeout=args.timeout, label=label)
    except TransportError as exc:
        report.fail(f"{label}: sshd not reachable or login refused: {exc}")
        return
    # Bounded: a host that accepts the login but never answers must not hang doctor.
    timer = threading.Timer(args.timeout, transport.close)
    timer.daemon = True
    timer.start()
    output = b""
    try:
        while True:
            data = transport.read(4096)
            if not data:
                break
            output += data
    except TransportError as exc:
        output += f"\n{exc}".encode()
    finally:
        timer.cancel()
        said = transport.diagnostics()
        transport.close()
    answer = output.decode("utf-8", "replace").split()
    if len(answer) < 3 or answer[0] != "vmexec":
        report.fail(f"{label}: sshd answers and the key logs in, but `{args.python} -c 'import "
                    f"vmexec'` failed there: {said.strip() or 'no output'}. Install vmexec "
                    f"there (pip install vmexec=={local_version}) or pass --python")
        return
    remote_version, remote_python = answer[1], answer[2]
    local_python = "%d.%d" % sys.version_info[:2]
    if remote_python != local_python:
        report.fail(f"{label}: Python {remote_python} there, {local_python} here: pickled "
                    "code does not cross minor versions; use the same Python minor version")
    elif remote_version != local_version:
        report.warn(f"{label}: vmexec {remote_version} there, {local_version} here")
    else:
        report.ok(f"{label}: sshd, login and vmexec {remote_version} on Python "
                  f"{remote_python}")


@command("doctor", "check AWS credentials, default VPCs, vCPU quotas and SSH hosts",
         aws_options, regions_options, doctor_options)
def doctor(args: argparse.Namespace) -> int:
    """Check what a fleet needs before launching one; exit 1 when a check fails.

    AWS checks run unless only ``--hosts`` is given: credentials (sts
    get-caller-identity), the default VPC of each region, and the on-demand and spot vCPU
    quotas of the named families ("could not read" is a warning, not a failure). Each
    ``--hosts`` entry is reached over SSH with a short timeout and must import vmexec.
    """
    report = _Report()
    if args.regions or args.types or not args.hosts:
        _doctor_aws(args, report)
    for host in args.hosts:
        _doctor_host(args, host, report)
    print(f"\n{report.passed} ok, {report.warned} warning(s), {report.failed} failed")
    return 1 if report.failed else 0


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


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="options of the environment capture (see `vmexec env --help`)")


# Listed here for `vmexec --help`; main() hands `vmexec env ...` to the capture module's
# own parser before this parser sees it, so its options (--json, --preflight) pass intact.
@command("env", "show the Python environment the machines would reproduce", _env_arguments)
def env(args: argparse.Namespace) -> int:
    from vmexec.environment.capture import main as env_main

    return env_main(list(args.rest))


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("function", metavar="MODULE:FUNCTION",
                        help="the callable to time, importable from here (e.g. mypkg.bench:run)")
    parser.add_argument("args", nargs="*", help="arguments (Python literals, else strings)")
    parser.add_argument("--types", required=True,
                        help="comma-separated instance types, e.g. c7g.large,c7i.large")
    parser.add_argument("--regions", default=None,
                        help="comma-separated regions (default: the provider's)")
    parser.add_argument("--repeat", type=int, default=3, help="calls per type (median shown)")
    parser.add_argument("--spot", action="store_true", help="spot machines and prices")
    parser.add_argument("--provider", default=None,
                        help="local, ssh or ec2 (default: $VMEXEC_PROVIDER, else ec2)")


@command("compare", "run one call on one machine of each type; compare time and cost",
         _compare_arguments)
def compare_command(args: argparse.Namespace) -> int:
    import ast
    import importlib

    from vmexec.compare import compare

    module_name, _, function_name = args.function.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"{args.function!r}: give MODULE:FUNCTION, e.g. mypkg.bench:run")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `vmexec compare mymodule:f` from a project folder
    try:
        fn = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {args.function}: {exc}") from exc

    def literal(text: str) -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    regions = args.regions.split(",") if args.regions else None
    result = compare(fn, *map(literal, args.args), instance_types=args.types.split(","),
                     regions=regions, repeat=args.repeat, spot=args.spot,
                     provider=args.provider)
    print(result)
    return 1 if all(c.error for c in result.candidates) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``vmexec`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["env"]:
        # `vmexec env` has its own parser (vmexec.environment.capture): hand it every
        # option untouched, `--json` and `--preflight` included.
        from vmexec.environment.capture import main as env_main

        return env_main(argv[1:])
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
