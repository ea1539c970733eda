"""A transport over the pipes of a local ``python -m vmexec.agent`` subprocess.

Used by the ``local`` provider: the same protocol and agent as on a VM, with the
network replaced by pipes. Must not import providers, scheduler or executor.
"""

from __future__ import annotations

import collections
import os
import subprocess
import threading
from typing import Deque, Optional, Sequence

from vmexec.errors import TransportError
from vmexec.transports.base import Transport

_STDERR_TAIL_LINES = 50


class LocalTransport(Transport):
    """Owns one agent subprocess; reading and writing its stdout/stdin."""

    def __init__(self, command: Sequence[str], *, label: str, env: Optional[dict[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        self.label = label
        try:
            self._process = subprocess.Popen(
                list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, bufsize=0, env=env, cwd=cwd,
                # Its own process group: a Ctrl-C in the user's terminal reaches the
                # client, which then shuts the agent down in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise TransportError(
                f"{label}: cannot start the agent {list(command)!r}: {exc}. Check the "
                "python= option points at an interpreter with vmexec installed"
            ) from exc
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin_fd = self._process.stdin.fileno()
        self._stdout_fd = self._process.stdout.fileno()
        self._closed = False
        self._stderr_tail: Deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_thread = threading.Thread(
            target=self._collect_stderr, name=f"vmexec-stderr-{label}", daemon=True)
        self._stderr_thread.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _collect_stderr(self) -> None:
        stream = self._process.stderr
        assert stream is not None
        for line in iter(stream.readline, b""):
            self._stderr_tail.append(line.decode("utf-8", "replace").rstrip())

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._stdin_fd, view):]
        except (OSError, ValueError) as exc:
            raise TransportError(f"{self.label}: the agent's stdin is closed ({exc})") from exc

    def read(self, max_bytes: int) -> bytes:
        try:
            return os.read(self._stdout_fd, max_bytes)
        except (OSError, ValueError):
            return b""  # closed under us by close(): same as EOF

    def diagnostics(self) -> str:
        code = self._process.poll()
        status = f"agent exit code {code}" if code is not None else "agent still running"
        tail = "\n".join(self._stderr_tail)
        return f"{status}; its stderr ends with:\n{tail}" if tail else status

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in (self._process.stdin,):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        try:
            self._process.stdout.close()  # type: ignore[union-attr]
        except OSError:
            pass

    def kill(self) -> None:
        """Kill the agent outright (fault injection and emergency teardown)."""
        try:
            self._process.kill()
        except ProcessLookupError:
            pass
