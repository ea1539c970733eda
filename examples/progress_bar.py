"""Progress bars: ``as_completed`` / ``wait`` / ``map`` with tqdm.

vmexec futures are ``concurrent.futures`` futures, so the standard helpers and tqdm
work unchanged (for a bar without any code, vmexec draws its own when stderr is a
terminal: ``VMExecutor(..., progress=True)`` forces it)::

    pip install tqdm
    python examples/progress_bar.py
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_EXCEPTION, as_completed, wait

try:
    from tqdm import tqdm
except ImportError:
    sys.exit("this example needs tqdm: pip install tqdm")

from vmexec import VMExecutor


def collatz_steps(n: int) -> int:
    """Steps for n to reach 1 in the Collatz iteration."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def longest_in(start: int, stop: int) -> int:
    """The longest chain for numbers in [start, stop)."""
    return max(collatz_steps(n) for n in range(start, stop))


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    numbers = range(1, 20_001)
    # progress=False: this example draws its own bars, so vmexec's built-in one (shown
    # by default in a terminal) would only repeat them.
    with VMExecutor(max_workers=2, provider=provider, progress=False) as ex:
        # As tasks finish, in any order.
        futures = [ex.submit(longest_in, start, start + 1000)
                   for start in range(1, 20_001, 1000)]
        longest = 0
        for future in tqdm(as_completed(futures), total=len(futures), desc="blocks"):
            longest = max(longest, future.result())
        # In order, with map(); chunksize batches many small calls per message.
        steps = list(tqdm(ex.map(collatz_steps, numbers, chunksize=500),
                          total=len(numbers), desc="numbers"))
        # wait(): stop at the first failure instead of collecting everything.
        done, not_done = wait([ex.submit(collatz_steps, n) for n in (27, 97, 871)],
                              return_when=FIRST_EXCEPTION)
    print(f"longest chain below 20,000: {longest} steps (map agrees: {max(steps)}); "
          f"{len(done)} checks done, {len(not_done)} left")


if __name__ == "__main__":
    main()
