"""The interface every transport implements: a bidirectional byte stream to one agent.

A transport knows nothing of frames, tasks or clouds: the scheduler wraps it in a
``protocol.FrameReader`` and writes whole frames. Implementations translate their own
library's errors (OSError, paramiko.SSHException, ...) into ``TransportError`` here, in
one place each, so the scheduler sees one error type.

Must not import: providers, scheduler, executor.
"""

from __future__ import annotations

import abc
import threading
from typing import Callable, Optional

from vmexec.protocol import READ_SIZE


class Transport(abc.ABC):
    """A blocking byte stream to an agent process.

    Threading contract: one thread reads, any number of threads write (writes are
    serialised by the caller), and ``close`` may be called from any thread at any time
    and must unblock a pending ``read``.
    """

    #: Human-readable name of the machine end, used in logs and error messages.
    label: str = "?"
    #: True when ``start``'s callbacks run on a thread shared by many transports (the
    #: I/O loop of ``transports.aio``): they must then return at once, never block.
    #: False: they run on this transport's own reader thread and may block.
    shared_thread: bool = False
    _reader: Optional[threading.Thread] = None

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Send all of ``data``; raises ``TransportError`` when the stream is broken."""

    @abc.abstractmethod
    def read(self, max_bytes: int) -> bytes:
        """Return up to ``max_bytes`` bytes, blocking until some arrive; ``b""`` at EOF."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the stream (idempotent). The agent sees EOF and exits."""

    def start(self, on_data: Callable[[bytes], None], on_closed: Callable[[str], None]) -> None:
        """Push incoming bytes to ``on_data``; call ``on_closed(reason)`` once at the end.

        The default reads on a thread of this transport's own (a blocking stream has no
        other way to wait); event-driven transports override it and deliver on their
        loop (``shared_thread``). After ``start`` nobody else may call ``read``.
        """

        def pump() -> None:
            reason = "the agent closed the connection"
            try:
                while True:
                    data = self.read(READ_SIZE)
                    if not data:
                        break
                    on_data(data)
            except Exception as exc:  # any failure of this stream ends this stream only
                reason = f"reading from it failed: {exc!r}"
            on_closed(reason)

        self._reader = threading.Thread(target=pump, name=f"vmexec-reader {self.label}",
                                        daemon=True)
        self._reader.start()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the stream has ended and ``on_closed`` has run (after ``close``)."""
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout)

    def diagnostics(self) -> str:
        """Anything the far end said outside the stream (stderr tail), for error messages."""
        return ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"
