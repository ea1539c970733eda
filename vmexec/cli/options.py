"""The argument groups ``vmexec`` subcommands are built from (``aws_options``, ...).

Each group is a function adding arguments to a subcommand's parser; ``@command`` lists
the groups a command takes. Imports nothing that needs the ``aws`` extra: vmexec's EC2
modules only when an argument is parsed.
"""

from __future__ import annotations

import argparse
import datetime

from vmexec.errors import ConfigError

__all__ = ["aws_options", "region_options", "fleet_options", "confirm_options",
           "regions_options", "prices_options", "doctor_options"]


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
