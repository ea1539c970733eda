"""``vmexec doctor``: what a fleet needs, checked before launching one.

AWS (credentials, each region's default VPC, the vCPU quotas of the instance families)
and SSH hosts (sshd answers, the key logs in, vmexec imports there); each check prints
one line as it is made.
"""

from __future__ import annotations

import argparse
import getpass
import re
import shlex
import sys
import threading
from typing import Any, Optional

from vmexec.cli.aws import aws_errors, aws_session, brief
from vmexec.cli.options import aws_options, doctor_options, regions_options
from vmexec.cli.registry import command
from vmexec.errors import ConfigError

__all__ = ["doctor"]


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
        session = aws_session(args, required=True)
    except ConfigError as exc:
        report.fail(f"AWS: {exc}")
        return
    home = session.region_name or "us-east-1"
    errors = aws_errors()

    def client(service: str, region: str) -> Any:
        return session.client(service, region_name=region, endpoint_url=args.endpoint_url)

    try:
        who = client("sts", home).get_caller_identity()
        report.ok(f"AWS credentials: account {who.get('Account')}, {who.get('Arn')}")
    except errors as exc:
        report.fail(f"AWS credentials are present but not accepted: {brief(exc)}")
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
            report.fail(f"{region}: could not look for the default VPC: {brief(exc)}")
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
                    report.warn(f"{what}: could not read it ({brief(exc)}); see Service "
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
