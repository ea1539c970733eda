"""The interface every transport implements: a bidirectional byte stream to one agent.

A transport knows nothing of frames, tasks or clouds: the scheduler wraps it in a
``protocol.FrameReader`` and writes whole frames. Implementations translate their own
library's errors (OSError, paramiko.SSHException, ...) into ``TransportError`` here, in
one place each, so the scheduler sees one error type.

Must not import: providers, scheduler, executor.
"""

from __future__ import annotations

import abc


class Transport(abc.ABC):
    """A blocking byte stream to an agent process.

    Threading contract: one thread reads, any number of threads write (writes are
    serialised by the caller), and ``close`` may be called from any thread at any time
    and must unblock a pending ``read``.
    """

    #: Human-readable name of the machine end, used in logs and error messages.
    label: str = "?"

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Send all of ``data``; raises ``TransportError`` when the stream is broken."""

    @abc.abstractmethod
    def read(self, max_bytes: int) -> bytes:
        """Return up to ``max_bytes`` bytes, blocking until some arrive; ``b""`` at EOF."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the stream (idempotent). The agent sees EOF and exits."""

    def diagnostics(self) -> str:
        """Anything the far end said outside the stream (stderr tail), for error messages."""
        return ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"
