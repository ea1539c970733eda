"""The agent's worker processes: start, output, death and end.

Owns the process side of the agent's workers (``vmexec.agent.worker`` is the code that
runs inside each one):

* Spawning: ``fork``, with a task pipe in, a result pipe out, and the user's stdout and
  stderr (fd 1 and 2) on pipes of their own; each worker gets its share of the cores
  for native thread pools.
* Output: what workers print is forwarded to the client as LOG messages, whole lines
  at a time, within ``output_limit`` bytes/s (a token bucket); what is over the limit
  is dropped on the machine and counted, and the count is reported.
* Death: a worker that dies loses the task it was running: the agent reports it
  (LOST, with the exit code or signal) and the client decides whether to retry. Tasks
  that were queued behind it in its pipe never started; they go back to the front of
  the queue.
* The end: closing the task pipes lets idle workers exit; the rest are killed.

``WorkerProcesses`` is a part of ``vmexec.agent.main.Agent`` (a mixin: the relay's hot
path pays no extra indirection); the state it uses is listed on the class and set by
``Agent.__init__``.

Imports only the standard library and vmexec.protocol/agent: runs on a bare machine.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Deque, Optional

from vmexec.agent.worker import run_worker
from vmexec.protocol import FrameReader, Log, Lost, Msg, Task

if TYPE_CHECKING:
    from vmexec.agent.stream import Poller

# When a worker's recent tasks are this short, it is handed several at once so it
# never waits for the next one; longer tasks get one at a time, so that a long task
# never holds a short one hostage while another worker idles.
_PREFETCH_BELOW_SECONDS = 0.002
_MAX_PREFETCH = 32
_OUTPUT_CHUNK = 1 << 16


class Worker:
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


class WorkerProcesses:
    """Spawning, reaping and forwarding the output of workers (a part of ``Agent``)."""

    # Set by Agent.__init__ (and the handshake).
    stdin_fd: int
    stdout_fd: int
    poller: Poller
    outbox: list[Any]
    queue: Deque[Task]
    workers: dict[int, Worker]  # keyed by result fd
    slots: int
    initializer: Optional[bytes]
    max_tasks: Optional[int]
    log_level: int
    # task id -> task, for every task handed to a worker and not yet answered, so
    # that tasks stuck behind a dead worker's running task can be re-queued.
    _pending_tasks: dict[int, Task]
    output_limit: int
    _out_tokens: float
    _out_refill: float
    _dropped: list[int]  # lines, bytes not forwarded since the last report
    _dropped_reported: float

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
        worker = Worker(pid, task_w, result_r, out_r, err_r, self.max_tasks)
        self.workers[result_r] = worker
        self.poller.register(result_r, False, ("result", worker))
        self.poller.register(out_r, False, ("stdout", worker))
        self.poller.register(err_r, False, ("stderr", worker))

    def _all_fds(self) -> list[int]:
        fds = []
        for w in self.workers.values():
            fds += [w.task_w, w.result_r, w.out_r, w.err_r]
        return fds

    def _reap(self, worker: Worker) -> str:
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

    def _worker_gone(self, worker: Worker) -> None:
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
            self.outbox.append(Lost(Msg.LOST, running, f"worker pid {worker.pid} {how}"))
            # Queued behind the running task in the dead worker's pipe: never started.
            for task_id in reversed(worker.outstanding):
                self.queue.appendleft(self._pending_tasks.pop(task_id))
        for task_id in worker.outstanding:
            self._pending_tasks.pop(task_id, None)
        worker.outstanding.clear()

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

    # -- output -----------------------------------------------------------------------
    def _drain_output(self, worker: Worker, stream: str, fd: int, final: bool = False) -> bool:
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
            self._forward_output(Log(Msg.LOG, worker.pid, stream, level, stream,
                                     send.decode("utf-8", "replace").rstrip("\n")))
        if final and data:
            return self._drain_output(worker, stream, fd, final=True)
        return bool(data)

    def _forward_output(self, message: Log) -> None:
        """Forward a LOG message within ``output_limit`` bytes/s (a token bucket).

        What is over the limit is dropped here, on the machine, and counted: a chatty
        logger must not saturate the link or the client's memory.
        """
        size = len(message.text)
        now = time.monotonic()
        self._out_tokens = min(float(self.output_limit),
                               self._out_tokens + (now - self._out_refill) * self.output_limit)
        self._out_refill = now
        if size <= self._out_tokens:
            self._out_tokens -= size
            self.outbox.append(message)
        else:
            self._dropped[0] += message.text.count("\n") + 1
            self._dropped[1] += size

    def _report_dropped_output(self, now: float) -> None:
        if self._dropped[0] and now - self._dropped_reported >= 1.0:
            lines, size = self._dropped
            self.outbox.append(Log(Msg.LOG, os.getpid(), "log", 30, "vmexec.agent",
                                   f"dropped {lines:,} lines ({size:,} bytes) of output on "
                                   f"this machine (output_limit={self.output_limit:,} "
                                   "bytes/s)"))
            self._dropped = [0, 0]
            self._dropped_reported = now


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
