"""Libraries that take an Executor or a map function run on vmexec with no glue.

dask (``scheduler=ex``), scipy (``workers=ex.map``), asyncio (``run_in_executor`` and
``wrap_future``), emcee (``pool=ex``) and ``concurrent.futures.as_completed``/``wait``
with tqdm — each on the local provider, each compared with the same computation done
without vmexec where the library makes the result deterministic.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import FAST_TIMING
from vmexec import RemoteTraceback, VMExecutor


class TaskError(Exception):
    """Raised inside tasks; must come back as this very type."""


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def explode(_: Any) -> None:
    raise TaskError("exploded on a machine")


def worker_pid(_: Any = None) -> int:
    return os.getpid()


def wait_for_file(path: str, deadline_seconds: float = 60.0) -> str:
    """Block (inside a task) until ``path`` exists: a gate the test opens."""
    deadline = time.monotonic() + deadline_seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return "released"


def log_prob(theta: Any) -> float:
    """A standard normal in any dimension."""
    import numpy as np

    return float(-0.5 * np.sum(np.asarray(theta) ** 2))


def rosen(x: Any) -> float:
    from scipy.optimize import rosen as scipy_rosen

    return float(scipy_rosen(x))


@pytest.fixture(scope="module")
def ex() -> Iterator[VMExecutor]:
    with VMExecutor(2, provider="local", **FAST_TIMING) as executor:
        yield executor


# -- dask ---------------------------------------------------------------------------
def test_dask_compute_with_the_executor_as_scheduler(ex):
    dask = pytest.importorskip("dask")
    parts = [dask.delayed(inc)(i) for i in range(8)]
    total = dask.delayed(sum)(parts)
    pairs = dask.delayed(add)(parts[0], parts[1])
    assert dask.compute(total, pairs, scheduler=ex) == (sum(range(1, 9)), 3)
    # The tasks ran in the executor's workers, not here.
    pids = dask.compute(*[dask.delayed(worker_pid)(i) for i in range(4)], scheduler=ex)
    assert os.getpid() not in pids


def test_dask_reraises_the_task_exception(ex):
    dask = pytest.importorskip("dask")
    with pytest.raises(TaskError, match="exploded"):
        dask.compute(dask.delayed(explode)(1), scheduler=ex)


def test_dask_array_reduction(ex):
    da = pytest.importorskip("dask.array")
    pytest.importorskip("numpy")
    x = da.arange(1000, chunks=100)
    assert int((x * 2).sum().compute(scheduler=ex)) == 999 * 1000


# -- scipy ----------------------------------------------------------------------------
def test_differential_evolution_with_workers_map(ex):
    optimize = pytest.importorskip("scipy.optimize")
    options = dict(bounds=[(-2, 2), (-2, 2)], updating="deferred", maxiter=15, popsize=6,
                   seed=3, polish=False, tol=0)
    local = optimize.differential_evolution(rosen, workers=map, **options)
    remote = optimize.differential_evolution(rosen, workers=ex.map, **options)
    # The same population evaluated elsewhere: the very same search.
    assert remote.x.tolist() == local.x.tolist()
    assert remote.nfev == local.nfev


# -- asyncio -------------------------------------------------------------------------
def test_asyncio_run_in_executor_and_wrap_future(ex):
    async def main() -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        one = await loop.run_in_executor(ex, inc, 1)
        many = await asyncio.gather(*(loop.run_in_executor(ex, inc, i) for i in range(10)))
        wrapped = await asyncio.wrap_future(ex.submit(add, 2, 3))
        with pytest.raises(TaskError) as info:
            await loop.run_in_executor(ex, explode, None)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        return one, many, wrapped

    one, many, wrapped = asyncio.run(main())
    assert (one, many, wrapped) == (2, list(range(1, 11)), 5)


# -- emcee ----------------------------------------------------------------------------
def test_emcee_sampler_with_the_executor_as_pool(ex):
    emcee = pytest.importorskip("emcee")
    np = pytest.importorskip("numpy")

    def sample(pool: Any) -> Any:
        np.random.seed(7)  # EnsembleSampler copies numpy's global random state
        start = np.random.default_rng(7).normal(size=(8, 2))
        sampler = emcee.EnsembleSampler(8, 2, log_prob, pool=pool)
        sampler.run_mcmc(start, 15)
        return sampler.get_chain()

    remote = sample(ex)
    assert remote.shape == (15, 8, 2)
    # emcee calls pool.map(log_prob, walkers): the same chain as without a pool.
    assert np.array_equal(remote, sample(None))


# -- concurrent.futures helpers with tqdm -------------------------------------------
def test_as_completed_with_tqdm(ex):
    tqdm = pytest.importorskip("tqdm").tqdm
    bar_output = io.StringIO()
    futures = [ex.submit(inc, i) for i in range(20)]
    results = [f.result() for f in tqdm(as_completed(futures, timeout=60), total=len(futures),
                                        file=bar_output)]
    assert sorted(results) == list(range(1, 21))
    assert "20/20" in bar_output.getvalue()

    mapped = list(tqdm(ex.map(inc, range(30), chunksize=5), total=30, file=io.StringIO()))
    assert mapped == list(range(1, 31))


def test_wait_first_completed(ex, tmp_path: Path):
    gate = tmp_path / "gate"
    blocked = ex.submit(wait_for_file, str(gate))
    quick = ex.submit(inc, 41)
    done, not_done = wait([blocked, quick], timeout=60, return_when=FIRST_COMPLETED)
    assert quick in done and blocked in not_done
    assert quick.result() == 42
    gate.touch()
    done, not_done = wait([blocked], timeout=60)
    assert not not_done and blocked.result() == "released"
