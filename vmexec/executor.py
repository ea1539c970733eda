"""``VMExecutor``: the public ``concurrent.futures.Executor`` — validate, pickle, enqueue.

A thin front: it checks arguments, turns calls into work items and hands them to the
scheduler. It behaves like ``ProcessPoolExecutor`` wherever that defines behaviour:
futures, ``map`` ordering/timeout/chunksize, ``shutdown(wait, cancel_futures)``,
``initializer``, ``max_tasks_per_child`` and exceptions re-raised with the remote
traceback as ``__cause__``.

Must not import: paramiko, boto3, concrete transports.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from vmexec import pickling
from vmexec.config import SchedulerConfig, provider_from_environment
from vmexec.errors import ConfigError
from vmexec.guardrails.costs import CostGuard
from vmexec.providers import get_provider_class
from vmexec.providers.base import MachineRecord, Provider
from vmexec.scheduler import Scheduler
from vmexec.scheduling.items import MapCall, MapItem, WorkItem

T = TypeVar("T")

# map() hands items to the scheduler in slices of this many, so that machines start
# on the first items while the rest of a long iterable is still being pickled.
_MAP_SUBMIT_SLICE = 512


class VMExecutor(Executor):
    """An Executor whose worker processes run on a fleet of machines.

    Args:
        max_workers: task slots across the fleet (concurrent calls), as in
            ``ProcessPoolExecutor``; ``None`` lets the provider decide (local: the CPU
            count). The fleet grows with demand up to this.
        provider: ``"local"``, ``"ssh"`` or ``"ec2"``; ``None`` reads ``$VMEXEC_PROVIDER``,
            else ``"ec2"``.
        initializer: called with ``*initargs`` once in every worker process.
        initargs: arguments for ``initializer``.
        max_tasks_per_child: worker processes are replaced after this many tasks.
        max_retries: how often a task whose worker process or machine died is retried.
        **provider_options: options of the chosen provider (e.g. ``machines=`` for local,
            ``hosts=`` for ssh, ``instance_type=``/``regions=`` for ec2), the options of
            ``SchedulerConfig`` (``keepalive``, ``max_lifetime``, ``progress``,
            ``output_limit``, ``heartbeat_interval``, ``heartbeat_timeout``,
            ``watchdog_timeout``, ``boot_timeout``), and the cost guardrails:
            ``max_hourly_cost`` (USD/h; a plan above it is refused before launch),
            ``budget`` (USD; the fleet stops when its running cost reaches it) and
            ``dry_run`` (show the plan, launch nothing).

    Raises:
        ValueError: (``ConfigError``) for an invalid argument, before anything starts.
    """

    def __init__(self, max_workers: Optional[int] = None, *, provider: Optional[str] = None,
                 initializer: Optional[Callable[..., Any]] = None, initargs: tuple[Any, ...] = (),
                 max_tasks_per_child: Optional[int] = None, max_retries: int = 3,
                 **provider_options: Any) -> None:
        config = SchedulerConfig.pop_from(max_workers, max_retries, max_tasks_per_child,
                                          provider_options)
        max_hourly_cost = provider_options.pop("max_hourly_cost", None)
        budget = provider_options.pop("budget", None)
        self._dry_run = bool(provider_options.pop("dry_run", False))
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        name = provider_from_environment(provider)
        # Every provider takes max_workers (the base class does not declare __init__).
        provider_class: Callable[..., Provider] = get_provider_class(name)
        # Settings both layers use (e.g. a cloud provider bakes boot_timeout and
        # max_lifetime into the machine's own dead-man switch) go to the provider too.
        shared = config.shared_with(provider_class)
        self._provider: Provider = provider_class(max_workers=max_workers, **shared,
                                                  **provider_options)
        initializer_bytes = None
        if initializer is not None:
            pickling.register_user_modules()
            try:
                initializer_bytes = pickling.dumps((initializer, tuple(initargs)))
            except Exception as exc:
                raise ConfigError(f"initializer/initargs cannot be pickled: {exc}") from exc
        # Priced and checked before anything is launched: a plan over max_hourly_cost
        # raises BudgetExceeded here, with the largest max_workers that fits.
        self._cost = CostGuard(self._provider, max_workers, max_hourly_cost=max_hourly_cost,
                               budget=budget, check_leftovers=not self._dry_run)
        self._scheduler = Scheduler(self._provider, config, initializer_bytes,
                                    poweroff=self._provider.poweroff_on_watchdog,
                                    cost=self._cost)
        # Like ProcessPoolExecutor's attribute, which dask reads to size its queue.
        self._max_workers: Optional[int] = max_workers or self._provider.max_workers
        self._shutdown_lock = threading.Lock()
        self._shutdown_called = False
        # The scheduler must not keep the executor alive: if the executor is collected
        # without shutdown(), the queued work still finishes and the fleet is torn down.
        weakref.finalize(self, self._scheduler.shutdown, False)

    # -- introspection ----------------------------------------------------------------
    @property
    def max_workers(self) -> Optional[int]:
        """Task slots across the fleet (None: decided by the machines, e.g. SSH hosts' CPUs)."""
        return self._max_workers

    @property
    def provider(self) -> Provider:
        """The provider instance that makes this executor's machines."""
        return self._provider

    @property
    def plan(self) -> str:
        """The fleet at full scale: regions, types, architectures, machines, slots, $/h."""
        if self._cost.plan_cost is not None:
            return self._cost.plan_cost.text()
        cost_plan = self._provider.cost_plan()
        if cost_plan is not None:
            return str(cost_plan.plan.text())
        return (f"provider {self._provider.name!r}: up to {self._max_workers or 'one per CPU'} "
                "slots on machines you already have ($0)")

    @property
    def cost(self) -> float:
        """The running cost estimate of this executor's machines, in US dollars."""
        return self._cost.total

    @property
    def fleet(self) -> list[MachineRecord]:
        """The machines in use now (id, region, zone, type, arch, state, slots)."""
        return [m.record for m in self._scheduler.machines()]

    # -- Executor API -----------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; returns a Future.

        A callable or argument that cannot be pickled fails this future only.

        Raises:
            RuntimeError: after ``shutdown()``.
            BrokenFleet: when the fleet is broken.
        """
        with self._shutdown_lock:
            self._check_open()
            future: Future[T] = Future()
            try:
                digest, fn_bytes = pickling.dumps_callable(fn)
                call = pickling.dumps_call(args, kwargs)
            except pickle.PicklingError as exc:
                future.set_exception(exc)
                return future
            label = f"task {getattr(fn, '__qualname__', type(fn).__name__)}"
            self._scheduler.submit([WorkItem(future, digest, fn_bytes, call, False, label)])
            return future

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: Optional[float] = None,
            chunksize: int = 1) -> Iterator[T]:
        """Like ``ProcessPoolExecutor.map``: results in order, yielded as they arrive.

        Args:
            fn: callable applied to each tuple of items.
            *iterables: consumed eagerly, as ``concurrent.futures`` does.
            timeout: seconds, counted from this call, for the whole iteration.
            chunksize: items per work item; larger chunks cut per-item overhead.

        Raises:
            ValueError: ``chunksize < 1``.
            TimeoutError: on iteration, when a result is not ready in time.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        with self._shutdown_lock:
            self._check_open()
            futures = self._submit_map(fn, zip(*iterables), chunksize)
        return _result_iterator(futures, end_time, chunked=chunksize > 1)

    def _submit_map(self, fn: Callable[..., Any], calls: Iterator[tuple[Any, ...]],
                    chunksize: int) -> list[Future[Any]]:
        futures: list[Future[Any]] = []
        label = f"task {getattr(fn, '__qualname__', type(fn).__name__)}"
        try:
            digest, fn_bytes = pickling.dumps_callable(fn)
        except pickle.PicklingError as exc:
            # As ProcessPoolExecutor: every call fails, raised when iterated.
            for _ in calls if chunksize == 1 else _chunks(calls, chunksize):
                future: Future[Any] = Future()
                future.set_exception(exc)
                futures.append(future)
            return futures
        batch: list[WorkItem] = []
        source: Iterable[Any] = calls if chunksize == 1 else _chunks(calls, chunksize)
        empty_kwargs: dict[str, Any] = {}
        shared = MapCall()
        for call in source:
            try:
                if chunksize == 1:
                    data = pickling.dumps_call(call, empty_kwargs)
                else:
                    data = pickling.dumps_chunk(call)
            except pickle.PicklingError as exc:
                failed: Future[Any] = Future()
                failed.set_exception(exc)
                futures.append(failed)
                continue
            if chunksize == 1:
                # Its own future: one object per item (see MapCall), and it may travel
                # in a micro-batch with its neighbours.
                item: WorkItem = MapItem(shared, digest, fn_bytes, data, label)
                futures.append(item)  # type: ignore[arg-type]
            else:
                chunk_future: Future[Any] = Future()
                futures.append(chunk_future)
                item = WorkItem(chunk_future, digest, fn_bytes, data, True, label)
            batch.append(item)
            if len(batch) >= _MAP_SUBMIT_SLICE:
                self._scheduler.submit(batch)
                batch = []
        if batch:
            self._scheduler.submit(batch)
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work, then tear the fleet down when the running work is done.

        Args:
            wait: block until running and queued work is done and machines are gone.
            cancel_futures: cancel queued work that has not been sent to a machine.
        """
        with self._shutdown_lock:
            self._shutdown_called = True
        self._scheduler.shutdown(wait=wait, cancel_futures=cancel_futures)

    def _check_open(self) -> None:
        if self._dry_run:
            raise ConfigError("this executor was made with dry_run=True: it shows the plan "
                              "(ex.plan) and launches nothing. Drop dry_run= to run tasks")
        broken = self._scheduler.broken
        if broken is not None:
            error = type(broken)(str(broken))
            error.__cause__ = broken.__cause__
            raise error
        if self._shutdown_called:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def __repr__(self) -> str:
        return (f"<VMExecutor provider={self._provider.name} "
                f"machines={len(self._scheduler.machines())} pid={os.getpid()}>")


def _chunks(calls: Iterator[tuple[Any, ...]], chunksize: int) -> Iterator[list[tuple[Any, ...]]]:
    while True:
        chunk = list(itertools.islice(calls, chunksize))
        if not chunk:
            return
        yield chunk


def _result_or_cancel(future: Future[Any], timeout: Optional[float] = None) -> Any:
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break the reference cycle through the traceback


def _result_iterator(futures: list[Future[Any]], end_time: Optional[float],
                     chunked: bool) -> Iterator[Any]:
    # A plain function, not a method: the iterator must not keep the executor alive.
    try:
        futures.reverse()
        # Yield without keeping a name for the value: the caller must be the last one
        # holding what it was given (CPython's test_free_reference).
        while futures:
            if chunked:
                if end_time is None:
                    yield from _result_or_cancel(futures.pop())
                else:
                    yield from _result_or_cancel(futures.pop(), end_time - time.monotonic())
            elif end_time is None:
                yield _result_or_cancel(futures.pop())
            else:
                yield _result_or_cancel(futures.pop(), end_time - time.monotonic())
    finally:
        for future in futures:
            future.cancel()
