"""The public surface: exactly the names in ``__all__``, all importable, all documented."""

from __future__ import annotations

import concurrent.futures
import inspect
import subprocess
import sys
from pathlib import Path

import vmexec
from vmexec import errors

ROOT = Path(__file__).resolve().parent.parent


def test_all_names_exist_and_are_documented():
    public = {name for name in dir(vmexec) if not name.startswith("_")}
    assert set(vmexec.__all__) - {"__version__"} <= public
    for name in vmexec.__all__:
        obj = getattr(vmexec, name)
        if inspect.isclass(obj):
            assert obj.__doc__, f"{name} needs a docstring"


def test_error_tree():
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.BrokenFleet, concurrent.futures.BrokenExecutor)
    for name in errors.__all__:
        cls = getattr(errors, name)
        if name != "RemoteTraceback":
            assert issubclass(cls, errors.VMExecError), name


def test_import_has_no_heavy_side_effects():
    code = ("import sys, vmexec; heavy = [m for m in ('boto3', 'paramiko', 'moto') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_py_typed_marker_ships():
    assert (ROOT / "vmexec" / "py.typed").exists()


def test_quickstart_example_runs_on_the_local_provider():
    env = {k: v for k, v in __import__("os").environ.items() if k != "VMEXEC_PROVIDER"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "20! = 2432902008176640000" in out.stdout
    assert "remote error: ValueError('math domain error')" in out.stdout
    assert "done: every machine is gone" in out.stdout
