"""dask on vmexec: a ``VMExecutor`` is a dask scheduler.

dask accepts any ``concurrent.futures.Executor`` as ``scheduler=``: its local
scheduler walks the task graph on this computer and runs each task through
``ex.submit``. No dask cluster, no dask on the client beyond ``pip install dask``::

    pip install dask
    python examples/dask_graph.py

dask decides how many tasks to keep in flight from ``num_workers`` (dask config or
the executor's size); each task's inputs travel to the machine that runs it, so keep
per-task data modest or load it on the machine.
"""

from __future__ import annotations

import os
import statistics
import sys

try:
    import dask
except ImportError:
    sys.exit("this example needs dask: pip install dask")

from vmexec import VMExecutor


def load(part: int) -> list[float]:
    """Stands in for reading one partition of a data set."""
    return [((part * 7919 + i * 104729) % 1000) / 10.0 for i in range(10_000)]


def clean(values: list[float]) -> list[float]:
    return [v for v in values if v < 95.0]


def summarize(values: list[float]) -> tuple[int, float]:
    return len(values), sum(values)


def combine(parts: list[tuple[int, float]]) -> float:
    count = sum(n for n, _ in parts)
    return sum(total for _, total in parts) / count


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    # The graph: load -> clean -> summarize for each partition, then one combine.
    partials = [dask.delayed(summarize)(dask.delayed(clean)(dask.delayed(load)(p)))
                for p in range(12)]
    mean = dask.delayed(combine)(partials)
    spread = dask.delayed(statistics.pstdev)(dask.delayed(clean)(dask.delayed(load)(0)))

    with VMExecutor(max_workers=2, provider=provider) as ex:
        # Per call ...
        (mean_value,) = dask.compute(mean, scheduler=ex)
        # ... or for every compute() in a block.
        with dask.config.set(scheduler=ex):
            (spread_value,) = dask.compute(spread)
    print(f"mean of the cleaned data {mean_value:.3f}, spread of partition 0 "
          f"{spread_value:.3f}")


if __name__ == "__main__":
    main()
