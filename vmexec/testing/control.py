"""The control socket of a local cloud: how the shims inside fake VMs, and clients in
other processes, talk to it.

Owns ``ControlServer`` (a Unix socket, a thread per request, JSON lines) and its client
side, ``control_request`` (the shim script in ``vmexec/testing/scripts`` speaks the same
protocol with the standard library only).

Must not import: boto3, moto, paramiko, or vmexec's core (standard library only).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from typing import Any, Callable

from vmexec.testing.vmhost import FakeVMError

__all__ = ["ControlServer", "control_request"]

log = logging.getLogger(__name__)


class _ControlSocketServer(socketserver.ThreadingUnixStreamServer):
    # socketserver's default backlog is 5. Every machine of a fleet whose client was
    # killed powers off within the same dead-man interval; on Linux a connect to a full
    # backlog fails at once (EAGAIN) for a socket with a timeout, and a dead-man that
    # cannot ask never asks again. The kernel caps this at net.core.somaxconn.
    request_queue_size = 1024


class ControlServer:
    """The Unix socket the shims inside fake VMs send their requests to.

    A ``socketserver`` with a thread per request: an sshd restart waits for the banner,
    and twenty machines booting at once must not queue behind one another. Requests
    come only from the machines of one cloud, a handful per machine.

    Args:
        path: where to listen (a short path: Unix socket paths are limited to 107 bytes).
        handler: ``handler(marker, root, command, args) -> message``; raises
            ``FakeVMError`` to refuse.
    """

    def __init__(self, path: str,
                 handler: Callable[[str, str, str, list[str]], str]) -> None:
        self.path = path
        serve = self._serve

        class Request(socketserver.StreamRequestHandler):
            timeout = 10  # a shim that connects and says nothing must not hold a thread

            def handle(self) -> None:
                serve(self.rfile, self.wfile, handler)

        self._server = _ControlSocketServer(path, Request)
        # close() waits for the requests in flight (each bounded by its own timeouts).
        self._server.daemon_threads = False
        self._server.block_on_close = True
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fakevm-ctl", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, finish the requests in flight, remove the socket (idempotent)."""
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # removed already

    @staticmethod
    def _serve(rfile: Any, wfile: Any,
               handler: Callable[[str, str, str, list[str]], str]) -> None:
        try:
            request = json.loads(rfile.readline(65536))
            reply = {"message": handler(str(request.get("vm", "")),
                                        str(request.get("root", "")),
                                        str(request.get("cmd", "")),
                                        [str(a) for a in request.get("args", [])])}
        except FakeVMError as exc:
            reply = {"error": str(exc)}
        except (OSError, ValueError) as exc:
            reply = {"error": f"bad request: {exc}"}
        try:
            wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError as exc:
            log.debug("control reply lost: %s", exc)


def control_request(path: str, command: str, *args: str, marker: str = "", root: str = "",
                    timeout: float = 60.0) -> str:
    """Send one request to the ``ControlServer`` at ``path`` (what a shim does).

    Args:
        path: the server's socket.
        command, args: the request.
        marker, root: the machine asking (empty for a client outside every machine).
        timeout: seconds for the whole exchange.

    Returns:
        The server's message.

    Raises:
        FakeVMError: the server refused the request (with its reason) or did not answer.
    """
    request = {"vm": marker, "root": root, "cmd": command, "args": list(args)}
    deadline = time.monotonic() + timeout
    try:
        with _connect_unix(path, deadline) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as answer:
                reply = json.loads(answer.readline(65536) or b"{}")
    except (OSError, ValueError) as exc:
        raise FakeVMError(f"{command}: the local cloud at {path} did not answer: {exc}"
                          ) from None
    if reply.get("error"):
        raise FakeVMError(f"{command}: {reply['error']}")
    return str(reply.get("message", ""))


def _connect_unix(path: str, deadline: float) -> socket.socket:
    """Connect to a Unix socket by ``deadline``, waiting while its backlog is full (a
    socket with a timeout is refused at once with EAGAIN then, not made to wait)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # a short pause: the server accepts in its own thread
            continue
        except BaseException:
            sock.close()
            raise
        return sock

