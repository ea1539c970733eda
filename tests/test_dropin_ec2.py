"""The initializer's module state is the tasks' on the ``ec2`` provider too.

Runs ``VMExecutor(provider="ec2")`` against the local cloud (moto plus a fake VM per
instance, with its own sshd and boot script; see tests/test_localcloud.py), and compares
with ProcessPoolExecutor.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

import helpers
from test_localcloud import REGION, _require_ec2_provider, assert_clean, e2e_options
from vmexec.testing.localcloud import LocalCloud

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(240)]

# This test module is not installed: its functions travel by value, as a script's would.
MODEL = None
CACHE: dict[str, str] = {}


def load(value: str) -> None:
    global MODEL
    MODEL = value
    CACHE["model"] = value


def predict(x: int) -> tuple[int, object, object]:
    return x, MODEL, CACHE.get("model")


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    yield from helpers.local_cloud(REGION)


def test_initializer_globals_are_the_tasks_globals_on_ec2(cloud: LocalCloud) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor

    with ProcessPoolExecutor(2, initializer=load, initargs=("loaded",)) as ppe:
        expected = list(ppe.map(predict, range(8)))
    with VMExecutor(max_workers=2, initializer=load, initargs=("loaded",),
                    **e2e_options(cloud, instance_type="c7i.large", regions=[REGION])) as ex:
        results = list(ex.map(predict, range(8)))
    assert results == expected == [(x, "loaded", "loaded") for x in range(8)]
    assert_clean(cloud)
