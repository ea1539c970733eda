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

AWS is reached only through the AWS helpers (``vmexec.cli.aws``), and vmexec's EC2,
pricing and SSH modules only when a command needs them, so ``vmexec --help`` works
without the ``aws`` extra. Nothing imports this package; ``python -m vmexec.cli`` and
the ``vmexec`` console script (``vmexec.cli:main``) run it.

One module per job:

    registry.py   ``@command`` and ``COMMANDS``
    options.py    the argument groups
    aws.py        boto3 sessions and clients, AWS errors in one phrase
    resources.py  ls, cleanup
    prices.py     prices
    doctor.py     doctor
    project.py    env, compare
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vmexec._version import __version__
from vmexec.cli.options import (aws_options, confirm_options, doctor_options, fleet_options,
                                prices_options, region_options, regions_options)
from vmexec.cli.registry import COMMANDS, ArgumentGroup, Command, Handler, command
from vmexec.errors import ConfigError, VMExecError

# The command modules register their commands on import, in the order `vmexec --help`
# lists them.
from vmexec.cli import resources, prices, doctor, project  # noqa: E402,F401,I001  isort:skip

__all__ = ["main", "command", "COMMANDS", "Command", "Handler", "ArgumentGroup",
           "build_parser", "aws_options", "region_options", "fleet_options",
           "confirm_options", "regions_options", "prices_options", "doctor_options"]


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

