"""The agent's stream to the client: writes that never block, and the poller.

Owns the agent's end of the client connection's output. Frames go out at once when the
stream takes them; what it does not take waits in a buffer until poll says the stream
is writable again, so a client that stopped reading (suspended laptop, SIGSTOP, a full
SSH window) cannot freeze the loop, or the watchdog would never run (issue 12). Above
``CLIENT_BUF_HIGH`` buffered bytes the agent stops reading its workers (they block on
their own pipes) and resumes below ``_CLIENT_BUF_LOW``: a suspended client's results
must not pile up in the agent's memory.

``ClientStream`` is a part of ``vmexec.agent.main.Agent`` (a mixin: the loop's hot path
pays no extra indirection); the state it uses is listed on the class and set by
``Agent.__init__``.

Imports only the standard library and vmexec.protocol/agent: runs on a bare machine.
"""

from __future__ import annotations

import os
import select
import time
from typing import TYPE_CHECKING, Any

from vmexec.protocol import READ_SIZE, FrameReader, encode_frame

if TYPE_CHECKING:
    from vmexec.agent.processes import Worker

# Bytes waiting for a client that does not read: above HIGH the agent stops reading
# its workers (they block on their own pipes, the agent's loop and watchdog run on), and
# resumes below LOW. Without it a suspended client's results would pile up in memory.
CLIENT_BUF_HIGH = 64 << 20
_CLIENT_BUF_LOW = 16 << 20


class Poller:
    """epoll where the OS has it (Linux: O(1) per event), else poll (macOS agents)."""

    def __init__(self) -> None:
        self.handlers: dict[int, tuple[str, Any]] = {}
        self._epoll = getattr(select, "epoll", None)
        if self._epoll is not None:
            self._poll: Any = select.epoll()
            self._in, self._out, self._scale = select.EPOLLIN, select.EPOLLOUT, 1.0
        else:
            self._poll = select.poll()
            self._in, self._out, self._scale = select.POLLIN, select.POLLOUT, 1000.0

    def register(self, fd: int, for_write: bool, handler: tuple[str, Any]) -> None:
        self.handlers[fd] = handler
        self._poll.register(fd, self._out if for_write else self._in)

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self._poll.unregister(fd)
            except (KeyError, ValueError, OSError):  # already closed
                pass

    def poll(self, timeout: float) -> list[int]:
        return [fd for fd, _ in self._poll.poll(timeout * self._scale)]


class ClientStream:
    """The agent's writes to the client and the handshake read (a part of ``Agent``)."""

    # Set by Agent.__init__.
    stdin_fd: int
    stdout_fd: int
    poller: Poller
    reader: FrameReader
    outbox: list[Any]
    workers: dict[int, Worker]
    last_sent: float
    _early_frames: list[bytes]
    # Bytes for the client that its stream has not taken yet (it may have stopped
    # reading): written when poll says the stream is writable, never blocking.
    _client_buf: bytearray
    _client_nonblocking: bool
    _paused: bool  # workers not read while the client buffer is full

    def _write_client(self, data: bytes) -> None:
        """Send ``data`` to the client: at once if the stream takes it, else buffered.

        Before the main loop (the handshake) the stream is blocking and this writes all
        of it; in the loop it never blocks, and ``_flush_client`` sends the rest when
        the stream is writable again.
        """
        if not self._client_nonblocking:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self.stdout_fd, view)
                except InterruptedError:
                    continue
                view = view[written:]
            self.last_sent = time.monotonic()
            return
        self._client_buf += data
        self._flush_client()

    def _flush_client(self) -> None:
        """Write what the client's stream takes now; wait for POLLOUT for the rest.

        Raises:
            BrokenPipeError: the client's end is closed.
        """
        buf = self._client_buf
        while buf:
            try:
                written = os.write(self.stdout_fd, buf)
            except (BlockingIOError, InterruptedError):
                break
            if not written:
                break
            del buf[:written]
            self.last_sent = time.monotonic()
        if self._paused and len(buf) <= _CLIENT_BUF_LOW:
            self._resume_workers()
        registered = self.stdout_fd in self.poller.handlers
        if buf and not registered:
            self.poller.register(self.stdout_fd, True, ("client-out", None))
        elif not buf and registered:
            self.poller.unregister(self.stdout_fd)

    def _pause_workers(self) -> None:
        """Stop reading workers' results and output while the client is not reading."""
        self._paused = True
        for worker in self.workers.values():
            for fd in (worker.result_r, worker.out_r, worker.err_r):
                self.poller.unregister(fd)

    def _resume_workers(self) -> None:
        self._paused = False
        for worker in self.workers.values():
            if worker.alive:
                self.poller.register(worker.result_r, False, ("result", worker))
                self.poller.register(worker.out_r, False, ("stdout", worker))
                self.poller.register(worker.err_r, False, ("stderr", worker))

    def _drain_client(self, timeout: float) -> None:
        """At the end: give the client up to ``timeout`` seconds to take what is left."""
        deadline = time.monotonic() + timeout
        while self._client_buf and time.monotonic() < deadline:
            try:
                select.select([], [self.stdout_fd], [], max(0.0, deadline - time.monotonic()))
                self._flush_client()
            except OSError:
                return

    def _flush_outbox(self) -> None:
        if self.outbox:
            frame = encode_frame(self.outbox)
            self.outbox = []
            self._write_client(frame)

    def _read_handshake(self) -> bytes:
        """Blocking read of the client's first frame; later frames stay queued."""
        while True:
            data = os.read(self.stdin_fd, READ_SIZE)
            if not data:
                raise EOFError("client closed the stream during the handshake")
            frames = self.reader.feed(data)
            if frames:
                self._early_frames = frames[1:]
                return frames[0]
