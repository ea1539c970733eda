"""vmexec: a ``concurrent.futures.Executor`` whose workers are a fleet of machines.

    from vmexec import VMExecutor

    with VMExecutor(max_workers=8, provider="local") as ex:
        print(list(ex.map(pow, range(10), range(10))))
"""

from typing import TYPE_CHECKING, Any

from vmexec._version import __version__

# Public names are imported on first use (PEP 562): ``python -m vmexec.agent`` imports
# this package on every machine, and must not pay for the executor, scheduler,
# environment and guardrails it never uses (tests/test_layers.py checks what it imports).
_LAZY = {
    "VMExecutor": "vmexec.executor",
    "compare": "vmexec.compare",
    "Comparison": "vmexec.compare",
}

if TYPE_CHECKING:
    from vmexec.compare import Comparison, compare
    from vmexec.errors import (
        BrokenFleet,
        BudgetExceeded,
        CapacityError,
        ConfigError,
        EnvSyncError,
        HostKeyError,
        ProtocolError,
        ProviderNotAvailable,
        QuotaError,
        RemoteTraceback,
        TransportError,
        VersionMismatch,
        VMExecError,
        WorkerLost,
    )
    from vmexec.executor import VMExecutor


def __getattr__(name: str) -> Any:
    # Every other public name is an exception class of vmexec.errors.
    module = _LAZY.get(name) or ("vmexec.errors" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module 'vmexec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    # The lazy names too (PEP 562): dir() and tab completion show the whole API.
    return sorted(set(globals()) | set(_LAZY) | set(__all__))


__all__ = [
    "__version__",
    "VMExecutor",
    "compare",
    "Comparison",
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
