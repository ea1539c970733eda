"""``vmexec env`` and ``vmexec compare``: commands about the user's own code.

``env`` shows the Python environment machines would reproduce (the capture module's own
parser reads its options); ``compare`` runs one call on one machine of each instance
type and compares time and cost (``vmexec.compare``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vmexec.cli.registry import command
from vmexec.errors import ConfigError

__all__ = ["env", "compare_command"]


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
