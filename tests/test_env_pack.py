"""conda-pack: a conda prefix built by the test (conda-meta records over real files) is
packed, unpacked as a machine does (``conda-unpack`` rewrites the prefix), installed by
the real install script, and refused for machines of another architecture."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vmexec.environment.capture import environment_hash, read_conda_records, resolve_environment
from vmexec.environment.install import build_artifacts, install_script
from vmexec.environment.pack import check_conda_arch, pack_environment, unpack
from vmexec.environment.spec import EnvSpec
from vmexec.errors import ConfigError, EnvSyncError
from vmexec.skew import read_machine_hash

pytest.importorskip("conda_pack")

PY_MINOR = f"{sys.version_info.major}.{sys.version_info.minor}"
SUBDIR = {"x86_64": "linux-64", "aarch64": "linux-aarch64"}.get(platform.machine(), "linux-64")


def _record(prefix: Path, name: str, version: str, files: list[str]) -> None:
    # What conda writes after linking a package; its package-cache source is gone
    # (as after `conda clean`), so conda-pack reads the files from the prefix itself.
    record = {
        "name": name, "version": version, "build": "h0_0", "build_number": 0,
        "channel": f"https://conda.anaconda.org/conda-forge/{SUBDIR}", "subdir": SUBDIR,
        "url": f"https://conda.anaconda.org/conda-forge/{SUBDIR}/{name}-{version}-h0_0.conda",
        "files": files, "link": {"source": str(prefix / "no-pkgs-cache" / name), "type": 1},
    }
    (prefix / "conda-meta" / f"{name}-{version}-h0_0.json").write_text(json.dumps(record))


@pytest.fixture
def conda_prefix(tmp_path: Path) -> Path:
    """A conda environment: python (a link to this interpreter) and a package with a
    module and a config file that embeds the prefix path (rewritten on unpack)."""
    prefix = tmp_path / "envs" / "demo"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "bin").mkdir()
    site = prefix / "lib" / f"python{PY_MINOR}" / "site-packages"
    site.mkdir(parents=True)
    (prefix / "etc").mkdir()
    os.symlink(os.path.realpath(sys.executable), prefix / "bin" / f"python{PY_MINOR}")
    os.symlink(f"python{PY_MINOR}", prefix / "bin" / "python")
    _record(prefix, "python", ".".join(map(str, sys.version_info[:3])),
            [f"bin/python{PY_MINOR}", "bin/python"])
    (site / "condademo.py").write_text("ANSWER = 42\n")
    (prefix / "etc" / "condademo.conf").write_text(f"home = {prefix}/share/condademo\n")
    _record(prefix, "condademo", "1.0",
            [f"lib/python{PY_MINOR}/site-packages/condademo.py", "etc/condademo.conf"])
    (prefix / "conda-meta" / "history").write_text("==> 2024-01-01 00:00:00 <==\n")
    return prefix


def _spec(prefix: Path) -> EnvSpec:
    packages, subdir = read_conda_records(str(prefix))
    return EnvSpec(python=".".join(map(str, sys.version_info[:3])), mode="conda-pack",
                   conda=tuple(packages), conda_prefix=str(prefix), conda_platform=subdir)


def test_pack_unpack_rewrites_prefix(conda_prefix: Path, tmp_path: Path) -> None:
    archive = pack_environment(str(conda_prefix), cache_dir=str(tmp_path / "cache"))
    # Packed once: an unchanged environment gives the same file.
    assert pack_environment(str(conda_prefix), cache_dir=str(tmp_path / "cache")) == archive
    dest = tmp_path / "machine" / "env"
    unpack(archive, str(dest))
    site = dest / "lib" / f"python{PY_MINOR}" / "site-packages"
    assert (site / "condademo.py").read_text() == "ANSWER = 42\n"
    assert (dest / "conda-meta" / "condademo-1.0-h0_0.json").exists()
    assert (dest / "bin" / "conda-unpack").exists()
    subprocess.run([str(dest / "bin" / "python"), str(dest / "bin" / "conda-unpack")],
                   check=True, timeout=60)
    assert (dest / "etc" / "condademo.conf").read_text() == f"home = {dest}/share/condademo\n"


def test_install_script_unpacks_the_pack(conda_prefix: Path, tmp_path: Path) -> None:
    spec = _spec(conda_prefix)
    assert spec.conda_platform == SUBDIR and {p.name for p in spec.conda} == {"python",
                                                                              "condademo"}
    artifacts = build_artifacts(spec, None, str(tmp_path / "work"), str(tmp_path / "cache"))
    assert [a.kind for a in artifacts] == ["pack"]
    arch = platform.machine()
    script = install_script(spec, arch, artifacts)
    root = tmp_path / "root"
    result = subprocess.run(["bash", "-c", script], env={**os.environ, "VMEXEC_ROOT": str(root)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    venv = root / "opt" / "vmexec" / "venv"
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import condademo; print(condademo.ANSWER)"],
                         env={**os.environ, "PYTHONPATH": str(venv / "lib" / f"python{PY_MINOR}"
                                                              / "site-packages")},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "42", out.stderr
    assert (venv / "etc" / "condademo.conf").read_text() == f"home = {venv}/share/condademo\n"
    assert read_machine_hash(str(root)) == environment_hash(spec)


def test_refused_for_another_architecture(conda_prefix: Path) -> None:
    spec = _spec(conda_prefix)
    mine = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}[SUBDIR]
    other = "aarch64" if mine == "x86_64" else "x86_64"
    check_conda_arch(spec, [mine])
    with pytest.raises(EnvSyncError) as info:
        check_conda_arch(spec, [mine, other])
    message = str(info.value)
    assert other in message and "environment='auto'" in message
    mac = dataclasses.replace(spec, conda_platform="osx-arm64")
    with pytest.raises(EnvSyncError, match="environment='auto'"):
        check_conda_arch(mac, [mine])
    with pytest.raises(EnvSyncError, match="no conda pack for"):
        install_script(spec, other, [])


def test_conda_pack_needs_a_conda_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a conda environment"):
        pack_environment(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    if not (Path(sys.prefix) / "conda-meta").exists():
        with pytest.raises(ConfigError, match="environment='auto'"):
            resolve_environment("conda-pack")
