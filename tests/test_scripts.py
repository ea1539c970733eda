"""Scripts that run on machines are files, and they are checked like code.

Every ``vmexec/**/scripts/*.sh`` passes ``shellcheck`` on its own (a script that needs
values from the generated header says so with a ``# shellcheck disable=SC2154`` line
and lists them), and every ``vmexec/**/scripts/*.py`` compiles. New script folders are
picked up by the glob: nothing to register.

Locally the shellcheck test skips when shellcheck is not installed
(``apt-get install shellcheck``); in CI (``$CI`` set) it fails instead, and ``.ci/run``
installs it.
"""

from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest

import vmexec

PACKAGE = Path(vmexec.__file__).resolve().parent
SHELL_SCRIPTS = sorted(PACKAGE.glob("**/scripts/*.sh"))
PYTHON_SCRIPTS = sorted(PACKAGE.glob("**/scripts/*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("shellcheck is not installed, and CI must check the scripts: "
                    ".ci/run installs it (apt-get install shellcheck)")
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")


def test_there_are_scripts_to_check() -> None:
    assert any(p.name == "install-common.sh" for p in SHELL_SCRIPTS), SHELL_SCRIPTS


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=_name)
def test_shell_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run([_shellcheck(), "--format=gcc", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"shellcheck {_name(script)}:\n{result.stdout}{result.stderr}"


def test_python_scripts_compile(tmp_path: Path) -> None:
    # One test for them all: there may be none yet, and an empty parametrize skips.
    for script in PYTHON_SCRIPTS:
        py_compile.compile(str(script), cfile=str(tmp_path / "out.pyc"), doraise=True)
