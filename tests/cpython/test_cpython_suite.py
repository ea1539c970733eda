"""CPython's own ``test_concurrent_futures``, run against ``VMExecutor`` on local and ssh.

The module comes from the interpreter's test package, or where Debian installs it
(``apt-get install libpython3.11-testsuite``); it is not copied into this repository.
Its ProcessPool test mixins are rebound to build ``VMExecutor(provider="local")`` and
``VMExecutor(provider="ssh", hosts=[a real sshd on loopback])``, and every test of the
executor test classes runs with unittest, one pytest test each, except:

* ``EXCLUDED``: tests that cannot apply to an executor whose workers are on other
  machines (ProcessPoolExecutor's private attributes, objects that only inheritance can
  share such as multiprocessing queues, semaphores and managers, scripts that import
  the executor class by name from ``concurrent.futures``), each with its reason;
* ``EXPECTED_TO_FAIL``: tests that still fail, each with the reason (strict: when the
  reason is fixed the test passes and must move out of the list).

Mixins mark the executor as "spawn": like the spawn context, a worker starts without the
client's module state and gets the user's code sent to it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import unittest
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest

from conftest import FAST_TIMING, ssh_options
from vmexec import VMExecutor

MODULE_NAME = "test.test_concurrent_futures"
DEBIAN_PATH = "/usr/lib/python{0}.{1}/test/test_concurrent_futures.py"
INSTALL_HINT = ("install it with `apt-get install libpython{0}.{1}-testsuite` (Debian/Ubuntu), "
                "or set VMEXEC_CPYTHON_TESTS to the path of test_concurrent_futures.py")


def _load() -> tuple[Optional[ModuleType], str]:
    """CPython's test module, or why it is not available here."""
    try:
        return importlib.import_module(MODULE_NAME), ""
    except ImportError:
        pass
    path = os.environ.get("VMEXEC_CPYTHON_TESTS") or DEBIAN_PATH.format(*sys.version_info)
    if not os.path.isfile(path):
        return None, (f"CPython's {MODULE_NAME} is not in this interpreter's test package "
                      f"nor at {path}: " + INSTALL_HINT.format(*sys.version_info))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[MODULE_NAME]
        return None, f"{path} does not import with Python {sys.version.split()[0]}: {exc!r}"
    return module, ""


cf, WHY_MISSING = _load()

# The executor test classes, as the CPython module defines them for ProcessPoolExecutor
# (FutureTests tests concurrent.futures.Future itself; the ThreadPool classes another
# executor).
SUITES = ("InitializerMixin", "FailingInitializerMixin", "ProcessPoolShutdownTest",
          "WaitTests", "AsCompletedTests", "ProcessPoolExecutorTest", "ExecutorDeadlockTest")

PRIVATE = "reads ProcessPoolExecutor's private attributes ({})"
INHERITED = "passes {} to the workers: multiprocessing shares them only by inheritance, " \
            "a worker on another machine cannot reach them"
BY_NAME = ("runs a script that imports the executor class by name from concurrent.futures; "
           "the adapted copy below (test_adapted_*) runs the same script with VMExecutor")

EXCLUDED = {
    "FailingInitializerMixin.test_initializer":
        INHERITED.format("a multiprocessing Queue (the initializer's log queue)") + "; "
        + PRIVATE.format("_broken") + " (tests/test_dropin.py::"
        "test_a_failing_initializer_is_broken_process_pool covers the behaviour)",
    "ProcessPoolShutdownTest.test_interpreter_shutdown": BY_NAME,
    "ProcessPoolShutdownTest.test_submit_after_interpreter_shutdown": BY_NAME,
    "ProcessPoolShutdownTest.test_hang_gh83386":
        "CPython skips it for ProcessPoolExecutor (it hangs there, cpython#83386), and its "
        "script imports the executor class by name from concurrent.futures",
    "ProcessPoolShutdownTest.test_processes_terminate":
        PRIVATE.format("_processes") + "; " + INHERITED.format("a multiprocessing Semaphore"),
    "ProcessPoolShutdownTest.test_context_manager_shutdown":
        "builds a ProcessPoolExecutor itself (not through the mixin) and "
        + PRIVATE.format("_processes"),
    "ProcessPoolShutdownTest.test_del_shutdown":
        "builds a ProcessPoolExecutor itself (not through the mixin) and "
        + PRIVATE.format("_processes, _call_queue, _executor_manager_thread"),
    "ProcessPoolShutdownTest.test_shutdown_no_wait":
        "builds a ProcessPoolExecutor itself (not through the mixin) and "
        + PRIVATE.format("_processes, _call_queue, _executor_manager_thread"),
    "ProcessPoolExecutorTest.test_max_workers_too_large":
        "Windows only (the 61-process limit of WaitForMultipleObjects)",
    "ProcessPoolExecutorTest.test_killed_child":
        PRIVATE.format("_processes, to kill a worker") + " (tests/test_dropin.py::"
        "test_a_worker_that_dies_is_broken_process_pool_for_that_future_only covers it)",
    "ProcessPoolExecutorTest.test_traceback":
        "checks that the cause's type is exactly the private "
        "concurrent.futures.process._RemoteTraceback; vmexec chains its public "
        "RemoteTraceback with the same .tb text (the adapted copy below checks that)",
    "ProcessPoolExecutorTest.test_ressources_gced_in_workers":
        INHERITED.format("a multiprocessing Manager's Event"),
    "ProcessPoolExecutorTest.test_saturation":
        PRIVATE.format("_processes") + "; " + INHERITED.format("a multiprocessing Semaphore"),
    "ProcessPoolExecutorTest.test_idle_process_reuse_one": PRIVATE.format("_processes"),
    "ProcessPoolExecutorTest.test_idle_process_reuse_multiple": PRIVATE.format("_processes"),
    "ProcessPoolExecutorTest.test_max_tasks_per_child":
        PRIVATE.format("_processes") + " (tests/test_contract.py::"
        "test_max_tasks_per_child_replaces_workers covers the behaviour)",
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context":
        PRIVATE.format("_mp_context"),
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle":
        PRIVATE.format("_executor_manager_thread"),
}

# Tests that still fail, each with its reason (none today).
EXPECTED_TO_FAIL: dict[str, str] = {}


def _applicable_tests() -> list[str]:
    if cf is None:
        return []
    names = []
    for suite in SUITES:
        cls = getattr(cf, suite)
        names += [f"{suite}.{name}" for name in unittest.TestLoader().getTestCaseNames(cls)]
    return names


# -- the mixin: VMExecutor in place of ProcessPoolExecutor ----------------------------

class VMExecutorMixin:
    """Rebinds CPython's ExecutorMixin to VMExecutor (``vm_options`` set per provider)."""

    ctx = "spawn"
    vm_options: dict[str, Any] = {}

    def executor_type(self, max_workers: Optional[int] = None, mp_context: Any = None,
                      **kwargs: Any) -> VMExecutor:
        # mp_context is the mixin's "spawn": VMExecutor has no other start method.
        return VMExecutor(max_workers, **self.vm_options, **kwargs)


def _test_case(name: str, options: dict[str, Any]) -> unittest.TestCase:
    assert cf is not None
    suite, method = name.split(".")
    bases = (getattr(cf, suite), VMExecutorMixin, cf.ExecutorMixin, cf.BaseTestCase)
    cls = type(f"VMExecutor{suite}", bases,
               {"vm_options": options, "__module__": __name__})
    return cls(method)


def _run(case: unittest.TestCase) -> unittest.TestResult:
    result = unittest.TestResult()
    case.run(result)
    return result


def _report(result: unittest.TestResult) -> str:
    return "\n".join(text for _, text in result.errors + result.failures)


@pytest.fixture(params=["local", "ssh"])
def vm_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    if cf is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run CPython's suite but {WHY_MISSING}")
        pytest.skip(WHY_MISSING)
    if request.param == "local":
        return {"provider": "local", **FAST_TIMING}
    return ssh_options(request.getfixturevalue("sshd"), **FAST_TIMING)


def _params() -> list[Any]:
    params = []
    for name in _applicable_tests():
        if name in EXCLUDED:
            continue
        marks = []
        if name in EXPECTED_TO_FAIL:
            marks.append(pytest.mark.xfail(reason=EXPECTED_TO_FAIL[name], strict=True))
        params.append(pytest.param(name, id=name, marks=marks))
    return params or [pytest.param(None, id="missing")]


@pytest.mark.parametrize("name", _params())
def test_cpython(name: Optional[str], vm_options: dict[str, Any]) -> None:
    assert name is not None
    result = _run(_test_case(name, vm_options))
    assert not result.skipped, f"{name} skipped itself: {result.skipped}"
    assert result.wasSuccessful(), _report(result)
    assert result.testsRun == 1


def test_every_cpython_executor_test_is_run_or_excluded_with_a_reason(vm_options) -> None:
    names = set(_applicable_tests())
    assert len(names) > 40, sorted(names)
    unknown = (set(EXCLUDED) | set(EXPECTED_TO_FAIL)) - names
    assert not unknown, f"listed but not in CPython's module: {sorted(unknown)}"
    assert not set(EXCLUDED) & set(EXPECTED_TO_FAIL)


# -- adapted copies of the tests excluded above for naming ProcessPoolExecutor ---------

SHUTDOWN_SCRIPT = """if 1:
    import json, sys
    from vmexec import VMExecutor
    from test.test_concurrent_futures import sleep_and_print
    if __name__ == "__main__":
        t = VMExecutor(5, **json.loads(sys.argv[1]))
        t.submit(sleep_and_print, 1.0, "apple")
"""

SUBMIT_AFTER_SHUTDOWN_SCRIPT = """if 1:
    import atexit, json, sys
    @atexit.register
    def run_last():
        try:
            t.submit(id, None)
        except RuntimeError:
            print("runtime-error")
            raise
    from vmexec import VMExecutor
    if __name__ == "__main__":
        t = VMExecutor(5, **json.loads(sys.argv[1]))
        t.submit(id, 42).result()
"""


def _python(script: str, options: dict[str, Any]) -> subprocess.CompletedProcess:
    import json

    assert cf is not None
    # The child imports CPython's module the way this runner found it.
    env = {k: v for k, v in os.environ.items() if k != "VMEXEC_PROVIDER"}
    path = Path(cf.__file__).resolve()
    preload = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location("
               f"{MODULE_NAME!r}, {str(path)!r}); m = importlib.util.module_from_spec(s); "
               f"sys.modules[{MODULE_NAME!r}] = m; s.loader.exec_module(m)\n")
    return subprocess.run([sys.executable, "-c", preload + textwrap.dedent(script),
                           json.dumps(options)], capture_output=True, timeout=300, env=env)


def test_adapted_interpreter_shutdown(vm_options: dict[str, Any]) -> None:
    """CPython's test_interpreter_shutdown: interpreter exit finishes the submitted work.

    CPython reads "apple" on the child's stdout (workers inherit it) and an empty stderr.
    vmexec forwards what a worker prints through logging, prefixed with the machine,
    which goes to stderr while the application has not configured logging, followed by
    the cost line.
    """
    out = _python(SHUTDOWN_SCRIPT, vm_options)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b""
    printed = [line for line in out.stderr.decode().splitlines() if line.endswith(" apple")]
    assert len(printed) == 1 and printed[0].startswith("["), out.stderr.decode()
    assert "Traceback" not in out.stderr.decode(), out.stderr.decode()


def test_adapted_submit_after_interpreter_shutdown(vm_options: dict[str, Any]) -> None:
    out = _python(SUBMIT_AFTER_SHUTDOWN_SCRIPT, vm_options)
    assert "RuntimeError: cannot schedule new futures" in out.stderr.decode()
    assert out.stdout.strip() == b"runtime-error"


def test_adapted_traceback(vm_options: dict[str, Any]) -> None:
    """CPython's test_traceback with vmexec's public RemoteTraceback as the cause."""
    from vmexec import RemoteTraceback

    assert cf is not None
    with VMExecutor(2, **vm_options) as executor:
        future = executor.submit(_raise_runtime_error)
        with pytest.raises(RuntimeError) as info:
            future.result(timeout=120)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is RemoteTraceback
    assert "raise RuntimeError(123) # some comment" in exc.__cause__.tb


def _raise_runtime_error() -> None:
    raise RuntimeError(123) # some comment


# In a fresh interpreter, so that no thread started by an earlier test hides one.
THREADS_SCRIPT = """if 1:
    import json, sys, threading
    from vmexec import VMExecutor
    before = set(threading.enumerate())
    executor = VMExecutor(5, **json.loads(sys.argv[1]))
    assert executor.submit(pow, 2, 8).result() == 256
    executor.shutdown(wait=True)
    print(json.dumps(sorted(t.name for t in threading.enumerate()
                            if t not in before and t.is_alive())))
"""


def test_shutdown_wait_leaves_no_thread_running(vm_options: dict[str, Any]) -> None:
    """CPython's BaseTestCase.tearDown (threading_cleanup) only warns when a test leaves
    threads running; here a thread the executor started and shutdown(wait=True) did not
    join fails the test."""
    import json

    out = _python(THREADS_SCRIPT, vm_options)
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout.decode().splitlines()[-1]) == []
