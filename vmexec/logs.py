"""Re-emitting what workers print and log, on the client, through ``logging``.

Worker stdout, stderr and log records arrive as LOG messages and are re-emitted on the
``vmexec.worker`` logger, prefixed with the machine, at the record's own level (stdout
at INFO, stderr at WARNING). ``print()`` in a task should be visible even to a user who
never configured logging, as it would be with ProcessPoolExecutor; so while the
application has configured no handler at all, a fallback handler writes these lines to
stderr. As soon as the application configures logging, its handlers take over.
"""

from __future__ import annotations

import logging
import sys

worker_logger = logging.getLogger("vmexec.worker")


class _UnconfiguredFallback(logging.Handler):
    """Writes records to stderr only while no other handler would receive them."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if _configured(self._logger):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except (OSError, ValueError):  # closed stderr at interpreter exit
            pass


def _configured(logger: "logging.Logger | None") -> bool:
    while logger is not None:
        if any(not isinstance(h, (_UnconfiguredFallback, logging.NullHandler))
               for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent  # type: ignore[assignment]
    return False


def _install_fallback(name: str, level: int) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.addHandler(_UnconfiguredFallback(logger))
    if logger.level == logging.NOTSET:
        logger.setLevel(level)  # so INFO records are created while nothing is configured
    return logger


# Worker output, and the cost lines (the plan's price, the receipt), are for the user's
# eyes: visible even in a script that never configured logging.
_install_fallback("vmexec.worker", logging.NOTSET)
_install_fallback("vmexec.cost", logging.INFO)
logging.getLogger("vmexec").addHandler(logging.NullHandler())


def emit_remote(machine: str, pid: int, stream: str, level: int, name: str, text: str) -> None:
    """Re-emit one forwarded output chunk or log record from ``machine``."""
    if not worker_logger.isEnabledFor(level) and _configured(worker_logger):
        return
    prefix = f"[{machine} pid {pid}]"
    if stream == "log":
        message = f"{prefix} {name}: {text}"
    else:
        message = "\n".join(f"{prefix} {line}" for line in text.split("\n"))
    record = worker_logger.makeRecord(
        worker_logger.name, level, "(remote)", 0, message, (), None,
        extra={"machine": machine, "worker_pid": pid, "stream": stream, "remote_logger": name})
    worker_logger.handle(record)
