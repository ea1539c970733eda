"""Installing on a machine, for real: a captured spec (cloudpickle, psutil, a local module
folder, a local package built into a wheel) reproduced into a fresh venv with uv from
the package index, then a task pickled here imports the local module there. Plus the
script's shape, artifact caching by content hash and the version-skew guard."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmexec.environment.capture import capture, environment_hash, source_tree_hash
from vmexec.environment.install import (
    PreparedEnvironment,
    build_artifacts,
    build_code_wheel,
    install_script,
    repack_installed,
)
from vmexec.environment.preflight import preflight
from vmexec.environment.spec import Artifact, Distribution, EnvSpec
from vmexec.errors import EnvSyncError
from vmexec.skew import check_skew, read_machine_hash
from vmexec.pickling import dumps_callable

AGENT_PARTS = ("cloudpickle", "psutil")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder of the user's modules and a local package (setuptools, src layout)."""
    base = tmp_path_factory.mktemp("userproject")
    code = base / "code"
    (code / "shapes").mkdir(parents=True)
    (code / "geometry.py").write_text("def area(w, h):\n    return w * h\n")
    (code / "shapes" / "__init__.py").write_text("SIDES = {'triangle': 3}\n")
    package = base / "tinylocal"
    (package / "src" / "tinylocal").mkdir(parents=True)
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tinylocal"\nversion = "0.3"\n')
    (package / "src" / "tinylocal" / "__init__.py").write_text("VALUE = 42\n")
    return {"base": base, "code": code, "package": package, "cache": base / "cache"}


def subset_spec(project: dict[str, Path]) -> EnvSpec:
    """This environment's capture, cut down to the agent's two distributions, the local
    package and the code folder (a whole test environment would take minutes)."""
    spec = capture(paths=[str(project["code"])])
    keep = [d for d in spec.distributions if d.key in AGENT_PARTS]
    keep.append(Distribution("tinylocal", "0.3", "local", str(project["package"]),
                             source_hash=source_tree_hash(str(project["package"]))))
    return dataclasses.replace(spec, distributions=tuple(keep))


def run_script(script: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # As on a machine: the script's own UV_CACHE_DIR (under the root), not the caller's.
    base = {k: v for k, v in os.environ.items() if k != "UV_CACHE_DIR"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=300, env={**base, "VMEXEC_ROOT": str(root), **env})


def task() -> Any:
    # Runs in the machine's venv: imports the user's module and the local package there.
    import geometry
    import shapes
    import tinylocal

    return geometry.area(6, 7), shapes.SIDES["triangle"], tinylocal.VALUE


def test_reproduce_spec_into_fresh_venv_and_import_local_code(project: dict[str, Path],
                                                               tmp_path: Path) -> None:
    spec = subset_spec(project)
    resolutions = preflight(spec, ["x86_64", "aarch64"])
    artifacts = build_artifacts(spec, resolutions, str(tmp_path / "work"),
                                str(project["cache"]))
    assert sorted(a.kind for a in artifacts) == ["code", "lock", "lock", "wheel"]
    prepared = PreparedEnvironment(spec, resolutions, artifacts)
    script = prepared.script()
    assert "<<" not in script  # no heredocs: it is embedded in user-data as is
    root = tmp_path / "machine"
    result = run_script(script, root, PY=sys.executable)
    assert result.returncode == 0, result.stdout + result.stderr
    venv_python = root / "opt" / "vmexec" / "venv" / "bin" / "python"

    # A task pickled here as vmexec pickles user functions (by value) runs there. Its
    # worker unpickles it with vmexec importable (code sent by value binds to
    # vmexec.agent.namespaces); the cut-down spec leaves vmexec out, so point at it.
    _, payload = dumps_callable(task)
    vmexec_parent = str(Path(dumps_callable.__code__.co_filename).resolve().parent.parent)
    ran = subprocess.run(
        [str(venv_python), "-c", "import sys, pickle; "
         "print(pickle.loads(sys.stdin.buffer.read())())"],
        input=payload.decode("latin-1"), capture_output=True, text=True, encoding="latin-1",
        cwd=str(tmp_path), timeout=60,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": vmexec_parent})
    assert ran.stdout.strip() == "(42, 3, 42)", ran.stderr
    frozen = subprocess.run([str(venv_python), "-m", "pip", "--version"],
                            capture_output=True, text=True)
    assert frozen.returncode != 0  # uv venv: nothing but what the spec installs

    # The machine records the environment; a re-run with the same hash is a no-op (its
    # output says so: judged by what it did, not by a wall clock on a busy box).
    assert read_machine_hash(str(root)) == environment_hash(spec)
    check_skew(environment_hash(spec), read_machine_hash(str(root)))
    again = run_script(script, root, PY=sys.executable)
    assert again.returncode == 0 and "already installed" in again.stdout
    assert "installed in" not in again.stdout  # vx_done did not run again
    assert any((root / "var" / "cache" / "vmexec" / "uv").iterdir())  # UV_CACHE_DIR


def test_only_the_changed_artifact_changes(project: dict[str, Path], tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "alpha.py").write_text("A = 1\n")
    (code / "beta.py").write_text("B = 1\n")

    def build(folder: str) -> tuple[EnvSpec, dict[str, Artifact]]:
        spec = dataclasses.replace(subset_spec(project), local_code=tuple(
            capture(paths=[str(code)]).local_code))
        made = build_artifacts(spec, None, str(tmp_path / folder), str(project["cache"]))
        return spec, {a.kind: a for a in made}

    spec1, first = build("one")
    spec2, second = build("two")
    assert spec1.content_hash == spec2.content_hash
    assert {k: a.sha256 for k, a in first.items()} == {k: a.sha256 for k, a in second.items()}
    (code / "beta.py").write_text("B = 2\n")
    spec3, third = build("three")
    assert spec3.content_hash != spec1.content_hash
    changed = {k for k in first if first[k].sha256 != third[k].sha256}
    assert changed == {"code"}
    assert first["code"].name != third["code"].name  # a new version: no stale uv cache


def test_a_code_change_resyncs_only_the_code(project: dict[str, Path], tmp_path: Path) -> None:
    """A machine that has the environment gets only the user's changed code reinstalled:
    what a named fleet reused after an edit does (no new venv, no requirements)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "geometry.py").write_text("def area(w, h):\n    return w * h\n")

    def prepare(folder: str) -> PreparedEnvironment:
        spec = dataclasses.replace(subset_spec(project), local_code=tuple(
            capture(paths=[str(code)]).local_code))
        resolutions = preflight(spec, ["x86_64"])
        return PreparedEnvironment(spec, resolutions, build_artifacts(
            spec, resolutions, str(tmp_path / folder), str(project["cache"])))

    def area_on_machine() -> str:
        ran = subprocess.run([str(root / "opt" / "vmexec" / "venv" / "bin" / "python"), "-c",
                              "import geometry; print(geometry.area(2, 3))"],
                             capture_output=True, text=True, cwd=str(tmp_path), timeout=60,
                             env={"PATH": os.environ["PATH"]})
        assert ran.returncode == 0, ran.stderr
        return ran.stdout.strip()

    first = prepare("one")
    root = tmp_path / "machine"
    installed = run_script(first.script(), root, PY=sys.executable)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert area_on_machine() == "6"
    marker = root / "opt" / "vmexec" / "venv" / "made-by-the-first-install"
    marker.write_text("")

    # The same environment captured by another client (another capture time): kept.
    later = dataclasses.replace(first.spec, captured_at=first.spec.captured_at + 60)
    same = run_script(PreparedEnvironment(later, first.resolutions, first.artifacts).script(),
                      root, PY=sys.executable)
    assert same.returncode == 0 and "already installed" in same.stdout, same.stdout

    (code / "geometry.py").write_text("def area(w, h):\n    return 2 * w * h\n")
    second = prepare("two")
    assert second.spec.base_hash == first.spec.base_hash
    assert second.spec.content_hash != first.spec.content_hash
    resynced = run_script(second.script(), root, PY=sys.executable)
    assert resynced.returncode == 0, resynced.stdout + resynced.stderr
    assert "only the local code changed" in resynced.stdout
    assert "uv venv" not in resynced.stdout and marker.exists()  # the venv was kept
    assert area_on_machine() == "12"
    assert read_machine_hash(str(root)) == environment_hash(second.spec)

    # A requirement change is not "only the code": the base differs, the venv is rebuilt.
    more = dataclasses.replace(second.spec, distributions=(
        *second.spec.distributions, Distribution("six", "1.16.0")))
    assert more.base_hash != second.spec.base_hash


def test_multi_arch_script_dispatches_on_uname(project: dict[str, Path], tmp_path: Path) -> None:
    spec = EnvSpec(python=".".join(map(str, sys.version_info[:3])), mode="requirements",
                   requirements=("cloudpickle",))
    lock_x = tmp_path / "lock-x.txt"
    lock_x.write_text("cloudpickle==3.0.0\n")
    lock_a = tmp_path / "lock-a.txt"
    lock_a.write_text("cloudpickle==3.0.0\n")
    artifacts = [Artifact.from_file(str(lock_x), "lock", arch="x86_64"),
                 Artifact.from_file(str(lock_a), "lock", arch="aarch64")]
    script = install_script(spec, ["x86_64", "arm64"], artifacts,
                            index_url="https://mirror.example/simple")
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert "vx_install_x86_64()" in script and "vx_install_aarch64()" in script
    x86_part = script.split("vx_install_x86_64()")[1].split("vx_install_aarch64()")[0]
    assert "lock-x.txt" in x86_part and "lock-a.txt" not in x86_part
    assert "--index-url https://mirror.example/simple" in script
    # A machine of an architecture nobody prepared for says so (uname is faked).
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "uname").write_text("#!/bin/sh\necho riscv64\n")
    (shims / "uname").chmod(0o755)
    result = run_script(script, tmp_path / "m", PATH=f"{shims}:{os.environ['PATH']}")
    assert result.returncode != 0
    assert "no environment was prepared for riscv64 machines" in result.stdout
    with pytest.raises(EnvSyncError, match="no requirements lock for aarch64"):
        install_script(spec, "aarch64", artifacts[:1])


def test_corrupted_artifact_fails_through_the_boot_scripts_fail(tmp_path: Path) -> None:
    spec = EnvSpec(python=".".join(map(str, sys.version_info[:3])), mode="requirements",
                   requirements=("cloudpickle",))
    lock = tmp_path / "lock.txt"
    lock.write_text("cloudpickle\n")
    artifact = Artifact.from_file(str(lock), "lock")
    lock.write_text("something else\n")
    boot = 'fail() { printf "%s\\n" "$*" >"$VMEXEC_ROOT/failed"; exit 3; }\n'
    result = run_script(boot + install_script(spec, "x86_64", [artifact]), tmp_path / "m")
    assert result.returncode == 3
    assert "sha256 mismatch" in (tmp_path / "m" / "failed").read_text()


def test_code_wheel_and_repack_are_deterministic(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mod.py").write_text("X = 1\n")
    [code] = capture(paths=[str(tmp_path / "src")]).local_code
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = Path(build_code_wheel(code, str(tmp_path / "a")))
    two = Path(build_code_wheel(code, str(tmp_path / "b")))
    assert one.read_bytes() == two.read_bytes()
    (tmp_path / "src" / "mod.py").write_text("X = 2\n")
    with pytest.raises(EnvSyncError, match="capture it again"):
        build_code_wheel(code, str(tmp_path / "a"))
    wheel = Path(repack_installed("cloudpickle", str(tmp_path)))
    assert wheel.name.startswith("cloudpickle-") and wheel.stat().st_size > 10_000


def test_skew_guard_names_the_stale_side() -> None:
    check_skew(None, "abc 1")  # environment=None: nothing to compare
    check_skew("abc 100", "abc 5")  # same environment, captured at other times
    with pytest.raises(EnvSyncError) as stale_machine:
        check_skew("new 2000000000", "old 1700000000", machine="vm-7")
    text = str(stale_machine.value)
    assert "vm-7 is STALE" in text and "environment='auto'" in text and "vmexec env" in text
    with pytest.raises(EnvSyncError, match="this client's environment .* is OLDER"):
        check_skew("old 1700000000", "new 2000000000")


def test_through_the_local_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plan -> preflight -> staging in moto's S3 -> user-data -> uv on a fake VM -> a task
    imports the user's module there, with a forwarded variable -> teardown removes the
    staging bucket. Runs once the EC2 provider takes ``environment=``."""
    from vmexec.testing.sshd import sshd_available

    pytest.importorskip("moto")
    if sshd_available() is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the local-cloud tests but: {sshd_available()}")
        pytest.skip(f"needs OpenSSH's sshd: {sshd_available()} (apt-get install openssh-server)")
    from vmexec import VMExecutor
    from vmexec.testing.localcloud import LocalCloud

    code = tmp_path / "project"
    code.mkdir()
    (code / "fleetmath.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.chdir(code)
    monkeypatch.syspath_prepend(str(code))

    def remote(x: int) -> tuple[int, str, str]:
        import fleetmath

        return fleetmath.triple(x), os.environ.get("FLEET_MODE", ""), sys.prefix

    # The cloud's index serves vmexec's own requirements only, for this architecture:
    # a requirements environment (plus the agent's pins, vmexec's wheel, the code).
    with LocalCloud(regions=["us-east-1"], vm_tools=("uv",)) as cloud:
        options = cloud.executor_options(environment=["tenacity"], env={"FLEET_MODE": "on"})
        with VMExecutor(2, provider="ec2", instance_type="c7i.large", regions=["us-east-1"],
                        heartbeat_interval=0.5, boot_timeout=180.0, **options) as ex:
            results = list(ex.map(remote, range(4)))
        assert [r[0] for r in results] == [0, 3, 6, 9]
        assert {r[1] for r in results} == {"on"}
        assert all(r[2].endswith("/opt/vmexec/venv") for r in results)
        assert cloud.tagged_resources() == []
        s3 = cloud.session.client("s3", region_name="us-east-1",
                                  endpoint_url=cloud.endpoint_url)
        assert s3.list_buckets()["Buckets"] == []
        assert cloud.offmachine_requests == []
