"""emcee on vmexec: ``EnsembleSampler(..., pool=ex)``.

emcee evaluates the log-probability of every walker through ``pool.map``; a
``VMExecutor`` is such a pool, so each step's walkers are spread over the machines.
Worth it when one evaluation is expensive (a simulation, a model fit)::

    pip install emcee numpy
    python examples/emcee_sampler.py
"""

from __future__ import annotations

import os
import sys

try:
    import emcee
    import numpy as np
except ImportError as exc:
    sys.exit(f"this example needs emcee and numpy ({exc.name} is missing): "
             "pip install emcee numpy")

from vmexec import VMExecutor

MEAN = np.array([1.0, -2.0])
INVERSE_COVARIANCE = np.linalg.inv(np.array([[1.0, 0.6], [0.6, 2.0]]))


def log_prob(theta: np.ndarray) -> float:
    """A correlated 2-D Gaussian: the posterior the sampler should recover."""
    delta = theta - MEAN
    return float(-0.5 * delta @ INVERSE_COVARIANCE @ delta)


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    walkers, dims, steps = 16, 2, 200
    start = np.random.default_rng(0).normal(size=(walkers, dims))
    np.random.seed(0)  # emcee draws its moves from a copy of numpy's global state
    with VMExecutor(max_workers=2, provider=provider) as ex:
        sampler = emcee.EnsembleSampler(walkers, dims, log_prob, pool=ex)
        sampler.run_mcmc(start, steps)
    samples = sampler.get_chain(discard=50, flat=True)
    print(f"{samples.shape[0]} samples, mean {np.round(samples.mean(axis=0), 2)} "
          f"(true {MEAN}), acceptance {sampler.acceptance_fraction.mean():.2f}")


if __name__ == "__main__":
    main()
