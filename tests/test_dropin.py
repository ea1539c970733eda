"""Drop-in for ProcessPoolExecutor: module state shared by initializer and tasks, errors
``except BrokenProcessPool`` catches, ``max_workers`` as the number of concurrent calls.

Each behaviour is run against ProcessPoolExecutor in the same test and compared, on the
``local`` and the ``ssh`` provider (a real sshd on loopback).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import helpers
from conftest import FAST_TIMING, ssh_options
from vmexec import (
    BrokenFleet,
    DeserializationError,
    VMExecError,
    VMExecutor,
    WorkerLost,
)
from vmexec.providers.ssh import SSHProvider

# -- 1. initializer and tasks share module state --------------------------------------

# A user's own module, not installed: vmexec sends its code by value.
USER_MODULE = '''
MODEL = None
CACHE = {}


class Registry:
    model = None


def init(value):
    global MODEL
    MODEL = value          # rebinding a global
    CACHE["model"] = value  # mutating a module-level object
    Registry.model = value  # a class attribute


def task(i):
    return [MODEL, CACHE.get("model"), Registry.model]
'''

# A script: its functions live in __main__ (as in a notebook), also sent by value.
SCRIPT = '''
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

from vmexec import VMExecutor
import usermod

# The issue's example, verbatim.
MODEL = None
def init(x):
    global MODEL
    MODEL = x
def task(i):
    return MODEL

CACHE = {}


class Registry:
    model = None


def init_all(value):
    global MODEL
    MODEL = value
    CACHE["model"] = value
    Registry.model = value


def task_all(i):
    return [MODEL, CACHE.get("model"), Registry.model]


def through_module(i):
    return [usermod.MODEL, usermod.task(i)]


def run(make):
    out = {}
    with make(initializer=init, initargs=("loaded",)) as ex:
        out["issue_example"] = sorted(set(ex.map(task, range(8))))
    with make(initializer=init_all, initargs=("loaded",)) as ex:
        out["main"] = sorted({json.dumps(r) for r in ex.map(task_all, range(8))})
    with make(initializer=usermod.init, initargs=("loaded",)) as ex:
        out["user_module"] = sorted({json.dumps(r) for r in ex.map(usermod.task, range(8))})
        out["module_attribute"] = sorted({json.dumps(r) for r in ex.map(through_module,
                                                                         range(8))})
    return out


if __name__ == "__main__":
    options = json.loads(sys.argv[1])
    spawn = multiprocessing.get_context("spawn")
    ppe = run(lambda **kw: ProcessPoolExecutor(2, mp_context=spawn, **kw))
    vm = run(lambda **kw: VMExecutor(2, **options, **kw))
    print(json.dumps({"ProcessPoolExecutor": ppe, "VMExecutor": vm}))
'''


def _run_script(tmp_path: Path, options: dict) -> dict:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VMEXEC_PROVIDER"}
    out = subprocess.run([sys.executable, "script.py", json.dumps(options)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


LOADED = [json.dumps(["loaded", "loaded", "loaded"])]


@pytest.mark.parametrize("provider", ["local", "ssh"])
def test_initializer_globals_are_the_tasks_globals_like_process_pool(provider, tmp_path,
                                                                      request):
    options: dict = {"provider": "local", **FAST_TIMING}
    if provider == "ssh":
        options = ssh_options(request.getfixturevalue("sshd"), **FAST_TIMING)
    results = _run_script(tmp_path, options)
    expected = {
        "issue_example": ["loaded"],
        "main": LOADED,
        "user_module": LOADED,
        "module_attribute": [json.dumps(["loaded", ["loaded", "loaded", "loaded"]])],
    }
    assert results["ProcessPoolExecutor"] == expected
    assert results["VMExecutor"] == expected


# State for the in-process tests below: this test module is not installed either, so
# its functions travel by value too.
SCALE = 1
COUNTER = 0


def scaled(x: int) -> int:
    return x * SCALE


def count() -> int:
    global COUNTER
    COUNTER += 1
    return COUNTER


def set_scale_on_worker(value: int) -> None:
    global SCALE
    SCALE = value


def test_tasks_keep_worker_state_between_calls_like_process_pool(make_executor):
    with ProcessPoolExecutor(1) as ppe:
        expected = [ppe.submit(count).result(timeout=60) for _ in range(3)]
    with make_executor(max_workers=1) as ex:
        assert [ex.submit(count).result(timeout=60) for _ in range(3)] == expected == [1, 2, 3]


def test_a_global_the_client_rebinds_reaches_the_workers(make_executor):
    """A notebook re-running ``SCALE = 10``: the workers get the new value, while a value
    the client did not rebind stays what the worker made it."""
    global SCALE
    with make_executor(max_workers=1, initializer=set_scale_on_worker, initargs=(3,)) as ex:
        assert ex.submit(scaled, 2).result(timeout=60) == 6  # the initializer's value
        try:
            SCALE = 10
            assert ex.submit(scaled, 2).result(timeout=60) == 20
        finally:
            SCALE = 1


def read_scale() -> int:
    return SCALE


class Shape:
    sides = 0


def test_pickles_of_one_module_share_one_namespace_once_unpickled():
    """What a worker does with two pickles made separately (this process plays the
    worker: vmexec.agent.namespaces keeps one namespace per client module)."""
    from vmexec import pickling

    global SCALE
    pickling.register_user_modules()  # as submit() does: this module travels by value
    setter = pickle.loads(pickling.dumps(set_scale_on_worker))
    reader = pickle.loads(pickling.dumps(read_scale))
    assert setter.__globals__ is reader.__globals__
    assert setter.__globals__ is not globals()  # the worker's copy, not this module
    setter(7)
    assert reader() == 7
    # Unchanged in this process: a later pickle does not undo the worker's value.
    assert pickle.loads(pickling.dumps(read_scale))() == 7
    old_bytes = pickling.dumps(read_scale)
    try:
        SCALE = 11  # rebound here: the next pickle carries the newer binding
        newer = pickle.loads(pickling.dumps(read_scale))
        assert newer() == 11 and reader() == 11
        # An older pickle unpickled late (workers unpickle lazily) keeps the newer value.
        pickle.loads(old_bytes)
        assert reader() == 11
    finally:
        SCALE = 1


WORKER = """
import pickle, sys
first, second = pickle.loads(sys.stdin.buffer.read())
shape = pickle.loads(first)
shape.sides = 4          # the initializer stores something on the class
again = pickle.loads(second)
print(again is shape, again.sides)
"""


def test_a_class_arriving_again_keeps_what_the_worker_stored_on_it():
    from vmexec import pickling

    pickling.register_user_modules()
    # Two pickles made separately, as for an initializer and a later task.
    data = pickle.dumps((pickling.dumps(Shape), pickling.dumps(Shape)))
    out = subprocess.run([sys.executable, "-c", WORKER], input=data, capture_output=True,
                         timeout=60, check=True)
    assert out.stdout.split() == [b"True", b"4"]


# -- 2. errors that ``except BrokenProcessPool`` catches -------------------------------

def _exit() -> None:
    sys.exit(1)


def _unpickling_error() -> None:
    raise pickle.UnpicklingError("cannot load this")


class ExitAtUnpickle:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _exit, ()


class ErrorAtUnpickle:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _unpickling_error, ()


def return_instance(cls: type) -> object:
    return cls()


UNPICKLING_CASES = {
    "exit at task unpickle": (id, ExitAtUnpickle(), "arguments could not be unpickled on"),
    "error at task unpickle": (id, ErrorAtUnpickle(), "arguments could not be unpickled on"),
    "exit at result unpickle": (return_instance, ExitAtUnpickle, "unpickled on the client"),
    "error at result unpickle": (return_instance, ErrorAtUnpickle, "unpickled on the client"),
}


@pytest.mark.parametrize("case", sorted(UNPICKLING_CASES))
def test_unpickling_failures_are_broken_process_pool_for_that_future_only(make_executor,
                                                                          case):
    fn, arg, message = UNPICKLING_CASES[case]
    with ProcessPoolExecutor(1) as ppe:
        with pytest.raises(BrokenProcessPool):
            ppe.submit(fn, arg).result(timeout=60)
    with make_executor() as ex:
        future = ex.submit(fn, arg)
        with pytest.raises(DeserializationError, match=message) as info:
            future.result(timeout=60)
        assert isinstance(info.value, BrokenProcessPool)
        # Better than breaking the pool: the other futures and the executor go on.
        assert ex.submit(helpers.add, 1, 2).result(timeout=60) == 3


def test_an_unpicklable_map_item_is_broken_process_pool_for_that_item_only(make_executor):
    items = [1, ExitAtUnpickle(), 2]
    with ProcessPoolExecutor(1) as ppe:
        with pytest.raises(BrokenProcessPool):
            list(ppe.map(helpers.add, items))
    with make_executor() as ex:
        # map items travel in batches: the bad item must not take its neighbours along.
        futures = [ex.submit(helpers.add, i) for i in (1, 2)]
        results = ex.map(helpers.add, items)
        assert next(results) == 1
        with pytest.raises(DeserializationError, match="SystemExit"):
            next(results)
        assert [f.result(timeout=60) for f in futures] == [1, 2]
        assert list(ex.map(helpers.add, [5, 6, 7])) == [5, 6, 7]


def test_a_worker_that_dies_is_broken_process_pool_for_that_future_only(make_executor):
    with ProcessPoolExecutor(1) as ppe:
        with pytest.raises(BrokenProcessPool):
            ppe.submit(helpers.die_always).result(timeout=60)
    with make_executor(max_retries=0) as ex:
        with pytest.raises(WorkerLost) as info:
            ex.submit(helpers.die_always).result(timeout=60)
        assert isinstance(info.value, BrokenProcessPool)
        assert "max_retries=0" in str(info.value)
        assert ex.submit(helpers.add, 1, 2).result(timeout=60) == 3


def test_a_failing_initializer_is_broken_process_pool(make_executor):
    with ProcessPoolExecutor(1, initializer=helpers.init_fails) as ppe:
        with pytest.raises(BrokenProcessPool):
            ppe.submit(helpers.add, 1).result(timeout=60)
    ex = make_executor(initializer=helpers.init_fails)
    with pytest.raises(BrokenFleet) as info:
        ex.submit(helpers.add, 1).result(timeout=60)
    assert isinstance(info.value, BrokenProcessPool)
    with pytest.raises(BrokenProcessPool):
        ex.submit(helpers.add, 1)


def test_broken_process_pool_errors_keep_their_vmexec_names():
    for cls in (BrokenFleet, WorkerLost, DeserializationError):
        assert issubclass(cls, BrokenProcessPool) and issubclass(cls, VMExecError)
        assert cls.__name__ in repr(cls("why"))


# -- 4. max_workers is the number of concurrent calls on ssh too -----------------------

def wait_for_peers(directory: str, index: int, peers: int, timeout: float) -> int:
    """Mark this call as running, then wait (bounded) until ``peers`` calls run at once.

    Returns how many were seen running together: ``peers`` unless fewer slots exist.
    """
    Path(directory, f"running-{index}").touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = len(os.listdir(directory))
        if seen >= peers:
            return seen
        time.sleep(0.01)
    return len(os.listdir(directory))


def test_max_workers_is_concurrent_calls_on_one_ssh_host(sshd, tmp_path):
    # More calls than the host has CPUs: ProcessPoolExecutor runs them all at once.
    n = (os.cpu_count() or 1) + 2
    ppe_dir, vm_dir = tmp_path / "ppe", tmp_path / "vm"
    ppe_dir.mkdir()
    vm_dir.mkdir()
    with ProcessPoolExecutor(n) as ppe:
        expected = list(ppe.map(wait_for_peers, [str(ppe_dir)] * n, range(n), [n] * n,
                                [120] * n))
    with VMExecutor(n, **ssh_options(sshd, **FAST_TIMING)) as ex:
        seen = list(ex.map(wait_for_peers, [str(vm_dir)] * n, range(n), [n] * n, [120] * n))
        assert [m.slots for m in ex.fleet] == [n]
    assert seen == expected == [n] * n


def test_slots_per_host_still_sets_each_hosts_slots(sshd):
    with VMExecutor(3, **ssh_options(sshd, slots_per_host=1, **FAST_TIMING)) as ex:
        assert ex.submit(helpers.add, 1, 1).result(timeout=60) == 2
        assert [m.slots for m in ex.fleet] == [1]


def test_ssh_hosts_share_max_workers_evenly():
    hosts = ["h1", "h2", "h3"]
    assert [r.slots for r in SSHProvider(5, hosts=hosts[:2]).launch(1)] == [3, 2]
    assert [r.slots for r in SSHProvider(7, hosts=hosts).launch(1)] == [3, 2, 2]
    # Fewer slots than hosts: one each on the first hosts, the rest unused.
    assert [r.label.split("@")[1] for r in SSHProvider(2, hosts=hosts).launch(1)] == \
        ["h1:22", "h2:22"]
    # slots_per_host wins per host (the scheduler still caps the total at max_workers);
    # no max_workers: each host's CPU count (0).
    assert [r.slots for r in SSHProvider(2, hosts=hosts, slots_per_host=4).launch(1)] == \
        [4, 4, 4]
    assert [r.slots for r in SSHProvider(None, hosts=hosts).launch(1)] == [0, 0, 0]
