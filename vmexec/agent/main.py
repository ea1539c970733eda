"""The agent: one per machine, between the client's stream and the worker processes.

Run as ``python -m vmexec.agent``. It owns the real stdin/stdout for frames; its own
fd 1 is pointed at stderr so that nothing printed by accident can corrupt the stream.

Data flow (one thread, one poll loop, no locks)::

    client ──stdin──▶ [FUNC/TASK/PING] ──▶ queue ──▶ idle worker (task pipe)
    client ◀─stdout── [RESULT/LOST/LOG]◀── outbox ◀── worker (result pipe, stdout/stderr)

* Workers are started lazily, up to ``slots``, when queued tasks outnumber free
  capacity (as ProcessPoolExecutor does since 3.9), and replaced when they die.
* A worker that dies loses the task it was running: the agent reports it (LOST) and
  the client decides whether to retry (``vmexec.agent.processes``).
* The watchdog ends the agent, and on cloud machines powers the machine off, when
  nothing has come from the client for ``watchdog_timeout`` seconds; the dead-man
  file and interruption notices live with it (``vmexec.agent.watchdog``). Writes to the
  client never block (``vmexec.agent.stream``): a client that stopped reading must not
  freeze the loop, or the watchdog would never run (issue 12).

This module owns the handshake, the poll loop, and the relay: client messages to the
queue, queued tasks to workers, worker results to the client. The rest of ``Agent``
comes from one module per job:

    stream.py     ClientStream: non-blocking writes to the client, the poller
    processes.py  WorkerProcesses: spawn, reap, output forwarding and its limit
    watchdog.py   Watchdog: the client's silence, the dead-man file, notices, power-off
    worker.py     the code inside each worker process

Imports only the standard library, cloudpickle (via the worker), psutil (optional) and
vmexec's protocol.
"""

from __future__ import annotations

import collections
import errno
import os
import sys
import time
from typing import Any, Deque, Optional

from vmexec import protocol
from vmexec.agent.processes import Worker, WorkerProcesses
from vmexec.agent.stream import CLIENT_BUF_HIGH, ClientStream, Poller
from vmexec.agent.watchdog import (HEARD_FILE_ENV, Watchdog, default_poweroff_command,
                                   power_off)
from vmexec.protocol import (READ_SIZE, Broken, FrameReader, Func, Heartbeat, Msg, Pong,
                             Refused, Released, Result, Task, decode, encode_frame)

__all__ = ["Agent", "main", "PYTHON_VERSION", "HEARD_FILE_ENV", "default_poweroff_command"]

#: Overridable in tests that need an agent which claims another Python version.
PYTHON_VERSION = tuple(sys.version_info[:3])


class Agent(ClientStream, WorkerProcesses, Watchdog):
    """The agent's state and loop. ``run()`` returns the process exit code."""

    def __init__(self, stdin_fd: int, stdout_fd: int) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.poller = Poller()
        self.reader = FrameReader()
        self.outbox: list[Any] = []
        self.queue: Deque[Task] = collections.deque()
        # digest -> the FUNC message, handed on as it is to each worker that needs it.
        self.funcs: dict[bytes, Func] = {}
        self.workers: dict[int, Worker] = {}  # keyed by result fd
        self.slots = 1
        self.initializer: Optional[bytes] = None
        self.max_tasks: Optional[int] = None
        self.log_level = 30
        self.heartbeat_interval = 5.0
        self.watchdog_timeout = 120.0
        self.poweroff: Optional[list[str]] = None
        self.broken = False
        self.stopping = False
        self.last_heard = time.monotonic()
        self.last_sent = time.monotonic()
        self._pending_tasks: dict[int, Task] = {}
        self._early_frames: list[bytes] = []
        self.output_limit = 1_000_000
        self._out_tokens = float(self.output_limit)
        self._out_refill = time.monotonic()
        self._dropped = [0, 0]
        self._dropped_reported = 0.0
        self.notice_file: Optional[str] = None
        self._notice_sent = False
        self._notice_next_check = 0.0
        self._client_buf = bytearray()
        self._client_nonblocking = False
        self._paused = False
        self.heard_file: Optional[str] = os.environ.get(HEARD_FILE_ENV) or None
        self._heard_touched = float("-inf")

    # -- handshake -----------------------------------------------------------------
    def handshake(self) -> bool:
        info = protocol.local_info()
        info["python"] = PYTHON_VERSION
        self._write_client(protocol.MAGIC + protocol.encode_handshake(info))
        try:
            hello = protocol.decode_handshake(self._read_handshake())
        except EOFError:
            return False
        except protocol.ProtocolError as exc:
            self._write_client(encode_frame([Refused(Msg.REFUSED, str(exc))]))
            return False
        self._heard_from_client(time.monotonic())
        mine = dict(info)
        try:
            protocol.check_compatible(mine, hello, where="the client")
        except protocol.VersionMismatch as exc:
            self._write_client(encode_frame([Refused(Msg.REFUSED, str(exc))]))
            return False
        self.slots = max(1, int(hello["slots"]))
        self.initializer = hello.get("initializer")
        self.max_tasks = hello.get("max_tasks_per_child")
        self.log_level = int(hello.get("log_level", 30))
        self.heartbeat_interval = float(hello.get("heartbeat_interval", 5.0))
        self.watchdog_timeout = float(hello.get("watchdog_timeout", 120.0))
        # None, or the argv that powers the machine off (the client decides: only cloud
        # machines, which terminate on OS shutdown, are ever told to).
        poweroff = hello.get("poweroff")
        self.poweroff = default_poweroff_command() if poweroff is True else (
            list(poweroff) if poweroff else None)
        self.output_limit = int(hello.get("output_limit", self.output_limit))
        self.notice_file = hello.get("notice_file")
        # The user's env=/forward_env= variables: set before any worker is forked, so
        # every task sees them (they came over this connection, never via user-data).
        os.environ.update({str(k): str(v) for k, v in (hello.get("env") or {}).items()})
        self._out_tokens = float(self.output_limit)
        self._note_silence_bound()
        return True

    # -- dispatch -------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self.broken or self.stopping or self._paused or not self.queue:
            return
        live = [w for w in self.workers.values() if w.alive]
        if self.queue:
            free = sum(max(0, w.capacity()) for w in live)
            idle = sum(1 for w in live if not w.outstanding)
            # Start a worker when tasks wait and no worker is idle, like
            # ProcessPoolExecutor's on-demand spawning: three tasks never start 64.
            want = min(self.slots - len(live), len(self.queue) - idle) if free < len(self.queue) else 0
            for _ in range(max(0, want)):
                self._spawn_worker()
            live = [w for w in self.workers.values() if w.alive]
        # Idle workers first, then round-robin, so tasks spread across processes.
        live.sort(key=lambda w: len(w.outstanding))
        progress = True
        while self.queue and progress:
            progress = False
            for worker in live:
                if not self.queue:
                    break
                if worker.capacity() <= 0:
                    continue
                # The client's TASK message goes on to the worker as it came.
                task = self.queue.popleft()
                digest = task.digest
                messages: list[Any] = []
                if digest not in worker.digests:
                    func = self.funcs.get(digest)
                    if func is None:  # the client always sends FUNC first
                        self.outbox.append(Result(Msg.RESULT, task.task_id, False,
                                                  _missing_function(), 0.0))
                        progress = True
                        continue
                    messages.append(func)
                    worker.digests.add(digest)
                messages.append(task)
                worker.outstanding.append(task.task_id)
                self._pending_tasks[task.task_id] = task
                worker.write_buf += encode_frame(messages)
                progress = True
        for worker in live:
            self._flush_worker(worker)

    def _flush_worker(self, worker: Worker) -> None:
        if not worker.write_buf:
            return
        try:
            written = os.write(worker.task_w, worker.write_buf)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF):
                return  # the result pipe's EOF will report the death
            raise
        del worker.write_buf[:written]
        # Wait for the pipe to drain only while something is left to write.
        registered = worker.task_w in self.poller.handlers
        if worker.write_buf and not registered:
            self.poller.register(worker.task_w, True, ("task", worker))
        elif not worker.write_buf and registered:
            self.poller.unregister(worker.task_w)

    # -- messages from the client ---------------------------------------------------
    def _on_client_data(self) -> bool:
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except InterruptedError:
            return True
        if not data:
            return False
        self._heard_from_client(time.monotonic())
        self._on_client_frames(self.reader.feed(data))
        return True

    def _on_client_frames(self, frames: list[bytes]) -> None:
        for payload in frames:
            for message in decode(payload):
                kind = message.kind
                if kind == Msg.TASK:
                    self.queue.append(message)
                elif kind == Msg.FUNC:
                    self.funcs[message.digest] = message
                elif kind == Msg.FORGET:
                    # The client only forgets callables no queued task uses.
                    digest = message.digest
                    self.funcs.pop(digest, None)
                    for worker in self.workers.values():
                        if worker.alive and digest in worker.digests:
                            worker.digests.discard(digest)
                            worker.write_buf += encode_frame([message])
                            self._flush_worker(worker)
                elif kind == Msg.PING:
                    self.outbox.append(Pong(Msg.PONG, message.sent_at))
                elif kind == Msg.SHUTDOWN:
                    self.stopping = True
                elif kind == Msg.RELEASE:
                    released = [task.task_id for task in self.queue]
                    self.queue.clear()
                    self.outbox.append(Released(Msg.RELEASED, released))

    # -- results from workers -------------------------------------------------------
    def _on_worker_result(self, worker: Worker) -> None:
        try:
            data = os.read(worker.result_r, READ_SIZE)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if not data:
            self._worker_gone(worker)
            return
        for payload in worker.reader.feed(data):
            for message in decode(payload):
                kind = message.kind
                if kind == Msg.RESULT:
                    task_id = message.task_id
                    if worker.outstanding and worker.outstanding[0] == task_id:
                        worker.outstanding.popleft()
                    else:  # defensive: results always come back in order
                        try:
                            worker.outstanding.remove(task_id)
                        except ValueError:
                            pass
                    self._pending_tasks.pop(task_id, None)
                    if worker.remaining is not None:
                        worker.remaining -= 1
                    if worker.measured:
                        worker.avg_seconds = 0.8 * worker.avg_seconds + 0.2 * message.seconds
                    else:
                        worker.avg_seconds, worker.measured = message.seconds, True
                    self.outbox.append(message)  # on to the client as it came
                elif kind == Msg.INIT_FAILED:
                    self.broken = True
                    self.outbox.append(Broken(Msg.BROKEN, "the initializer raised an exception",
                                              message.traceback))
                else:  # LOG
                    self._forward_output(message)

    # -- main loop ------------------------------------------------------------------
    def run(self) -> int:
        if not self.handshake():
            return 2
        self._on_client_frames(self._early_frames)  # sent right behind the handshake
        # Tasks that came with the handshake must start now, not after the first
        # poll() times out (up to heartbeat_interval later).
        self._dispatch()
        os.set_blocking(self.stdin_fd, False)
        # From here on a write to the client never blocks (see _flush_client).
        os.set_blocking(self.stdout_fd, False)
        self._client_nonblocking = True
        self.poller.register(self.stdin_fd, False, ("client", None))
        exit_code = 0
        try:
            while True:
                now = time.monotonic()
                # While bytes wait for the client no heartbeat is due: only the stream
                # becoming writable, a worker, or the watchdog can wake the loop.
                due = self.last_heard + self.watchdog_timeout
                if not self._client_buf:
                    due = min(due, self.last_sent + self.heartbeat_interval)
                timeout = max(0.0, due - now)
                for fd in self.poller.poll(timeout):
                    what, worker = self.poller.handlers.get(fd, ("", None))
                    if what == "client":
                        if not self._on_client_data():
                            self.stopping = True
                    elif what == "client-out":
                        try:
                            self._flush_client()
                        except BrokenPipeError:
                            self.stopping = True
                    elif worker is None:
                        continue  # unregistered while this batch of events was read
                    elif what == "result":
                        if worker.alive:
                            self._on_worker_result(worker)
                    elif what == "task":
                        self._flush_worker(worker)
                    elif worker.alive:
                        if not self._drain_output(worker, what, fd):
                            self.poller.unregister(fd)
                if self.stopping:
                    break
                self._dispatch()
                now = time.monotonic()
                if self._client_gone_silent(now):
                    exit_code = 4
                    break
                self._report_dropped_output(now)
                self._check_notice(now)
                # No heartbeat while earlier bytes wait: the client is not reading.
                if not self.outbox and not self._client_buf and \
                        now - self.last_sent >= self.heartbeat_interval:
                    self.outbox.append(Heartbeat(Msg.HEARTBEAT))
                try:
                    self._flush_outbox()
                except BrokenPipeError:
                    break
                if not self._paused and len(self._client_buf) > CLIENT_BUF_HIGH:
                    self._pause_workers()
        finally:
            self._stop_workers()
            try:
                self._flush_outbox()
                # A client that went silent is not waited for; one that asked us to
                # stop gets a few seconds to read the last results.
                self._drain_client(0.0 if exit_code == 4 else 5.0)
            except OSError:
                pass
        if exit_code == 4 and self.poweroff:
            power_off(self.poweroff)
        return exit_code


def _missing_function() -> bytes:
    import pickle

    error = RuntimeError("vmexec agent: task references a function the client never sent "
                         "(protocol error; please report it)")
    return pickle.dumps((error, ""))


def main() -> None:
    # Keep the real stdout for frames; anything else printing to fd 1 lands on stderr.
    frames_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    agent = Agent(stdin_fd=0, stdout_fd=frames_fd)
    code = agent.run()
    sys.exit(code)
