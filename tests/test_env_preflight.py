"""Preflight per architecture with uv: a package built for x86_64 only is refused for
aarch64 (offline, from a find-links folder the test fills with a real wheel), accepted
for x86_64; mixed-arch plans get one resolution each; one small real spec resolves
against the package index."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import sys
import zipfile
from pathlib import Path

import pytest

from vmexec.environment.preflight import clear_cache, normalize_arch, preflight
from vmexec.environment.spec import Distribution, EnvSpec
from vmexec.errors import ConfigError, EnvSyncError

PYTHON = ".".join(map(str, sys.version_info[:3]))
CP = f"cp{sys.version_info.major}{sys.version_info.minor}"


def make_wheel(folder: Path, name: str, version: str, tag: str) -> Path:
    """A real, installable wheel with one module, tagged ``tag``."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": (f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                          f"{'true' if tag.endswith('none-any') else 'false'}\nTag: {tag}\n"
                          ).encode(),
    }
    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = [f"{path},sha256={digest(data)},{len(data)}" for path, data in files.items()]
    record.append(f"{info}/RECORD,,")
    wheel = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("find-links")
    make_wheel(folder, "intelonly", "1.0", f"{CP}-{CP}-manylinux_2_28_x86_64")
    make_wheel(folder, "purepkg", "2.0", "py3-none-any")
    make_wheel(folder, "bothpkg", "3.0", f"{CP}-{CP}-manylinux_2_28_x86_64")
    make_wheel(folder, "bothpkg", "3.0", f"{CP}-{CP}-manylinux_2_28_aarch64")
    return folder


def spec_of(*requirements: str, **extra: object) -> EnvSpec:
    return EnvSpec(python=PYTHON, mode="requirements", requirements=requirements,
                   **extra)  # type: ignore[arg-type]


def test_no_build_for_aarch64_is_refused_before_launch(wheels: Path) -> None:
    spec = spec_of("intelonly==1.0", "purepkg==2.0")
    with pytest.raises(EnvSyncError) as info:
        preflight(spec, ["aarch64"], find_links=[str(wheels)])
    message = str(info.value)
    assert "intelonly==1.0 has no build for aarch64 (aarch64-manylinux_2_28" in message
    assert "manylinux_2_28_x86_64" in message  # where it does have wheels
    assert "pin another version" in message and "exclude=['intelonly']" in message
    assert "drop aarch64" in message
    assert info.value.package == "intelonly"  # type: ignore[attr-defined]
    assert info.value.platform == "aarch64-manylinux_2_28"  # type: ignore[attr-defined]

    accepted = preflight(spec, ["x86_64"], find_links=[str(wheels)])
    assert set(accepted) == {"x86_64"}
    assert accepted["x86_64"].packages == {"intelonly": "1.0", "purepkg": "2.0"}


def test_mixed_arch_plan_gets_one_resolution_per_arch(wheels: Path) -> None:
    spec = spec_of("bothpkg==3.0", "purepkg")
    results = preflight(spec, ["x86_64", "arm64", "aarch64"], find_links=str(wheels))
    assert sorted(results) == ["aarch64", "x86_64"]
    for arch, resolution in results.items():
        assert resolution.platform == f"{arch}-manylinux_2_28"
        assert resolution.packages == {"bothpkg": "3.0", "purepkg": "2.0"}
        assert resolution.spec_hash == spec.content_hash
        assert arch in resolution.summary()
    # A mixed plan with one unbuildable package names the failing arch only.
    with pytest.raises(EnvSyncError, match="no build for aarch64") as info:
        preflight(spec_of("intelonly==1.0"), ["x86_64", "aarch64"], find_links=str(wheels))
    assert "x86_64 (" not in str(info.value)


def test_results_are_cached_by_spec_arch_and_index(wheels: Path) -> None:
    clear_cache()
    spec = spec_of("purepkg==2.0")
    first = preflight(spec, ["x86_64"], find_links=[str(wheels)])
    again = preflight(spec, ["x86_64"], find_links=[str(wheels)])
    assert again["x86_64"] is first["x86_64"]  # the same object: not resolved again
    other_index = preflight(spec, ["x86_64"], find_links=[str(wheels), str(wheels)])
    assert other_index["x86_64"] is not first["x86_64"]


def test_local_compiled_packages_are_built_per_arch_not_resolved(wheels: Path) -> None:
    local = Distribution("fastlib", "0.1", source="editable", url="/src/fastlib",
                         compiled=True, source_hash="ab" * 32)
    spec = EnvSpec(python=PYTHON, mode="auto", distributions=(
        Distribution("purepkg", "2.0"), local))
    results = preflight(spec, ["x86_64", "aarch64"], find_links=[str(wheels)])
    for resolution in results.values():
        assert resolution.per_arch_builds == ("fastlib",)
        assert "fastlib" not in resolution.packages
        assert "built on the first" in resolution.summary()


def test_unresolvable_requirement_is_an_env_sync_error(wheels: Path) -> None:
    with pytest.raises(EnvSyncError, match="cannot be resolved for x86_64"):
        preflight(spec_of("doesnotexist==9.9"), ["x86_64"], find_links=[str(wheels)])


def test_architecture_names() -> None:
    assert normalize_arch("arm64") == "aarch64" and normalize_arch("AMD64") == "x86_64"
    with pytest.raises(ConfigError, match="unknown architecture"):
        normalize_arch("riscv64")
    with pytest.raises(ConfigError):
        preflight(spec_of("x"), [])


def test_small_real_spec_resolves_against_the_index() -> None:
    # cloudpickle is pure Python: whatever the index's state, this exact pin has a
    # wheel for every platform.
    version = importlib.metadata.version("cloudpickle")
    results = preflight(spec_of(f"cloudpickle=={version}"), ["x86_64", "aarch64"])
    assert {a: r.packages for a, r in results.items()} == {
        "x86_64": {"cloudpickle": version}, "aarch64": {"cloudpickle": version}}


def make_sdist(folder: Path, name: str, version: str) -> Path:
    """An sdist with static metadata (Metadata-Version 2.2: read without a build)."""
    import io
    import tarfile

    sdist = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for path, text in ((f"{name}-{version}/PKG-INFO",
                            f"Metadata-Version: 2.2\nName: {name}\nVersion: {version}\n"),
                           (f"{name}-{version}/pyproject.toml",
                            f'[project]\nname = "{name}"\nversion = "{version}"\n')):
            data = text.encode()
            item = tarfile.TarInfo(path)
            item.size = len(data)
            tar.addfile(item, io.BytesIO(data))
    return sdist


def test_source_only_packages(tmp_path: Path) -> None:
    # A package that publishes no wheel at all is refused (it would need building on
    # the machines, maybe with a compiler)...
    make_sdist(tmp_path, "sourceonly", "1.0")
    with pytest.raises(EnvSyncError, match="sourceonly==1.0 has no build for aarch64"):
        preflight(spec_of("sourceonly==1.0"), ["aarch64"], find_links=[str(tmp_path)])
    # ...unless it is installed here as pure Python: then it builds anywhere.
    try:
        six = importlib.metadata.distribution("six")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("six is not installed here (it is in the test extras: "
                    "pip install -e '.[test]')")
    if "none-any" not in (six.read_text("WHEEL") or ""):
        pytest.skip("six is installed here from something else than a pure wheel "
                    "(pip install --force-reinstall six)")
    make_sdist(tmp_path, "six", six.version)
    result = preflight(spec_of(f"six=={six.version}"), ["aarch64"],
                       find_links=[str(tmp_path)])["aarch64"]
    assert result.packages == {"six": six.version} and result.source_builds == ("six",)
