"""A loopback TCP forwarder that can drop every connection on demand.

Owns: listening on a free port of 127.0.0.1, forwarding each accepted connection to a
target address, and ``cut()``, which kills every live connection at once, on both sides,
to simulate a network failure mid-task.

Threads: one accept thread, and two pump threads per connection (one per direction)
doing blocking ``recv``/``sendall``. ``cut`` wakes them with ``shutdown`` and lets the
pump threads themselves close the sockets, so no socket is closed while another thread
is still inside a system call on it (the fd could be reused under it).

Must not import: paramiko or anything of vmexec's core (standard library only).
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from types import TracebackType
from typing import Optional

__all__ = ["TCPProxy"]

log = logging.getLogger(__name__)

# SO_LINGER on, timeout 0: close() sends RST at once instead of an orderly FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)

#: Bytes moved per recv; bounded so a fast sender cannot make a pump hold much memory.
CHUNK = 65536


class _Pair:
    """One forwarded connection: the accepted client socket and the upstream socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.cut = False
        self.pumps_left = 2
        self.done = threading.Event()


class TCPProxy:
    """Forward connections from ``127.0.0.1:<port>`` to ``target_host:target_port``.

    Args:
        target_host: where to forward to.
        target_port: its port.
        connect_timeout: seconds to reach the target for each new connection.

    Attributes:
        host, port: where clients connect.

    Thread-safe: ``cut`` and ``close`` may be called from any thread, any number of
    times.
    """

    def __init__(
        self, target_host: str, target_port: int, *, connect_timeout: float = 10.0
    ) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self.host = "127.0.0.1"
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._closed = False
        self.accepted = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        # The accept thread waits on the listener and this pipe: writing to the pipe is
        # the reliable way to wake it (closing a socket another thread blocks on is not).
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"TCPProxy:{self.port}", daemon=True
        )
        self._accept_thread.start()

    @property
    def connections(self) -> int:
        """How many forwarded connections are live now."""
        with self._lock:
            return len(self._pairs)

    def cut(self, timeout: float = 5.0) -> int:
        """Drop every live connection abruptly, on both sides.

        Each end sees its connection end at once: a pending ``recv`` returns EOF and the
        next use of the socket gets a reset (the sockets are closed with a zero linger).
        Nothing more is forwarded.

        New connections are still accepted afterwards (like a network that comes back).

        Args:
            timeout: seconds to wait for the pump threads to finish closing.

        Returns:
            How many connections were cut.
        """
        with self._lock:
            pairs = list(self._pairs)
            for pair in pairs:
                pair.cut = True
                for sock in (pair.client, pair.upstream):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                        # Wakes both pump threads out of recv/sendall; they close the
                        # sockets, and the zero linger turns that close into a reset.
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # already gone: the pump is closing it
        for pair in pairs:
            pair.done.wait(timeout)
        if pairs:
            log.debug("TCPProxy :%d cut %d connection(s)", self.port, len(pairs))
        return len(pairs)

    def close(self) -> None:
        """Stop listening and cut every connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._accept_thread.join(5.0)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self.cut()

    def __enter__(self) -> TCPProxy:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TCPProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}>"

    # --- threads -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = sel.select()
                if any(key.fileobj is self._wake_r for key, _ in events):
                    return
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue
                self._start_pair(client)

    def _start_pair(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError as exc:
            log.debug("TCPProxy :%d cannot reach %s: %s", self.port, self.target, exc)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream)
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._pairs.add(pair)
            self.accepted += 1
        for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
            threading.Thread(
                target=self._pump, args=(pair, src, dst),
                name=f"TCPProxy:{self.port} {name}", daemon=True,
            ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
            if not pair.cut:
                # Orderly EOF from one side: pass it on, keep the other direction open.
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            # A reset on one side: reset the other too, as a dying network would.
            with self._lock:
                pair.cut = True
            for sock in (src, dst):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self._lock:
            pair.pumps_left -= 1
            last = pair.pumps_left == 0
            if last:
                self._pairs.discard(pair)
        if last:
            pair.client.close()
            pair.upstream.close()
            pair.done.set()
