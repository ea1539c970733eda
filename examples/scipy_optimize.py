"""scipy on vmexec: ``differential_evolution(workers=ex.map)``.

scipy's population-based optimizers take a map-like ``workers`` argument and evaluate
each generation through it. With ``updating="deferred"`` a whole generation is
evaluated at once, so every member can run on a different slot. The search is the
same as with the builtin ``map``: only where the objective runs changes::

    python examples/scipy_optimize.py      # needs scipy: pip install scipy
"""

from __future__ import annotations

import math
import os
import sys

try:
    from scipy.optimize import differential_evolution
except ImportError:
    sys.exit("this example needs scipy: pip install scipy")

from vmexec import VMExecutor


def objective(x: list[float]) -> float:
    """Rastrigin's function, standing in for an expensive simulation."""
    return 10.0 * len(x) + sum(v * v - 10.0 * math.cos(2.0 * math.pi * v) for v in x)


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    bounds = [(-5.12, 5.12)] * 3
    with VMExecutor(max_workers=2, provider=provider) as ex:
        result = differential_evolution(objective, bounds, workers=ex.map,
                                        updating="deferred", popsize=10, maxiter=60,
                                        seed=1, polish=False)
    print(f"minimum {result.fun:.4f} at {[round(float(v), 3) for v in result.x]} "
          f"after {result.nfev} evaluations")


if __name__ == "__main__":
    main()
