"""Every exception vmexec raises on purpose.

The tree::

    VMExecError
    ├── ConfigError (also ValueError)        bad arguments, caught before anything starts
    │   └── ProviderNotAvailable             a provider name that is unknown or not installed
    ├── BrokenFleet (also BrokenProcessPool) no machine can run work any more; terminal
    ├── WorkerLost (also BrokenProcessPool)  a task's worker died more than max_retries times
    ├── DeserializationError                 a task could not be unpickled on its machine, or
    │   (also BrokenProcessPool)             its result on the client; fails that task only
    ├── ProtocolError                        a peer spoke something that is not the vmexec protocol
    │   └── VersionMismatch                  handshake refused (Python minor / protocol version)
    ├── TransportError (also OSError)        the byte stream to a machine failed or could not open
    │   └── HostKeyError                     an SSH host key is unknown or does not match
    ├── CapacityError                        no candidate machine type/zone/region has capacity
    ├── QuotaError                           a cloud quota stops the launch; names the quota
    ├── EnvSyncError                         the environment cannot be reproduced on a target
    └── BudgetExceeded                       a cost limit refuses a launch or stops the fleet

Every failure ``ProcessPoolExecutor`` reports as ``BrokenProcessPool`` is an instance of
``concurrent.futures.process.BrokenProcessPool`` here too, so existing ``except
BrokenProcessPool`` (and ``except BrokenExecutor``) clauses keep working; the subclass
says what happened, and where vmexec can fail a single task instead of the whole pool,
only that task's future fails.

This module imports only the standard library: the agent imports it on a bare machine.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "VMExecError",
    "ConfigError",
    "ProviderNotAvailable",
    "BrokenFleet",
    "WorkerLost",
    "DeserializationError",
    "ProtocolError",
    "VersionMismatch",
    "TransportError",
    "HostKeyError",
    "CapacityError",
    "QuotaError",
    "EnvSyncError",
    "BudgetExceeded",
    "RemoteTraceback",
]


class VMExecError(Exception):
    """Root of every error vmexec raises on its own account."""


class ConfigError(VMExecError, ValueError):
    """An argument or environment variable is wrong; raised before anything is started."""


class ProviderNotAvailable(ConfigError):
    """The provider name is unknown, or its optional dependencies are not installed."""


class BrokenFleet(VMExecError, BrokenProcessPool):
    """No machine can run work any more: every pending future fails with this error.

    A ``concurrent.futures.process.BrokenProcessPool``, and terminal like it: the executor
    refuses new work. ``__cause__`` carries what broke it (a failing initializer, every
    machine lost, a launch that could not be recovered).
    """


class WorkerLost(VMExecError, BrokenProcessPool):
    """A task's worker process died (crash, signal, OOM kill) more times than ``max_retries``.

    A ``BrokenProcessPool``, as ``ProcessPoolExecutor`` reports a worker that died, but only
    this task's future fails: the other tasks and the executor go on.
    """


class DeserializationError(VMExecError, BrokenProcessPool):
    """A task could not be unpickled on its machine, or its result on the client.

    ``ProcessPoolExecutor`` breaks the whole pool in these cases (``BrokenProcessPool``);
    vmexec fails only this task's future. Anything unpickling raises counts, including
    ``SystemExit`` and ``KeyboardInterrupt``: they never escape into the worker's loop or
    the client's threads. ``__cause__`` holds the original exception (on the client) or
    the machine's traceback, which includes it.
    """


class ProtocolError(VMExecError):
    """A peer sent bytes that are not a well-formed vmexec frame or message."""


class VersionMismatch(ProtocolError):
    """The handshake was refused: the two ends cannot exchange pickled code safely."""


class TransportError(VMExecError, OSError):
    """The byte stream to a machine could not be opened or broke."""


class HostKeyError(TransportError):
    """An SSH host key is unknown (and not accepted) or differs from the pinned one."""


class CapacityError(VMExecError):
    """No candidate (type, zone, region, purchase option) had capacity after every fallback."""


class QuotaError(VMExecError):
    """A cloud account quota stops the launch; the message names the quota and how to raise it."""


class EnvSyncError(VMExecError):
    """The local Python environment cannot be reproduced on a target platform."""


class BudgetExceeded(VMExecError):
    """A cost limit (``max_hourly_cost`` or ``budget``) refuses a launch or stopped the fleet."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised on a machine.

    Chained as ``__cause__`` of the re-raised user exception, so the default traceback
    display shows the remote frames, as ``ProcessPoolExecutor`` does.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
