"""Monte Carlo with ``map``: price an option by simulating many independent paths.

Each task simulates a block of price paths with its own random stream and returns
partial sums; the client combines them into an estimate with a standard error and
compares it with the Black-Scholes formula. Pure Python: nothing to install.

    python examples/monte_carlo.py                    # on this computer
    VMEXEC_PROVIDER=ssh python examples/monte_carlo.py ...   # elsewhere, unchanged

The pattern scales by changing ``max_workers`` and the provider: blocks are
independent, results are tiny, and ``chunksize`` sends several blocks per message.
"""

from __future__ import annotations

import math
import os
import random
import time

from vmexec import VMExecutor

SPOT, STRIKE, RATE, VOLATILITY, YEARS = 100.0, 105.0, 0.03, 0.2, 1.0
BLOCKS, PATHS_PER_BLOCK = 64, 5_000


def simulate_block(seed: int, paths: int) -> tuple[float, float]:
    """Discounted call payoffs of ``paths`` paths: returns (sum, sum of squares)."""
    rng = random.Random(seed)  # one independent stream per block: reproducible
    drift = (RATE - 0.5 * VOLATILITY ** 2) * YEARS
    spread = VOLATILITY * math.sqrt(YEARS)
    discount = math.exp(-RATE * YEARS)
    total = total_sq = 0.0
    for _ in range(paths):
        price = SPOT * math.exp(drift + spread * rng.gauss(0.0, 1.0))
        payoff = discount * max(price - STRIKE, 0.0)
        total += payoff
        total_sq += payoff * payoff
    return total, total_sq


def black_scholes_call() -> float:
    """The closed-form price the simulation should converge to."""
    d1 = (math.log(SPOT / STRIKE) + (RATE + 0.5 * VOLATILITY ** 2) * YEARS) / (
        VOLATILITY * math.sqrt(YEARS))
    d2 = d1 - VOLATILITY * math.sqrt(YEARS)
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    return SPOT * cdf(d1) - STRIKE * math.exp(-RATE * YEARS) * cdf(d2)


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    started = time.perf_counter()
    with VMExecutor(max_workers=4, provider=provider) as ex:
        # map() keeps the order of the seeds; chunksize=4 sends four blocks per task.
        blocks = list(ex.map(simulate_block, range(BLOCKS), [PATHS_PER_BLOCK] * BLOCKS,
                             chunksize=4))
    n = BLOCKS * PATHS_PER_BLOCK
    total = sum(s for s, _ in blocks)
    total_sq = sum(q for _, q in blocks)
    mean = total / n
    stderr = math.sqrt(max(total_sq / n - mean * mean, 0.0) / n)
    exact = black_scholes_call()
    print(f"{n:,} paths in {time.perf_counter() - started:.1f}s")
    print(f"Monte Carlo price {mean:.3f} +/- {1.96 * stderr:.3f} (95%), "
          f"Black-Scholes {exact:.3f}")
    if abs(mean - exact) > 5 * stderr:
        raise SystemExit("the estimate is more than 5 standard errors off: a bug")


if __name__ == "__main__":
    main()
