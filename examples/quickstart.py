"""Quickstart: the same code as with ProcessPoolExecutor, on vmexec machines.

Runs on this computer with no cloud account (the "local" provider: machines are
agent processes speaking the same protocol a cloud fleet uses):

    python examples/quickstart.py

Set VMEXEC_PROVIDER=ssh/ec2 (and their options) to run it elsewhere unchanged.
"""

from __future__ import annotations

import math
import os
import platform
import random

from vmexec import VMExecutor


def estimate_pi(samples: int, seed: int) -> float:
    """Monte Carlo estimate of pi from ``samples`` random points."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def where_am_i(_: int) -> str:
    return f"{platform.node()} pid {os.getpid()}"


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    with VMExecutor(max_workers=4, provider=provider) as ex:
        # submit(): one call, one future.
        future = ex.submit(math.factorial, 20)
        print("20! =", future.result())

        # map(): results in order; chunksize batches many small calls per work item.
        estimates = list(ex.map(estimate_pi, [20_000] * 16, range(16), chunksize=2))
        print(f"pi ~ {sum(estimates) / len(estimates):.4f} from {len(estimates)} tasks")

        # Exceptions come back with their own type and the remote traceback as __cause__.
        try:
            ex.submit(math.sqrt, -1).result()
        except ValueError as exc:
            print("remote error:", repr(exc))

        workers = sorted(set(ex.map(where_am_i, range(32))))
        print(f"ran on {len(workers)} worker process(es):", ", ".join(workers))
    print("done: every machine is gone")


if __name__ == "__main__":
    main()
