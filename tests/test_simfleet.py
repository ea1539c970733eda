"""The unchanged client against the fleet simulator: real SSH to hundreds of machines.

Each simulated machine has its own loopback address and pinned host key; the client is
``VMExecutor(provider="ssh")`` as users run it. These tests check behaviour, not speed
(benchmarks/scale.py measures speed): results and their order, exceptions with remote
tracebacks, host-key pinning, machines that boot late, die, stall or drop their
connection, and that a fleet of hundreds costs the client no thread per machine.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from vmexec import HostKeyError, VMExecutor
from vmexec.testing.simfleet import SimFleet, sleep_task


def square(x: int) -> int:
    return x * x


def fails_on_seven(x: int) -> int:
    if x == 7:
        raise KeyError(f"no {x}")
    return x


def _machines_used(ex: VMExecutor) -> int:
    return len(ex._scheduler.machines())


def test_a_two_region_fleet_runs_real_code_in_order() -> None:
    with SimFleet(machines=40, slots=2, regions={"near": 0.001, "far": 0.03}) as fleet:
        with VMExecutor(max_workers=80, **fleet.executor_options()) as ex:
            assert list(ex.map(square, range(2000))) == [x * x for x in range(2000)]
            assert list(ex.map(square, range(300), chunksize=7)) == [x * x for x in range(300)]
            assert ex.submit(pow, 3, 4).result() == 81
            # Every machine joined, from both regions.
            labels = {m.info["hostname"].split("-")[1] for m in ex._scheduler.machines()}
            assert labels == {"near", "far"}
            # A task's exception comes back as itself, with the machine's traceback.
            results = ex.map(fails_on_seven, range(10))
            got = []
            with pytest.raises(KeyError, match="no 7") as info:
                for value in results:
                    got.append(value)
            assert got == list(range(7))
            assert "Traceback from machine sim@127.77." in str(info.value.__cause__)


def test_sleep_tasks_hold_slots_without_running() -> None:
    with SimFleet(machines=10, slots=1) as fleet:
        with VMExecutor(max_workers=10, **fleet.executor_options()) as ex:
            started = time.monotonic()
            values = list(ex.map(sleep_task, [0.5] * 20, range(20)))
            elapsed = time.monotonic() - started
    assert values == list(range(20))
    # 20 half-second tasks on 10 one-slot machines: two rounds, not one, not twenty.
    assert elapsed >= 1.0


def test_host_keys_are_pinned(tmp_path: object) -> None:
    with SimFleet(machines=3) as fleet:
        # Swap two machines' known_hosts entries: each now presents a key that differs
        # from the pinned one, which must be refused, never accepted.
        with open(fleet.known_hosts, encoding="ascii") as f:
            lines = f.read().splitlines()
        keys = [line.split(" ", 1)[1] for line in lines]
        names = [line.split(" ", 1)[0] for line in lines]
        with open(fleet.known_hosts, "w", encoding="ascii") as f:
            for name, key in zip(names, keys[1:] + keys[:1]):
                f.write(f"{name} {key}\n")
        options = fleet.executor_options()
        with VMExecutor(max_workers=3, **options) as ex:
            with pytest.raises(Exception) as info:
                ex.submit(square, 2).result(timeout=60)
        cause = info.value.__cause__ or info.value
        assert isinstance(cause, HostKeyError) or "CHANGED" in str(info.value), info.value
        assert "CHANGED" in str(cause)


def test_machines_that_boot_late_join_when_ready() -> None:
    # Each machine's SSH server starts listening 0.2-2.5 s in; the connect pool
    # retries refused connections with backoff meanwhile.
    with SimFleet(machines=30, boot=(0.2, 2.5)) as fleet:
        with VMExecutor(max_workers=30, **fleet.executor_options()) as ex:
            assert list(ex.map(sleep_task, [0.3] * 60, range(60))) == list(range(60))
            deadline = time.monotonic() + 30
            while _machines_used(ex) < 30 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _machines_used(ex) == 30


@pytest.mark.parametrize("fault", ["die", "drop"])
def test_machines_that_die_or_drop_lose_no_task(fault: str) -> None:
    # A third of the machines fail 0.5 s after their agent started, in the middle of
    # a map of tasks that take 0.2 s: their tasks are re-queued on the others.
    with SimFleet(machines=12, slots=1, **{fault: (4, 0.5)}) as fleet:
        with VMExecutor(max_workers=12, **fleet.executor_options()) as ex:
            values = list(ex.map(sleep_task, [0.2] * 120, range(120)))
            assert values == list(range(120))
            assert _machines_used(ex) == 8


def test_a_stalled_machine_is_detected_by_heartbeats() -> None:
    # Two machines stop answering (connection up, nothing sent): after
    # heartbeat_timeout they are marked lost and their tasks run elsewhere.
    with SimFleet(machines=6, slots=1, stall=(2, 0.3)) as fleet:
        with VMExecutor(max_workers=6, heartbeat_interval=0.5, heartbeat_timeout=3,
                        watchdog_timeout=10, **fleet.executor_options()) as ex:
            values = list(ex.map(sleep_task, [0.2] * 30, range(30)))
            assert values == list(range(30))
            deadline = time.monotonic() + 20
            while _machines_used(ex) > 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _machines_used(ex) == 4


def test_hundreds_of_machines_cost_no_thread_each() -> None:
    machines = int(os.environ.get("VMEXEC_TEST_SIM_MACHINES", "400"))
    with SimFleet(machines=machines, slots=2) as fleet:
        before = threading.active_count()
        with VMExecutor(max_workers=2 * machines, **fleet.executor_options()) as ex:
            assert list(ex.map(sleep_task, [0.5] * 2 * machines, range(2 * machines))) \
                == list(range(2 * machines))
            deadline = time.monotonic() + 120
            while _machines_used(ex) < machines and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _machines_used(ex) == machines
            # dispatcher, inbox, I/O loop and a few helper threads: not one per machine.
            assert threading.active_count() - before <= 12, \
                [t.name for t in threading.enumerate()]
            assert fleet.stats()["agents_running"] == machines
        deadline = time.monotonic() + 30
        while fleet.stats()["agents_running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        # Shutdown closed every connection: no simulated agent is left running.
        assert fleet.stats()["agents_running"] == 0


def test_a_slow_machine_gives_back_its_queued_tasks() -> None:
    # Two one-slot machines, one ten times slower. Without work stealing the slow
    # machine keeps the task queued behind its running one to the end (its window);
    # with it, the fast machine takes that task back once the queue is empty.
    with SimFleet(machines=2, slots=1, slow=(1, 10.0)) as fleet:
        with VMExecutor(max_workers=2, **fleet.executor_options()) as ex:
            futures = [ex.submit(sleep_task, 0.1, i) for i in range(30)]
            assert [f.result(timeout=60) for f in futures] == list(range(30))
            slow = [m for m in ex._scheduler.machines() if "slow" in m.info["hostname"]]
            assert slow, "the slow machine is part of the fleet"
            released = ex._scheduler.released_total
    # The slow machine (1 s per task) ran only a few; the fast one (0.1 s) the rest,
    # including tasks taken back from the slow machine's queue.
    assert released >= 1


def test_idle_heartbeats_keep_machines_alive_without_waking_the_inbox() -> None:
    # An idle fleet sends little else than heartbeats; each is noted on the I/O loop
    # (the machine's last_heard) instead of waking the inbox thread.
    with SimFleet(machines=20, slots=1) as fleet:
        with VMExecutor(max_workers=20, heartbeat_interval=0.5, heartbeat_timeout=10,
                        **fleet.executor_options()) as ex:
            assert list(ex.map(sleep_task, [0.2] * 20, range(20))) == list(range(20))
            scheduler = ex._scheduler
            woken: list[object] = []
            put = scheduler._inbox_put
            scheduler._inbox_put = lambda entry: (woken.append(entry), put(entry))[1]
            time.sleep(3.0)  # about 6 heartbeats from each of 20 machines
            now = time.monotonic()
            machines = scheduler.machines()
            assert len(machines) == 20
            assert all(now - m.last_heard < 1.5 for m in machines), "heartbeats were seen"
            assert len(woken) < 20, f"the inbox was woken {len(woken)} times for heartbeats"
            assert ex.submit(square, 4).result(timeout=30) == 16
