"""vmexec's pytest plugin, as a user's suite uses it: examples/user_project's own tests
run in a separate pytest, with the fixtures the plugin provides (vmexec_cloud,
vmexec_executor, the vmexec marker) on the local cloud."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "user_project"


def test_the_example_projects_suite_passes_with_the_plugins_fixtures() -> None:
    from vmexec.testing.sshd import sshd_available

    if sshd_available() is not None:
        pytest.fail(f"the local cloud needs OpenSSH's sshd: {sshd_available()}")
    registered = any(ep.value == "vmexec.testing.pytest_plugin"
                     for ep in importlib.metadata.entry_points(group="pytest11"))
    # Installed vmexec registers the plugin through its entry point; an editable install
    # made before the entry point existed does not: load it by name then.
    load = [] if registered else ["-p", "vmexec.testing.pytest_plugin"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *load], cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout
