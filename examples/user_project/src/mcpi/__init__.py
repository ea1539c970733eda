"""Estimate pi by sampling points in the unit square, on any concurrent.futures executor."""

from __future__ import annotations

import random
from concurrent.futures import Executor

__all__ = ["count_inside", "estimate_pi", "InvalidSamples"]


class InvalidSamples(ValueError):
    """A chunk was asked for a negative number of samples."""


def count_inside(seed: int, samples: int) -> int:
    """How many of ``samples`` random points (from ``seed``) fall inside the unit circle."""
    if samples < 0:
        raise InvalidSamples(f"samples must be >= 0, not {samples}")
    rng = random.Random(seed)
    inside = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


def estimate_pi(executor: Executor, samples: int = 200_000, chunks: int = 8) -> float:
    """Pi from ``samples`` points split into ``chunks`` tasks on ``executor``.

    The result depends only on ``samples`` and ``chunks`` (each chunk has its own seed),
    so it is the same on a laptop's process pool and on a fleet.
    """
    per_chunk = samples // chunks
    inside = sum(executor.map(count_inside, range(chunks), [per_chunk] * chunks))
    return 4.0 * inside / (per_chunk * chunks)
