"""The agent: one per machine, between the client's stream and the worker processes.

Run as ``python -m vmexec.agent``. It owns the real stdin/stdout for frames; its own
fd 1 is pointed at stderr so that nothing printed by accident can corrupt the stream.

Data flow (one thread, one poll loop, no locks)::

    client ──stdin──▶ [FUNC/TASK/PING] ──▶ queue ──▶ idle worker (task pipe)
    client ◀─stdout── [RESULT/LOST/LOG]◀── outbox ◀── worker (result pipe, stdout/stderr)

* Workers are started lazily, up to ``slots``, when queued tasks outnumber free
  capacity (as ProcessPoolExecutor does since 3.9), and replaced when they die.
* A worker that dies loses the task it was running: the agent reports it (LOST, with
  the exit code or signal) and the client decides whether to retry. Tasks that were
  queued behind it in its pipe never started; they go back to the front of the queue.
* The watchdog ends the agent, and on cloud machines powers the machine off, when
  nothing has come from the client for ``watchdog_timeout`` seconds: a client that
  vanished must not leave a machine running up a bill. Writes to the client never
  block (the stream is non-blocking; what the pipe does not take waits in a buffer
  until poll says it is writable): a client that stopped reading (suspended laptop,
  SIGSTOP, a full SSH window) must not freeze the loop, or the watchdog would never
  run (issue 12).
* Liveness for the machine's dead-man switch: when ``$VMEXEC_CLIENT_HEARD`` names a
  file, the agent touches it when frames *arrive* from the client (at most once a
  second), never on its own: a running agent alone does not keep a machine on.

Imports only the standard library, cloudpickle (via the worker), psutil (optional) and
vmexec's protocol/errors.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Deque, Optional

from vmexec import protocol
from vmexec.agent.worker import run_worker
from vmexec.protocol import READ_SIZE, FrameReader, Msg, decode, encode_frame

#: Overridable in tests that need an agent which claims another Python version.
PYTHON_VERSION = tuple(sys.version_info[:3])

# When a worker's recent tasks are this short, it is handed several at once so it
# never waits for the next one; longer tasks get one at a time, so that a long task
# never holds a short one hostage while another worker idles.
_PREFETCH_BELOW_SECONDS = 0.002
_MAX_PREFETCH = 32
_OUTPUT_CHUNK = 1 << 16
# The dead-man switch looks at the heard file every few seconds: touching it more
# often than this only costs system calls on the hot path.
_HEARD_TOUCH_EVERY = 1.0
# Bytes waiting for a client that does not read: above HIGH the agent stops reading
# its workers (they block on their own pipes, the agent's loop and watchdog run on), and
# resumes below LOW. Without it a suspended client's results would pile up in memory.
_CLIENT_BUF_HIGH = 64 << 20
_CLIENT_BUF_LOW = 16 << 20
#: The environment variable naming the file touched on receipt of client frames.
HEARD_FILE_ENV = "VMEXEC_CLIENT_HEARD"


class _Worker:
    """The agent's view of one worker process."""

    __slots__ = (
        "pid", "measured", "task_w", "result_r", "out_r", "err_r", "outstanding", "digests",
        "remaining", "avg_seconds", "write_buf", "reader", "out_tail", "alive",
    )

    def __init__(self, pid: int, task_w: int,
                 result_r: int, out_r: int, err_r: int, remaining: Optional[int]) -> None:
        self.pid = pid
        self.measured = False
        self.task_w = task_w
        self.result_r = result_r
        self.out_r = out_r
        self.err_r = err_r
        self.outstanding: Deque[int] = collections.deque()
        self.digests: set[bytes] = set()
        self.remaining = remaining
        self.avg_seconds = 1.0  # pessimistic until measured: no prefetch at first
        self.write_buf = bytearray()
        self.reader = FrameReader()
        self.out_tail = {"stdout": b"", "stderr": b""}
        self.alive = True

    def capacity(self) -> int:
        limit = _MAX_PREFETCH if self.avg_seconds < _PREFETCH_BELOW_SECONDS else 1
        if self.remaining is not None:
            limit = min(limit, self.remaining)
        return limit - len(self.outstanding)


class _Poller:
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


class Agent:
    """The agent's state and loop. ``run()`` returns the process exit code."""

    def __init__(self, stdin_fd: int, stdout_fd: int) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.poller = _Poller()
        self.reader = FrameReader()
        self.outbox: list[Any] = []
        self.queue: Deque[tuple[int, bytes, bytes, bool]] = collections.deque()
        self.funcs: dict[bytes, bytes] = {}
        self.workers: dict[int, _Worker] = {}  # keyed by result fd
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
        # task id -> task, for every task handed to a worker and not yet answered, so
        # that tasks stuck behind a dead worker's running task can be re-queued.
        self._pending_tasks: dict[int, tuple[int, bytes, bytes, bool]] = {}
        self._early_frames: list[bytes] = []
        self.output_limit = 1_000_000
        self._out_tokens = float(self.output_limit)
        self._out_refill = time.monotonic()
        self._dropped = [0, 0]  # lines, bytes not forwarded since the last report
        self._dropped_reported = 0.0
        self.notice_file: Optional[str] = None
        self._notice_sent = False
        self._notice_next_check = 0.0
        # Bytes for the client that its stream has not taken yet (it may have stopped
        # reading): written when poll says the stream is writable, never blocking.
        self._client_buf = bytearray()
        self._client_nonblocking = False
        self._paused = False  # workers not read while the client buffer is full
        self.heard_file: Optional[str] = os.environ.get(HEARD_FILE_ENV) or None
        self._heard_touched = float("-inf")

    # -- stream to the client ------------------------------------------------------
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

    def _heard_from_client(self, now: float) -> None:
        self.last_heard = now
        if self.heard_file is not None and now - self._heard_touched >= _HEARD_TOUCH_EVERY:
            self._heard_touched = now
            try:
                os.utime(self.heard_file)
            except FileNotFoundError:
                try:
                    os.close(os.open(self.heard_file, os.O_WRONLY | os.O_CREAT, 0o644))
                except OSError:
                    pass
            except OSError:  # the switch then powers off on its own grace: say why
                sys.stderr.write(f"vmexec agent: cannot touch {self.heard_file}\n")
                self.heard_file = None

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
            self._write_client(encode_frame([(Msg.REFUSED, str(exc))]))
            return False
        self._heard_from_client(time.monotonic())
        mine = dict(info)
        try:
            protocol.check_compatible(mine, hello, where="the client")
        except protocol.VersionMismatch as exc:
            self._write_client(encode_frame([(Msg.REFUSED, str(exc))]))
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

    def _note_silence_bound(self) -> None:
        """Tell the dead-man switch how long this client may stay silent while the agent
        runs: an idle client pings only every so often (a fraction of watchdog_timeout),
        and a short keepalive must not power the machine off under it."""
        if self.heard_file is None:
            return
        path = os.path.join(os.path.dirname(self.heard_file), "silence")
        try:
            with open(path + ".tmp", "w", encoding="ascii") as f:
                f.write(f"{int(self.watchdog_timeout / 2) + 1}\n")
            os.replace(path + ".tmp", path)
        except OSError:
            pass

    # -- workers -------------------------------------------------------------------
    def _spawn_worker(self) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # fork, not spawn: the agent is single-threaded (so forking is safe) and has
        # already imported everything a worker needs, so a replacement worker starts in
        # about a millisecond instead of a fresh interpreter's ~100 ms. Agents run on
        # POSIX machines only.
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                keep = {task_r, result_w, 0, 1, 2}
                for fd in [devnull, task_w, result_r, out_r, err_r, out_w, err_w,
                           self.stdout_fd, self.stdin_fd, *self._all_fds()]:
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _limit_native_threads(self.slots)
                # The agent pointed sys.stdout at stderr; the worker's print() must go
                # to its own stdout pipe.
                sys.stdout = sys.__stdout__ = os.fdopen(1, "w", buffering=1)  # type: ignore[misc]
                sys.stderr = sys.__stderr__ = os.fdopen(2, "w", buffering=1)  # type: ignore[misc]
                code = run_worker(task_r, result_w, self.initializer, self.max_tasks,
                                  self.log_level)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        for fd in (task_r, result_w, out_w, err_w):
            os.close(fd)
        os.set_blocking(task_w, False)
        worker = _Worker(pid, task_w, result_r, out_r, err_r, self.max_tasks)
        self.workers[result_r] = worker
        self.poller.register(result_r, False, ("result", worker))
        self.poller.register(out_r, False, ("stdout", worker))
        self.poller.register(err_r, False, ("stderr", worker))

    def _all_fds(self) -> list[int]:
        fds = []
        for w in self.workers.values():
            fds += [w.task_w, w.result_r, w.out_r, w.err_r]
        return fds

    def _reap(self, worker: _Worker) -> str:
        """Wait for a dead worker and describe how it ended."""
        ended, status = _wait_exit(worker.pid, 1.0)
        if not ended:
            status = _kill_and_wait(worker.pid)
        if status is None:
            return "exit status unknown"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            hint = " (killed: out of memory?)" if sig == signal.SIGKILL else ""
            return f"killed by signal {name}{hint}"
        return f"exit code {os.WEXITSTATUS(status)}"

    def _worker_gone(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        for fd in (worker.result_r, worker.out_r, worker.err_r):
            self.poller.unregister(fd)
        # Drain what the worker printed last: it often explains the death.
        for stream, fd in (("stdout", worker.out_r), ("stderr", worker.err_r)):
            self._drain_output(worker, stream, fd, final=True)
        for fd in (worker.task_w, worker.result_r, worker.out_r, worker.err_r):
            try:
                os.close(fd)
            except OSError:
                pass
        del self.workers[worker.result_r]
        how = self._reap(worker)
        if worker.outstanding:
            running = worker.outstanding.popleft()
            self.outbox.append((Msg.LOST, running, f"worker pid {worker.pid} {how}"))
            # Queued behind the running task in the dead worker's pipe: never started.
            for task_id in reversed(worker.outstanding):
                self.queue.appendleft(self._pending_tasks.pop(task_id))
        for task_id in worker.outstanding:
            self._pending_tasks.pop(task_id, None)
        worker.outstanding.clear()

    def _drain_output(self, worker: _Worker, stream: str, fd: int, final: bool = False) -> bool:
        try:
            data = os.read(fd, _OUTPUT_CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        text = worker.out_tail[stream] + data
        if data and not final:
            # Forward whole lines; keep a partial last line for the next read (bounded).
            cut = text.rfind(b"\n")
            if cut < 0 and len(text) < _OUTPUT_CHUNK:
                worker.out_tail[stream] = text
                return True
            send, worker.out_tail[stream] = (text[: cut + 1], text[cut + 1 :]) if cut >= 0 else (text, b"")
        else:
            send, worker.out_tail[stream] = text, b""
        if send:
            level = 20 if stream == "stdout" else 30
            self._forward_output((Msg.LOG, worker.pid, stream, level, stream,
                                  send.decode("utf-8", "replace").rstrip("\n")))
        if final and data:
            return self._drain_output(worker, stream, fd, final=True)
        return bool(data)

    # -- results from workers -------------------------------------------------------
    def _on_worker_result(self, worker: _Worker) -> None:
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
                kind = message[0]
                if kind == Msg.RESULT:
                    task_id = message[1]
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
                        worker.avg_seconds = 0.8 * worker.avg_seconds + 0.2 * message[4]
                    else:
                        worker.avg_seconds, worker.measured = message[4], True
                    self.outbox.append(message)
                elif kind == Msg.INIT_FAILED:
                    self.broken = True
                    self.outbox.append((Msg.BROKEN, "the initializer raised an exception",
                                        message[1]))
                else:  # LOG
                    self._forward_output(message)

    # -- output limit ---------------------------------------------------------------
    def _forward_output(self, message: tuple[Any, ...]) -> None:
        """Forward a LOG message within ``output_limit`` bytes/s (a token bucket).

        What is over the limit is dropped here, on the machine, and counted: a chatty
        logger must not saturate the link or the client's memory.
        """
        size = len(message[5])
        now = time.monotonic()
        self._out_tokens = min(float(self.output_limit),
                               self._out_tokens + (now - self._out_refill) * self.output_limit)
        self._out_refill = now
        if size <= self._out_tokens:
            self._out_tokens -= size
            self.outbox.append(message)
        else:
            self._dropped[0] += message[5].count("\n") + 1
            self._dropped[1] += size

    def _report_dropped_output(self, now: float) -> None:
        if self._dropped[0] and now - self._dropped_reported >= 1.0:
            lines, size = self._dropped
            self.outbox.append((Msg.LOG, os.getpid(), "log", 30, "vmexec.agent",
                                f"dropped {lines:,} lines ({size:,} bytes) of output on this "
                                f"machine (output_limit={self.output_limit:,} bytes/s)"))
            self._dropped = [0, 0]
            self._dropped_reported = now

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
                task = self.queue.popleft()
                task_id, digest, args, chunked = task
                messages: list[Any] = []
                if digest not in worker.digests:
                    if digest not in self.funcs:  # the client always sends FUNC first
                        self.outbox.append((Msg.RESULT, task_id, False, _missing_function(),
                                            0.0))
                        progress = True
                        continue
                    messages.append((Msg.FUNC, digest, self.funcs[digest]))
                    worker.digests.add(digest)
                messages.append((Msg.TASK, task_id, digest, args, chunked))
                worker.outstanding.append(task_id)
                self._pending_tasks[task_id] = task
                worker.write_buf += encode_frame(messages)
                progress = True
        for worker in live:
            self._flush_worker(worker)

    def _flush_worker(self, worker: _Worker) -> None:
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
                kind = message[0]
                if kind == Msg.TASK:
                    self.queue.append(message[1:])
                elif kind == Msg.FUNC:
                    self.funcs[message[1]] = message[2]
                elif kind == Msg.FORGET:
                    # The client only forgets callables no queued task uses.
                    digest = message[1]
                    self.funcs.pop(digest, None)
                    for worker in self.workers.values():
                        if worker.alive and digest in worker.digests:
                            worker.digests.discard(digest)
                            worker.write_buf += encode_frame([(Msg.FORGET, digest)])
                            self._flush_worker(worker)
                elif kind == Msg.PING:
                    self.outbox.append((Msg.PONG, message[1]))
                elif kind == Msg.SHUTDOWN:
                    self.stopping = True
                elif kind == Msg.RELEASE:
                    released = [task[0] for task in self.queue]
                    self.queue.clear()
                    self.outbox.append((Msg.RELEASED, released))

    # -- interruption notices -------------------------------------------------------
    def _check_notice(self, now: float) -> None:
        """Tell the client once when the machine announces it is going away.

        The cloud's notice (e.g. EC2's two-minute spot interruption warning, read from
        the instance metadata by the boot script's poller) lands in ``notice_file``;
        the agent only looks at the file, so it needs no network access of its own.
        """
        if self.notice_file is None or self._notice_sent or now < self._notice_next_check:
            return
        self._notice_next_check = now + 1.0
        try:
            with open(self.notice_file, encoding="utf-8", errors="replace") as handle:
                text = handle.read(4096).strip()
        except OSError:
            return
        self._notice_sent = True
        self.outbox.append((Msg.NOTICE, text or "the machine is going away"))

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
                if now - self.last_heard > self.watchdog_timeout:
                    sys.stderr.write(
                        f"vmexec agent: nothing from the client for {self.watchdog_timeout:.0f}s;"
                        " stopping\n")
                    exit_code = 4
                    break
                self._report_dropped_output(now)
                self._check_notice(now)
                # No heartbeat while earlier bytes wait: the client is not reading.
                if not self.outbox and not self._client_buf and \
                        now - self.last_sent >= self.heartbeat_interval:
                    self.outbox.append((Msg.HEARTBEAT,))
                try:
                    self._flush_outbox()
                except BrokenPipeError:
                    break
                if not self._paused and len(self._client_buf) > _CLIENT_BUF_HIGH:
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
            _power_off(self.poweroff)
        return exit_code

    def _stop_workers(self) -> None:
        for worker in list(self.workers.values()):
            try:
                os.close(worker.task_w)  # EOF: an idle worker exits by itself
            except OSError:
                pass
        deadline = time.monotonic() + 2.0  # for all of them together
        for worker in list(self.workers.values()):
            ended, _ = _wait_exit(worker.pid, deadline - time.monotonic())
            if not ended:
                _kill_and_wait(worker.pid)


def _wait_exit(pid: int, timeout: float) -> tuple[bool, Optional[int]]:
    """Poll child ``pid`` for up to ``timeout`` seconds: ``(ended, wait status)``; the
    status is None when the child was already reaped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True, None
        if done:
            return True, status
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(0.005)


def _kill_and_wait(pid: int) -> Optional[int]:
    """SIGKILL child ``pid`` and reap it; its wait status, or None if it was gone."""
    try:
        os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]
    except (ProcessLookupError, ChildProcessError):
        return None


_THREAD_LIMIT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                           "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _limit_native_threads(slots: int) -> None:
    """Give each worker its share of the cores for BLAS/OpenMP thread pools.

    Without this every worker's numpy starts one thread per core and a machine with
    N slots runs N×N threads. The user's own settings win.
    """
    share = str(max(1, (os.cpu_count() or 1) // max(1, slots)))
    for name in _THREAD_LIMIT_VARIABLES:
        os.environ.setdefault(name, share)


def _missing_function() -> bytes:
    import pickle

    error = RuntimeError("vmexec agent: task references a function the client never sent "
                         "(protocol error; please report it)")
    return pickle.dumps((error, ""))


def _power_off(command: list[str]) -> None:
    """Turn the machine off (cloud machines terminate on OS shutdown)."""
    try:
        subprocess.call(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        sys.stderr.write(f"vmexec agent: power-off command {command!r} failed: {exc}\n")


def default_poweroff_command() -> list[str]:
    """``shutdown -h now``, through ``sudo -n`` when the agent is not root."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return ["sudo", "-n", "shutdown", "-h", "now"]
    return ["shutdown", "-h", "now"]


def main() -> None:
    # Keep the real stdout for frames; anything else printing to fd 1 lands on stderr.
    frames_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    agent = Agent(stdin_fd=0, stdout_fd=frames_fd)
    code = agent.run()
    sys.exit(code)
