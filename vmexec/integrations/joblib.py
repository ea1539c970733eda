"""The joblib parallel backend: ``joblib.Parallel`` batches run as ``VMExecutor`` tasks.

Owns ``VMExecBackend`` (a ``joblib.parallel.ParallelBackendBase``) and the rules that tie
joblib's life cycle to an executor's::

    parallel_config(backend="vmexec", ...)     one backend instance for the whole block
      Parallel(...)(delayed(f)(x) for x in xs)
        configure()      own executor: created for this call, sized from n_jobs
                         shared executor (executor=ex): used as it is
        submit(batch)    executor.submit(_run_batch, batch) + joblib's done-callback
          ...            each callback, run on the backend's callback thread,
                         dispatches the next batch
        abort_everything()   first error: cancel the batches that have not started
        terminate()      own executor: shut down (its machines are gone when the call
                         returns); shared executor: left running for its owner

Batch sizes come from joblib's ``AutoBatchingMixin``, which measures each batch from
dispatch to result — a measurement that includes the round trip to the machine, so
the ideal batch duration is set higher than joblib's local-process default.

Nested ``Parallel`` calls inside tasks run sequentially (as inside loky workers): a
worker is one slot of a machine, and more processes or threads there would only
oversubscribe its CPUs.

This is the only vmexec module that imports joblib; the public entry point is
``vmexec.joblib``. Must not import: paramiko, boto3, scheduler or provider internals
(it uses the public ``Executor`` API only).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional

from joblib import cpu_count, register_parallel_backend
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from vmexec.errors import ConfigError
from vmexec.executor import VMExecutor

__all__ = ["VMExecBackend", "BACKEND_NAME", "executor_slots", "register"]

logger = logging.getLogger("vmexec.joblib")

#: The name the backend is registered under: ``parallel_config(backend="vmexec")``.
BACKEND_NAME = "vmexec"

# Keyword arguments joblib passes to ``configure()`` on every call for its own
# process-pool backends (memory mapping, start method, logging). They have no meaning
# for machines reached over a byte stream — arrays travel pickled — so they are
# dropped; any other keyword given to ``Parallel(...)`` is an executor option.
_JOBLIB_CONFIGURE_KEYS = frozenset(
    {"max_nbytes", "temp_folder", "mmap_mode", "verbose", "context", "prefer", "require"})


def register(name: str = BACKEND_NAME, *, make_default: bool = False) -> None:
    """Register the vmexec backend with joblib (``import vmexec.joblib`` does it once).

    Args:
        name: the name for ``joblib.parallel_config(backend=...)``.
        make_default: also make it joblib's default backend, so that ``Parallel`` and
            scikit-learn's ``n_jobs`` use it without ``parallel_config``. joblib then
            builds it without options: set ``VMEXEC_PROVIDER`` to choose where its
            machines come from.
    """
    register_parallel_backend(name, VMExecBackend, make_default=make_default)


def _run_batch(batch: Callable[[], Any]) -> Any:
    """Run one joblib batch on a worker.

    Submitted as ``executor.submit(_run_batch, batch)`` rather than
    ``executor.submit(batch)``: machines cache callables by digest for the life of a
    worker, and every joblib batch is a distinct callable carrying its own data, so
    submitting batches directly would make each worker keep every batch it ever ran.
    This function is one callable, sent once per machine; batches travel as arguments.
    """
    return batch()


def executor_slots(executor: Executor) -> Optional[int]:
    """The number of task slots ``executor`` offers, when it can be known before it runs.

    Args:
        executor: a ``VMExecutor`` or a standard-library pool.

    Returns:
        The slot count, or None when the fleet decides it only once machines have
        joined (e.g. SSH hosts sized by their CPU count and no ``max_workers``).
    """
    # ProcessPoolExecutor and ThreadPoolExecutor keep their size in `_max_workers`
    # (dask reads the same attribute); a VMExecutor's provider knows its slot target.
    candidates = (getattr(executor, "_max_workers", None),
                  getattr(getattr(executor, "provider", None), "max_workers", None))
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# A completion callback of joblib's and the future it is for.
_Callback = tuple[Callable[[Future[Any]], Any], Future[Any]]


class _CallbackRunner:
    """Runs joblib's batch-completion callbacks on a thread of the backend's own.

    vmexec resolves futures on its reader and dispatcher threads. joblib's callback
    takes the ``Parallel`` lock and dispatches the next batch — it writes a frame to a
    machine. Run on a reader thread, that write can wait for the agent while the agent
    waits for that same reader to drain its results (both ends stall once the frames
    outgrow a pipe buffer), and a lost-machine callback on the dispatcher then waits
    for joblib's lock. joblib's own process pools run callbacks on a result-handler
    thread for the same reason; so does this backend.
    """

    def __init__(self) -> None:
        # Unbounded on purpose: it holds at most one entry per batch in flight, and
        # put() must never block the vmexec thread that resolves a future.
        self._queue: queue.SimpleQueue[Optional[_Callback]] = queue.SimpleQueue()
        # A daemon: a callback stuck on a user's lock must not keep the interpreter alive.
        self._thread = threading.Thread(target=self._run, name="vmexec-joblib-callbacks",
                                        daemon=True)
        self._thread.start()

    def schedule(self, callback: Callable[[Future[Any]], Any], future: Future[Any]) -> None:
        self._queue.put((callback, future))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            callback, future = item
            try:
                callback(future)
            except Exception:
                # As concurrent.futures does for done-callbacks: report and go on, or
                # every later batch of the call would wait forever for its callback.
                logger.exception("joblib's completion callback for %r failed", future)

    def stop(self) -> None:
        """Run the callbacks already queued, then end the thread."""
        self._queue.put(None)
        # Joined without a timeout: callbacks only take joblib's lock briefly, and a
        # Parallel call must not return while one of its callbacks still runs. Never
        # from the thread itself (joblib may end a call from inside a callback).
        if threading.current_thread() is not self._thread:
            self._thread.join()


class VMExecBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend running ``Parallel`` batches on a vmexec fleet.

    Registered as ``"vmexec"`` by ``import vmexec.joblib``. Either the backend makes
    its own ``VMExecutor`` for each ``Parallel`` call (from ``executor_options``) and
    shuts it down when the call ends, or it uses ``executor`` and never shuts it down.

    Args:
        nesting_level: set by joblib (0 for a top-level call).
        inner_max_num_threads: not supported (joblib asserts it is None).
        executor: an existing executor to run on, usually a ``VMExecutor``; its owner
            shuts it down. Reuse one executor across many ``Parallel`` calls to keep
            one fleet instead of starting one per call.
        **executor_options: ``VMExecutor`` arguments (``provider=``, ``max_workers=``,
            ``machines=``, ``hosts=``, ``initializer=``, ...) for the executor the
            backend makes. ``max_workers`` defaults to the call's ``n_jobs``.

    Raises:
        ConfigError: both ``executor`` and executor options are given.
        TypeError: ``executor`` is not a ``concurrent.futures.Executor``.
    """

    # Choosing the vmexec backend means "run on the fleet": n_jobs=None (what
    # scikit-learn passes by default) uses every slot, as joblib's dask backend does.
    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False

    # joblib's own values (0.2 s / 2 s) assume a local pipe. The measured batch time
    # here includes a round trip to the machine (60-150 ms across regions), so batches
    # must run longer for the computation, not the trip, to dominate.
    MIN_IDEAL_BATCH_DURATION = 0.5
    MAX_IDEAL_BATCH_DURATION = 5.0

    def __init__(self, nesting_level: Optional[int] = None,
                 inner_max_num_threads: Optional[int] = None, *,
                 executor: Optional[Executor] = None, **executor_options: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads)
        if executor is not None:
            if not isinstance(executor, Executor):
                raise TypeError(f"executor must be a concurrent.futures.Executor such as a "
                                f"VMExecutor, got {type(executor).__name__}")
            if executor_options:
                raise ConfigError(
                    f"joblib backend 'vmexec': pass either executor= or VMExecutor options, "
                    f"not both (got executor= and {', '.join(sorted(executor_options))}); "
                    "the options of an existing executor are set where it is created")
        self._shared_executor = executor
        self._executor_options = executor_options
        # The executor this backend made for the running call(s); None between calls.
        self._own_executor: Optional[Executor] = None
        # Guards the fields below: joblib calls submit() both from the thread running
        # Parallel and from the callback thread (each completion dispatches the next
        # batch), and a generator may be closed from yet another thread.
        self._lock = threading.Lock()
        self._active_calls = 0
        self._callbacks: Optional[_CallbackRunner] = None
        self._futures: set[Future[Any]] = set()

    # -- sizing -------------------------------------------------------------------
    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        """How many batches can run at once: ``n_jobs``, with -1 meaning every slot.

        Args:
            n_jobs: as in ``joblib.Parallel``; None means ``default_n_jobs`` (-1);
                ``-k`` means all slots but ``k - 1``.

        Returns:
            The number of concurrent batches joblib should aim for (at least 1).

        Raises:
            ValueError: ``n_jobs == 0``.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(self._slots() + 1 + n_jobs, 1)
        return int(n_jobs)

    def _slots(self) -> int:
        executor = self._shared_executor or self._own_executor
        if executor is not None:
            slots = executor_slots(executor)
        else:
            slots = self._executor_options.get("max_workers")
        # Unknown until the fleet has joined (SSH hosts sized by their CPU count, no
        # max_workers): this machine's CPU count is what the local provider would use,
        # and only a guess elsewhere — pass max_workers= to make n_jobs=-1 exact.
        return slots if isinstance(slots, int) and slots > 0 else cpu_count()

    # -- one Parallel call ----------------------------------------------------------
    def configure(self, n_jobs: Optional[int] = 1, parallel: Any = None,
                  prefer: Optional[str] = None, require: Optional[str] = None,
                  **backend_kwargs: Any) -> int:
        """Prepare an executor for a ``Parallel`` call; returns the effective ``n_jobs``.

        Args:
            n_jobs: the call's ``n_jobs``.
            parallel: the ``joblib.Parallel`` instance (joblib passes it).
            prefer: joblib's hint; the backend always uses processes on machines.
            require: joblib's constraint; ``"sharedmem"`` never reaches this backend
                (joblib switches to threads, since machines share no memory).
            **backend_kwargs: joblib's memory-mapping options (ignored) and any other
                ``Parallel(**kwargs)``, taken as ``VMExecutor`` options.

        Returns:
            The number of concurrent batches.

        Raises:
            FallbackToBackend: ``n_jobs`` resolves to 1 — joblib then runs the call
                in this process, as it does for its own backends, starting no machine.
            ConfigError: an executor option is invalid, or options were given along
                with ``executor=``.
        """
        self.parallel = parallel
        extra = {k: v for k, v in backend_kwargs.items() if k not in _JOBLIB_CONFIGURE_KEYS}
        if extra and self._shared_executor is not None:
            raise ConfigError(
                f"joblib backend 'vmexec' runs on the executor given as executor=; "
                f"Parallel(...) options {', '.join(sorted(extra))} cannot change it")
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        with self._lock:
            if self._shared_executor is None and self._own_executor is None:
                self._own_executor = self._make_executor(n_jobs, extra)
            if self._callbacks is None:
                self._callbacks = _CallbackRunner()
            self._active_calls += 1
        effective = self.effective_n_jobs(n_jobs)
        if effective == 1:
            self.terminate()
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        return effective

    def _make_executor(self, n_jobs: Optional[int], extra: dict[str, Any]) -> Executor:
        options = {**self._executor_options, **extra}
        if options.get("max_workers") is None and n_jobs is not None and n_jobs > 0:
            # parallel_config(backend="vmexec", n_jobs=4): a fleet of 4 slots.
            options["max_workers"] = n_jobs
        return VMExecutor(**options)

    def submit(self, func: Callable[[], Any],
               callback: Optional[Callable[[Future[Any]], Any]] = None) -> Future[Any]:
        """Run one joblib batch on the fleet; joblib's ``callback`` fires when it is done.

        Args:
            func: a joblib ``BatchedCalls`` (a picklable zero-argument callable).
            callback: joblib's completion callback, given the future.

        Returns:
            The ``concurrent.futures.Future`` of the batch.

        Raises:
            RuntimeError: the executor was shut down (e.g. by its owner, or by an
                abort of this call).
        """
        executor = self._shared_executor or self._own_executor
        callbacks = self._callbacks
        if executor is None or callbacks is None:
            raise RuntimeError(
                "the vmexec joblib backend has no executor: this Parallel call was "
                "aborted or has ended; start a new call")
        future = executor.submit(_run_batch, func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(lambda done: callbacks.schedule(callback, done))
        return future

    # joblib < 1.5 calls apply_async(); joblib >= 1.5 calls submit().
    apply_async = submit

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's list of results, or its exception with the original type.

        Args:
            out: the future returned by ``submit``.

        Returns:
            The batch's results.

        Raises:
            BaseException: the task's own exception, with the remote traceback as
                ``__cause__`` (``WorkerLost``/``BrokenFleet`` for lost machines).
        """
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel every batch of this backend that has not started on a machine.

        Batches already running finish on their machines and their results are
        discarded: a VMExecutor does not kill a running task.

        Args:
            ensure_ready: joblib's flag: True when the same ``Parallel`` object will
                submit again (it is used as a context manager), so the executor stays.
        """
        with self._lock:
            pending = list(self._futures)
            self._futures.clear()
            last_call = self._active_calls <= 1
            executor = self._own_executor if not ensure_ready and last_call else None
            if executor is not None:
                self._own_executor = None
        for future in pending:
            future.cancel()
        if executor is not None:
            # Don't wait: the caller is about to raise the task's error, and a
            # running task may take long. The fleet is torn down in the background as
            # soon as its running tasks end (and at interpreter exit at the latest).
            executor.shutdown(wait=False, cancel_futures=True)

    def terminate(self) -> None:
        """End of a ``Parallel`` call: shut down the executor this backend made for it.

        An executor passed as ``executor=`` is left running. When several calls share
        this backend at once (a ``return_as="generator"`` call still being consumed),
        the executor is shut down when the last one ends.
        """
        with self._lock:
            self._active_calls = max(0, self._active_calls - 1)
            executor = callbacks = None
            if self._active_calls == 0:
                executor, self._own_executor = self._own_executor, None
                callbacks, self._callbacks = self._callbacks, None
                self._futures.clear()
        if callbacks is not None:
            callbacks.stop()
        if executor is not None:
            executor.shutdown(wait=True)
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, Optional[int]]:
        """The backend for ``Parallel`` calls made inside tasks: sequential.

        Returns:
            ``(SequentialBackend, None)``: a task occupies one slot, so nested calls
            run in that worker process rather than start processes or threads that
            would compete for the machine's CPUs with the other slots.
        """
        nesting_level = (self.nesting_level or 0) + 1
        return SequentialBackend(nesting_level=nesting_level), None

    def __repr__(self) -> str:
        where = "shared" if self._shared_executor is not None else "own"
        return f"<VMExecBackend {where} executor={self._shared_executor or self._own_executor!r}>"
