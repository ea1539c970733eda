"""A process forked from a client (a ProcessPoolExecutor in the same program, as a user's
test suite often has) inherits the fleet's objects, atexit hooks and signal handlers:
when it exits it must not tear the parent's fleet down (delete its keys, terminate its
machines). Found running a user's test suite against the local cloud (issue 11)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from aws_fixtures import MIXED, REGIONS, TEST_CIDR
from vmexec import VMExecutor


def test_a_forked_child_leaves_the_parents_fleet_alone(session: Any, calls: Any) -> None:
    ex = VMExecutor(4, provider="ec2", instance_type=MIXED, regions=REGIONS,
                    ssh_cidr=TEST_CIDR, session=session, handle_signals=False,
                    environment=None, dry_run=True)
    try:
        keys = ex.provider.keys
        assert os.path.exists(keys.client_key)
        # The children run the interpreter's exit hooks (vmexec's among them) when the
        # pool shuts down.
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(2, mp_context=fork) as pool:
            assert list(pool.map(abs, [-1, -2])) == [1, 2]
        child = fork.Process(target=ex.provider.terminate, args=(None,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert os.path.exists(keys.client_key), "a child removed the parent's fleet keys"
        assert ex.provider.teardown_summary is None
    finally:
        ex.shutdown()
    assert not os.path.exists(keys.client_key)  # the parent's own shutdown still does


def _exit_the_child_way() -> None:
    # What a forked worker does when it ends: run the interpreter's exit hooks.
    import threading

    threading._shutdown()  # type: ignore[attr-defined]


def test_a_forked_child_does_not_shut_the_parents_executor_down() -> None:
    with VMExecutor(2, provider="local") as ex:
        assert ex.submit(pow, 2, 5).result(timeout=60) == 32
        fork = multiprocessing.get_context("fork")
        # The children inherit the scheduler and the exit hook that finishes its work
        # at interpreter exit; only the process that made the scheduler may act on it.
        with ProcessPoolExecutor(2, mp_context=fork) as pool:
            assert list(pool.map(abs, [-1, -2])) == [1, 2]
        child = fork.Process(target=_exit_the_child_way)
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert ex.submit(pow, 2, 6).result(timeout=60) == 64
        assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))
