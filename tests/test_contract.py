"""Executor semantics, written once and run against every provider (local and ssh).

Where ProcessPoolExecutor defines a behaviour, the test runs the same code against it
and compares.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    ProcessPoolExecutor,
    as_completed,
    wait,
)

import pytest

import helpers
from helpers_wait import wait_until
from vmexec import BrokenFleet, RemoteTraceback, WorkerLost


def test_submit_returns_result(make_executor):
    with make_executor() as ex:
        assert ex.submit(helpers.add, 2, b=3).result(timeout=60) == 5


def test_lambdas_closures_and_user_classes_travel(make_executor):
    offset = 10
    with make_executor() as ex:
        assert ex.submit(lambda x: x + offset, 1).result(timeout=60) == 11

        def nested(p):
            return helpers.Point(p.x * 2, p.y + offset)

        assert ex.submit(nested, helpers.Point(1, 2)).result(timeout=60) == helpers.Point(2, 12)


def test_map_matches_process_pool(make_executor):
    args = (range(50), range(100, 150))
    with ProcessPoolExecutor(2) as ppe:
        expected = list(ppe.map(helpers.add, *args))
    with make_executor() as ex:
        assert list(ex.map(helpers.add, *args)) == expected
        assert list(ex.map(helpers.add, *args, chunksize=7)) == expected
        assert list(ex.map(helpers.add, [], [])) == []


def test_map_chunksize_must_be_positive(make_executor):
    with make_executor() as ex, ProcessPoolExecutor(1) as ppe:
        for executor in (ex, ppe):
            with pytest.raises(ValueError, match="chunksize"):
                executor.map(helpers.add, [1], chunksize=0)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_raises_at_the_failing_item_like_process_pool(make_executor, chunksize):
    def collect(executor):
        seen = []
        with pytest.raises(ValueError, match="bad item 5") as info:
            for value in executor.map(helpers.fail_if, range(10), [5] * 10, chunksize=chunksize):
                seen.append(value)
        return seen, info.value

    with ProcessPoolExecutor(2) as ppe:
        expected, _ = collect(ppe)
    with make_executor() as ex:
        seen, error = collect(ex)
    assert seen == expected
    assert isinstance(error.__cause__, RemoteTraceback)


def test_map_timeout_counts_from_the_call(make_executor, tmp_path):
    release, peers = str(tmp_path / "release"), str(tmp_path / "peers")
    os.mkdir(peers)

    def meet(index: int) -> None:
        # Returns once both slots run a call at once: both workers have started.
        open(os.path.join(peers, str(index)), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(peers)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)

    def held(hold: bool) -> None:
        # The second item runs until the test releases it: the timeout, not the task's
        # length, must end the wait (a fixed sleep would race a busy machine).
        while hold and not os.path.exists(release):
            time.sleep(0.02)

    with make_executor() as ex:
        # Machines and their workers first: starting them can take longer than the 1 s
        # timeout on a busy box, and the timeout under test counts from map's call.
        assert list(ex.map(meet, range(2), timeout=120)) == [None, None]
        try:
            iterator = ex.map(held, [False, True], timeout=1.0)
            assert next(iterator) is None
            with pytest.raises(TimeoutError):  # the held item never ends by itself
                next(iterator)
        finally:
            open(release, "w").close()
        ex.shutdown(wait=False, cancel_futures=True)


def test_exception_keeps_type_and_remote_traceback(make_executor):
    with make_executor() as ex:
        future = ex.submit(helpers.fail, "kaboom")
        with pytest.raises(helpers.CustomError, match="kaboom") as info:
            future.result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback from machine" in str(cause)
    assert ", in fail" in str(cause) and "CustomError: kaboom" in str(cause)


def test_user_exception_is_never_retried(make_executor, tmp_path):
    with make_executor(max_retries=5) as ex:
        with pytest.raises(helpers.CustomError):
            ex.submit(helpers.fail, "once").result(timeout=60)


def test_unpicklable_callable_fails_only_its_future(make_executor):
    lock = threading.Lock()
    with make_executor() as ex:
        bad = ex.submit(lambda: lock)
        good = ex.submit(helpers.add, 1, 1)
        with pytest.raises(pickle.PicklingError, match="callable"):
            bad.result(timeout=60)
        assert good.result(timeout=60) == 2


def test_unpicklable_argument_names_the_argument(make_executor):
    with make_executor() as ex:
        bad = ex.submit(helpers.add, 1, b=threading.Lock())
        with pytest.raises(pickle.PicklingError, match="keyword argument 'b'.*lock"):
            bad.result(timeout=60)
        results = ex.map(helpers.add, [1], [threading.Lock()])  # map does not raise ...
        with pytest.raises(pickle.PicklingError, match="positional argument 1"):
            list(results)  # ... iterating does, as with ProcessPoolExecutor
        assert ex.submit(helpers.add, 2, 2).result(timeout=60) == 4


def test_submit_after_shutdown_raises(make_executor):
    ex = make_executor()
    ex.submit(helpers.add, 1).result(timeout=60)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(helpers.add, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.map(helpers.add, [1])


def test_shutdown_without_wait_still_finishes_work(make_executor):
    ex = make_executor()
    futures = [ex.submit(helpers.sleep_and_return, 0.2, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=60) for f in futures] == [0, 1, 2, 3]


def test_shutdown_cancel_futures_cancels_queued_work(make_executor):
    ex = make_executor(max_workers=1)
    running = ex.submit(helpers.sleep_and_return, 1.0, "done")
    wait_until(running.running)  # on a machine now (as in a ProcessPool's call queue)
    queued = [ex.submit(helpers.add, i) for i in range(200)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=0) == "done"
    cancelled = [f for f in queued if f.cancelled()]
    finished = [f for f in queued if not f.cancelled()]
    assert cancelled, "queued work beyond the machine's window must be cancelled"
    assert all(f.done() for f in queued)
    assert all(f.result() == queued.index(f) for f in finished)


def test_cancel_a_queued_future(make_executor):
    with make_executor(max_workers=1) as ex:
        first = ex.submit(helpers.sleep_and_return, 0.5, "first")
        rest = [ex.submit(helpers.add, i) for i in range(100)]
        last = rest[-1]
        assert last.cancel()
        assert last.cancelled()
        assert first.result(timeout=60) == "first"
        assert [f.result(timeout=60) for f in rest[:-1]] == list(range(99))


def test_as_completed_and_wait(make_executor):
    with make_executor() as ex:
        futures = [ex.submit(helpers.sleep_and_return, 0.05 * (3 - i), i) for i in range(3)]
        assert sorted(f.result() for f in as_completed(futures, timeout=60)) == [0, 1, 2]
        done, _ = wait([ex.submit(helpers.add, 1)], timeout=60, return_when=FIRST_COMPLETED)
        assert len(done) == 1


def test_initializer_runs_in_every_worker(make_executor):
    with make_executor(initializer=helpers.init, initargs=("ready",)) as ex:
        results = {ex.submit(helpers.initialized).result(timeout=60) for _ in range(6)}
    assert results == {"ready"}


def test_failing_initializer_breaks_the_executor_like_process_pool(make_executor):
    with ProcessPoolExecutor(1, initializer=helpers.init_fails) as ppe:
        with pytest.raises(BrokenExecutor):
            ppe.submit(helpers.add, 1).result(timeout=60)
    ex = make_executor(initializer=helpers.init_fails)
    future = ex.submit(helpers.add, 1)
    with pytest.raises(BrokenFleet) as info:
        future.result(timeout=60)
    assert isinstance(info.value, BrokenExecutor)
    assert "initializer exploded" in str(info.value.__cause__)
    with pytest.raises(BrokenFleet):
        ex.submit(helpers.add, 1)


def test_max_tasks_per_child_replaces_workers(make_executor):
    with make_executor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(helpers.pid).result(timeout=60) for _ in range(6)]
    assert len(set(pids)) == 3


def test_workers_start_lazily(make_executor):
    with make_executor(max_workers=8) as ex:
        pids = {ex.submit(helpers.pid).result(timeout=60) for _ in range(5)}
    assert len(pids) == 1  # sequential calls reuse one worker; 8 slots did not start 8


def test_max_workers_validation():
    from vmexec import VMExecutor

    for executor_class in (ProcessPoolExecutor, lambda n: VMExecutor(n, provider="local")):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            executor_class(0)


def test_worker_output_and_logs_are_forwarded(make_executor, caplog):
    caplog.set_level(logging.INFO, logger="vmexec.worker")
    with make_executor() as ex:
        assert ex.submit(helpers.shout, "hello-forwarding").result(timeout=60) == \
            "hello-forwarding"

    def all_three_forwarded() -> bool:
        messages = [r.getMessage() for r in caplog.records if r.name == "vmexec.worker"]
        return sum("hello-forwarding" in m for m in messages) >= 3

    wait_until(all_three_forwarded, timeout=60, what="stdout, stderr and log forwarded")
    by_stream = {r.stream: r for r in caplog.records if r.name == "vmexec.worker"
                 and "hello-forwarding" in r.getMessage()}
    assert set(by_stream) == {"stdout", "stderr", "log"}
    assert by_stream["stdout"].levelno == logging.INFO
    assert by_stream["log"].levelno == logging.WARNING
    assert "user.module: logged: hello-forwarding" in by_stream["log"].getMessage()
    assert by_stream["stdout"].getMessage().startswith("[")  # prefixed with the machine


def test_worker_killed_mid_task_is_retried(make_executor, tmp_path):
    marker = str(tmp_path / "died-once")
    with make_executor() as ex:
        assert ex.submit(helpers.die_once, marker).result(timeout=60) == "survived"
        assert ex.submit(helpers.add, 1, 1).result(timeout=60) == 2  # worker replaced


@pytest.mark.parametrize("how, expected", [("exit", "exit code 7"),
                                           ("kill", "signal SIGKILL")])
def test_worker_that_always_dies_gives_worker_lost(make_executor, how, expected):
    with make_executor(max_retries=2) as ex:
        future = ex.submit(helpers.die_always, how)
        with pytest.raises(WorkerLost, match=expected) as info:
            future.result(timeout=120)
        assert "lost 3 times" in str(info.value)
        assert ex.submit(helpers.add, 3).result(timeout=60) == 3  # executor still works


def test_many_tasks_across_two_machines(make_executor):
    with make_executor(max_workers=4, machines=2) as ex:
        assert sum(ex.map(helpers.add, range(2000), chunksize=3)) == sum(range(2000))


def test_callable_crosses_the_wire_once_per_machine(make_executor):
    with make_executor() as ex:
        assert list(ex.map(helpers.add, range(300), range(300))) == list(range(0, 600, 2))
        for i in range(20):
            ex.submit(helpers.add, i).result(timeout=60)
        [machine] = ex._scheduler.machines()
        assert len(machine.digests) == 1



def test_cached_callables_are_bounded_per_machine(make_executor):
    import functools

    from vmexec.scheduling import handout

    with make_executor() as ex:
        futures = [ex.submit(functools.partial(helpers.add, i), 1) for i in range(600)]
        assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(600)]
        [machine] = ex._scheduler.machines()
        assert len(machine.digests) <= handout._MAX_CACHED_CALLABLES + 300  # window slack
        assert ex.submit(helpers.add, 2, 2).result(timeout=60) == 4


def test_workers_get_their_share_of_native_threads(make_executor):
    import os

    with make_executor(max_workers=2) as ex:
        value = ex.submit(helpers.getenv, "OMP_NUM_THREADS").result(timeout=60)
    assert value == str(max(1, (os.cpu_count() or 1) // 2))
