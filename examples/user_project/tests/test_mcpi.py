"""The project's tests: once on a local process pool, once on a fleet of the local cloud.

The fleet tests use the fixtures vmexec's pytest plugin provides (``pip install
"vmexec[testing]"``): ``vmexec_executor`` is a ``VMExecutor(provider="ec2", ...)`` whose
machines are fake VMs on this computer, behind moto's EC2 on 127.0.0.1. Nothing
leaves this computer and no AWS account is needed.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

import mcpi


def _machine_root(_: int) -> str:
    # Each fake VM runs with its own root directory; on a laptop this is unset.
    return os.environ.get("VMEXEC_ROOT", "")


def test_estimate_on_a_process_pool() -> None:
    with ProcessPoolExecutor(2) as pool:
        assert abs(mcpi.estimate_pi(pool, samples=40_000) - 3.1416) < 0.05


def test_estimate_on_the_local_cloud_matches_the_process_pool(vmexec_executor) -> None:
    with ProcessPoolExecutor(2) as pool:
        expected = mcpi.estimate_pi(pool, samples=40_000)
    assert mcpi.estimate_pi(vmexec_executor, samples=40_000) == expected
    # It really ran on the fleet's machines, not here.
    roots = set(vmexec_executor.map(_machine_root, range(4)))
    assert "" not in roots and len(roots) >= 1


@pytest.mark.vmexec(max_workers=1, max_retries=0)
def test_an_error_on_a_machine_comes_back_as_itself(vmexec_executor) -> None:
    future = vmexec_executor.submit(mcpi.count_inside, 0, -1)
    with pytest.raises(mcpi.InvalidSamples, match="samples must be >= 0"):
        future.result(timeout=300)
