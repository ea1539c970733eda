"""`vmexec compare` and `vmexec env` from the command line (local provider)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMEXEC_PROVIDER="local")
    return subprocess.run([sys.executable, "-m", "vmexec.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_compare_prints_a_table_for_each_type():
    out = run("compare", "examples.compare_types:workload", "20000",
              "--types", "c7g.large,c7i.large", "--repeat", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["type", "arch", "region"]
    assert lines[1].startswith("c7g.large") and lines[2].startswith("c7i.large")


def test_compare_names_a_bad_function():
    out = run("compare", "examples.compare_types:nope", "--types", "x")
    assert out.returncode == 2 and "cannot import examples.compare_types:nope" in out.stderr


def test_env_prints_the_captured_environment():
    out = run("env")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Python 3.")
    assert "cloudpickle==" in out.stdout
