"""Smaller hardening items of issue 12 (item 8): SIGHUP tears the fleet down like SIGTERM;
paramiko is new enough to resist Terrapin; the user's code ships without dotfiles
(``.env``) and without what ``.gitignore`` names; the boot script never runs an unpinned
download (``curl | sh``).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from vmexec.environment.capture import find_local_code, source_tree_hash
from vmexec.environment.build import _copy_project
from vmexec.providers.ec2.userdata import BootSpec, FleetKeys, render_userdata

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11 in CI
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_sighup_tears_the_fleet_down(tmp_path: Path, server_url: str) -> None:
    from test_ec2_teardown import REGIONS, run_client, server_leftovers

    proc = run_client(tmp_path, server_url, "wait")
    assert {r.kind for r in server_leftovers(server_url, REGIONS)} >= {"instance"}
    proc.send_signal(signal.SIGHUP)  # the terminal closed, or the SSH session dropped
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, stderr[-3000:]
    assert "SIGHUP: tearing down 1 EC2 fleet" in stderr
    assert server_leftovers(server_url, REGIONS) == [], stderr[-3000:]


def test_paramiko_is_at_least_3_4() -> None:
    """paramiko 3.4 is the first with the Terrapin (CVE-2023-48795) countermeasure."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [paramiko] = [Requirement(r) for r in project["dependencies"]
                  if Requirement(r).name == "paramiko"]
    assert not paramiko.specifier.contains(Version("3.3.9"))
    assert paramiko.specifier.contains(Version("3.4.0"))


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    pkg = root / "mypkg"
    (pkg / "cache").mkdir(parents=True)
    (root / ".git").mkdir()  # the repository root: its .gitignore applies
    (root / ".gitignore").write_text("*.secret\n/mypkg/cache/\n!keep.secret\n")
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "model.py").write_text("Y = 2\n")
    (pkg / ".env").write_text("AWS_SECRET_ACCESS_KEY=do-not-ship\n")
    (pkg / "token.secret").write_text("do-not-ship\n")
    (pkg / "keep.secret").write_text("shipped: negated rule\n")
    (pkg / "cache" / "big.bin").write_text("do-not-ship\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'mypkg'\nversion = '1'\n")
    return root


def test_code_capture_skips_dotfiles_and_gitignored_files(tmp_path: Path) -> None:
    root = _project(tmp_path)
    [code] = find_local_code([str(root)])
    shipped = {path for path, _ in code.files}
    assert shipped == {"mypkg/__init__.py", "mypkg/model.py", "mypkg/keep.secret"}
    # What is not shipped does not change the project's hash either.
    before = source_tree_hash(str(root))
    (root / "mypkg" / ".env").write_text("changed\n")
    (root / "mypkg" / "token.secret").write_text("changed\n")
    assert source_tree_hash(str(root)) == before


def test_local_package_builds_skip_dotfiles_and_gitignored_files(tmp_path: Path) -> None:
    root = _project(tmp_path)
    tree = Path(_copy_project(str(root), str(tmp_path / "build")))
    copied = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}
    assert copied == {"pyproject.toml", "mypkg/__init__.py", "mypkg/model.py",
                      "mypkg/keep.secret"}


def test_boot_script_downloads_nothing_unpinned() -> None:
    keys = FleetKeys("vmx-pin")
    try:
        script = render_userdata(BootSpec(
            fleet_id="vmx-pin", client_public_key=keys.client_public,
            host_private_key=keys.host_private, host_public_key=keys.host_public))
    finally:
        keys.remove()
    assert "astral.sh" not in script and "| sh" not in script
    assert "install --user" not in script
