"""The registry of ``vmexec`` subcommands: ``@command`` and ``COMMANDS``.

Owns what a subcommand is (a function ``fn(args) -> exit status`` and the argument
groups that build its parser) and the table ``build_parser`` reads. Imports nothing of
vmexec: every command module imports this one.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

__all__ = ["Command", "COMMANDS", "command", "Handler", "ArgumentGroup"]

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
