"""vmexec: a ``concurrent.futures.Executor`` whose workers are a fleet of machines.

    from vmexec import VMExecutor

    with VMExecutor(max_workers=8, provider="local") as ex:
        print(list(ex.map(pow, range(10), range(10))))
"""

from vmexec._version import __version__
from vmexec.errors import (
    BrokenFleet,
    BudgetExceeded,
    CapacityError,
    ConfigError,
    DeserializationError,
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
from vmexec.compare import Comparison, compare

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
