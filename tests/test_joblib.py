"""The joblib backend on the local provider: results, errors, sizing, life cycle, sklearn.

Most tests share one module-scoped executor through ``executor=`` (the backend must
never shut it down); the life-cycle tests let the backend make its own executors.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, Iterator

import psutil
import pytest

joblib = pytest.importorskip("joblib")

from conftest import FAST_TIMING  # noqa: E402
from helpers_wait import wait_until  # noqa: E402
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import vmexec.joblib  # noqa: E402  (registers the backend)
from vmexec import ConfigError, RemoteTraceback, VMExecutor  # noqa: E402
from vmexec.joblib import VMExecBackend  # noqa: E402

# Options for executors the backend makes itself (see conftest.FAST_TIMING).
OWN = dict(provider="local", **FAST_TIMING)


class TaskError(Exception):
    """Raised inside tasks; must come back as this very type."""


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise TaskError(f"item {x} is bad")
    return x


def pids(_: int) -> tuple[int, int]:
    """(worker pid, agent pid): the agent is the worker's parent."""
    return os.getpid(), os.getppid()


def inner_pids(n: int) -> set[int]:
    """A nested Parallel call inside a task: where do its items run?"""
    return set(Parallel(n_jobs=4)(delayed(os.getpid)() for _ in range(n)))


def echo(array: Any) -> Any:
    return array


class CountingExecutor(Executor):
    """Delegates to an executor and counts submissions (one per joblib batch)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return self.inner.submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def ex() -> Iterator[VMExecutor]:
    with VMExecutor(2, provider="local", **FAST_TIMING) as executor:
        yield executor


# -- results -------------------------------------------------------------------------
def test_results_come_back_in_order(ex):
    with parallel_config(backend="vmexec", executor=ex):
        assert Parallel()(delayed(square)(i) for i in range(50)) == [i * i for i in range(50)]


def test_tiny_tasks_are_batched_automatically(ex):
    counting = CountingExecutor(ex)
    with parallel_config(backend="vmexec", executor=counting, n_jobs=2):
        out = Parallel()(delayed(square)(i) for i in range(3000))
    assert out == [i * i for i in range(3000)]
    # AutoBatchingMixin grows batches while they finish faster than the ideal duration.
    assert counting.submitted < 3000 / 10, counting.submitted


def test_exception_keeps_its_type_and_remote_traceback(ex):
    with parallel_config(backend="vmexec", executor=ex):
        with pytest.raises(TaskError, match="item 7 is bad") as info:
            Parallel(batch_size=1)(delayed(fail_on)(i, 7) for i in range(20))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    # The shared executor survived the abort.
    with parallel_config(backend="vmexec", executor=ex):
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_return_as_generator_yields_in_order(ex):
    with parallel_config(backend="vmexec", executor=ex):
        gen = Parallel(return_as="generator")(delayed(square)(i) for i in range(10))
        assert not isinstance(gen, list)
        assert next(gen) == 0
        assert list(gen) == [i * i for i in range(1, 10)]
        unordered = Parallel(return_as="generator_unordered")(
            delayed(square)(i) for i in range(10))
        assert sorted(unordered) == [i * i for i in range(10)]


def test_timeout_raises():
    with parallel_config(backend="vmexec", n_jobs=2, **OWN):
        # joblib raises multiprocessing's TimeoutError (not the builtin) for its own timeout.
        with pytest.raises(multiprocessing.TimeoutError):
            Parallel(timeout=0.2)(delayed(time.sleep)(s) for s in (0, 2))


# -- sizing ---------------------------------------------------------------------------
def test_n_jobs_minus_one_is_the_executor_slots():
    with VMExecutor(3, provider="local", **FAST_TIMING) as ex3:
        backend = VMExecBackend(executor=ex3)
        assert backend.effective_n_jobs(-1) == 3
        assert backend.effective_n_jobs(-2) == 2
        assert backend.effective_n_jobs(None) == 3  # default_n_jobs = -1
        assert backend.effective_n_jobs(7) == 7
        with pytest.raises(ValueError):
            backend.effective_n_jobs(0)
        with parallel_config(backend="vmexec", executor=ex3):
            assert joblib.effective_n_jobs() == 3
    assert VMExecBackend(max_workers=5).effective_n_jobs(-1) == 5


def test_n_jobs_one_runs_in_this_process_without_a_fleet():
    with parallel_config(backend="vmexec", n_jobs=1, **OWN):
        out = Parallel()(delayed(os.getpid)() for _ in range(3))
    assert out == [os.getpid()] * 3


def test_nested_parallel_runs_sequentially_in_the_worker(ex):
    with parallel_config(backend="vmexec", executor=ex):
        results = Parallel(n_jobs=2)(delayed(inner_pids)(4) for _ in range(4))
    for inner in results:
        assert len(inner) == 1 and os.getpid() not in inner


# -- life cycle ----------------------------------------------------------------------
def test_own_executor_lives_for_one_call_and_is_sized_by_n_jobs():
    with parallel_config(backend="vmexec", n_jobs=3, **OWN):
        first = Parallel(batch_size=1)(delayed(pids)(i) for i in range(30))
        second = Parallel(batch_size=1)(delayed(pids)(i) for i in range(30))
    agents = {agent for _, agent in first}
    assert len(agents) == 1
    assert len({worker for worker, _ in first}) <= 3
    # Each call had its own fleet, and the first one's is gone.
    assert agents.isdisjoint({agent for _, agent in second})
    for agent in agents | {agent for _, agent in second}:
        wait_until(lambda: not psutil.pid_exists(agent) or
                   psutil.Process(agent).status() == psutil.STATUS_ZOMBIE,
                   timeout=30, what=f"agent {agent} to exit")


def test_own_executor_survives_an_error_for_the_next_call():
    with parallel_config(backend="vmexec", n_jobs=2, **OWN):
        with pytest.raises(TaskError):
            Parallel(batch_size=1)(delayed(fail_on)(i, 0) for i in range(4))
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_parallel_kwargs_are_executor_options():
    out = Parallel(n_jobs=2, backend="vmexec", **OWN)(delayed(square)(i) for i in range(4))
    assert out == [0, 1, 4, 9]


def test_shared_executor_is_left_running(ex):
    with parallel_config(backend="vmexec", executor=ex):
        Parallel()(delayed(square)(i) for i in range(4))
    assert ex.submit(square, 5).result(timeout=60) == 25


def test_option_errors():
    with VMExecutor(1, provider="local") as ex1:
        with pytest.raises(ConfigError, match="either executor= or VMExecutor options"):
            VMExecBackend(executor=ex1, provider="local")
        with pytest.raises(ConfigError, match="cannot change it"):
            Parallel(n_jobs=2, backend=VMExecBackend(executor=ex1), machines=2)(
                delayed(square)(i) for i in range(2))
    with pytest.raises(TypeError, match="concurrent.futures.Executor"):
        VMExecBackend(executor="local")
    with pytest.raises(ConfigError, match="machines"):
        with parallel_config(backend="vmexec", n_jobs=2, provider="local", machines=0):
            Parallel()(delayed(square)(i) for i in range(2))


def test_register_under_another_name(ex):
    vmexec.joblib.register("vmexec-test")
    with parallel_config(backend="vmexec-test", executor=ex):
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_large_arguments_and_results_do_not_stall():
    """Frames larger than a pipe buffer both ways while callbacks dispatch new batches.

    Run on vmexec's reader thread, joblib's callback would block writing the next batch
    while the agent blocks writing results to that same reader: a hang (see
    _CallbackRunner), which pytest-timeout would report.
    """
    numpy = pytest.importorskip("numpy")
    big = numpy.ones(200_000)  # 1.6 MB each way, far more than a pipe buffer
    with parallel_config(backend="vmexec", n_jobs=2, **OWN):
        out = Parallel(batch_size=1)(delayed(echo)(big) for _ in range(24))
    assert len(out) == 24 and all(o.shape == big.shape for o in out)


# -- scikit-learn ---------------------------------------------------------------------
def _tiny_search(n_jobs: Any) -> Any:
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    tree = pytest.importorskip("sklearn.tree")
    X, y = datasets.load_iris(return_X_y=True)
    search = model_selection.GridSearchCV(
        tree.DecisionTreeClassifier(random_state=0),
        {"max_depth": [1, 2, 3], "min_samples_leaf": [1, 5]}, cv=3, n_jobs=n_jobs)
    return search.fit(X, y)


def test_grid_search_with_its_own_fleet():
    expected = _tiny_search(None)  # sequential, outside any backend
    # n_jobs=4 as a user would write it; max_workers=2 keeps the fleet (and the number
    # of worker processes importing scikit-learn) small on a 2-core CI machine.
    with parallel_config(backend="vmexec", max_workers=2, **OWN):
        search = _tiny_search(4)
    assert search.best_params_ == expected.best_params_
    assert search.cv_results_["mean_test_score"].tolist() == \
        expected.cv_results_["mean_test_score"].tolist()


def test_grid_search_on_a_shared_executor(ex):
    with parallel_config(backend="vmexec", executor=ex):
        search = _tiny_search(-1)
    assert search.best_params_ == _tiny_search(None).best_params_


# -- packaging -----------------------------------------------------------------------
def test_vmexec_imports_without_joblib():
    code = (
        "import sys; sys.modules['joblib'] = None\n"  # makes `import joblib` fail
        "import vmexec\n"
        "assert 'joblib' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "try:\n"
        "    import vmexec.joblib\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'vmexec[joblib]'" in out.stdout
