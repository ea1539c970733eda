"""The machines' package index: the wheels a fake VM installs, with no internet.

Owns ``build_wheelhouse``: the vmexec wheel built from this checkout (or repacked from
the installed distribution), its requirements and the agent's (cloudpickle, psutil)
with their dependency closure, repacked from the distributions installed in this
interpreter (offline, the client's exact versions), and on request the same versions'
wheels for other architectures; laid out as a PEP 503 ``/simple/`` index and a flat
``/files/`` find-links page, which ``vmexec.testing.network`` serves over HTTP.

Reuses the product for what the product already does: repacking an installed
distribution (``environment.install.repack_installed``), hashing a source tree
(``environment.capture.source_tree_hash``), normalising names and architectures
(``environment.spec.normalize_name``, ``environment.preflight.normalize_arch``) and
finding uv (``environment.preflight.find_uv``).

Must not import: boto3, moto, paramiko, the scheduler or the executor.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

from vmexec.environment import install
from vmexec.environment.capture import _file_sha256, source_tree_hash
from vmexec.environment.preflight import find_uv, normalize_arch
from vmexec.environment.spec import normalize_name
from vmexec.errors import EnvSyncError
from vmexec.testing.vmhost import FakeVMError

__all__ = ["build_wheelhouse", "other_architecture_wheels", "requirement_closure",
           "repack_installed", "real_tool", "AGENT_REQUIREMENTS"]

log = logging.getLogger(__name__)

#: The distributions the agent needs on a machine besides vmexec itself.
AGENT_REQUIREMENTS = ("cloudpickle", "psutil")

# Built vmexec wheels by source digest: every cloud of one test run shares one build.
_BUILT: dict[str, Path] = {}
_BUILD_LOCK = threading.Lock()


def build_wheelhouse(dest: Path, extra: Iterable[str] = (),
                     architectures: Iterable[str] = ()) -> list[Path]:
    """Fill ``dest`` with the wheels a machine needs and a PEP 503 index of them.

    vmexec is built from this checkout (``uv build``, else ``pip wheel``; about a second,
    once per process and source state). Its runtime requirements, the agent's
    (cloudpickle, psutil) and ``extra`` are served with their whole dependency closure,
    repacked from the distributions installed in this interpreter: offline, the client's
    exact versions, once per process (about 2 s, mostly cryptography's 14 MB; a boot
    script that installs vmexec with ``--no-deps`` needs only the agent's two).

    Layout: ``dest/files/*.whl`` (a flat find-links page) and ``dest/simple/<name>/``.

    Args:
        dest: the directory (created).
        extra: more installed distributions to serve.
        architectures: serve these architectures' wheels too (``"aarch64"``,
            ``"x86_64"``): for each served wheel built for a platform, the same version's
            wheel for each other architecture is downloaded from the package index
            (``pip download``, cached per user), so that preflight resolves a mixed
            fleet against this index.

    Returns:
        The wheel files.

    Raises:
        FakeVMError: vmexec cannot be built, or a distribution is not installed.
    """
    files = dest / "files"
    files.mkdir(parents=True, exist_ok=True)
    vmexec_wheel = _build_vmexec(files)
    with zipfile.ZipFile(vmexec_wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip()
                    for line in zf.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    wheels = [vmexec_wheel]
    for name in requirement_closure([*requires, *AGENT_REQUIREMENTS, *extra]):
        cached = _repacked(name)
        target = files / cached.name
        shutil.copyfile(cached, target)
        wheels.append(target)
    for arch in dict.fromkeys(architectures):
        for cached in other_architecture_wheels(wheels, arch):
            target = files / cached.name
            if not target.exists():
                shutil.copyfile(cached, target)
                wheels.append(target)
    simple = dest / "simple"
    simple.mkdir(exist_ok=True)
    projects = collections.defaultdict(list)
    for wheel in wheels:
        projects[normalize_name(wheel.name.split("-")[0])].append(wheel)
    links = []
    for project, project_wheels in sorted(projects.items()):
        (simple / project).mkdir(exist_ok=True)
        anchors = "".join(
            f'<a href="../../files/{w.name}#sha256={_file_sha256(str(w))}">{w.name}</a><br>\n'
            for w in project_wheels)
        (simple / project / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{anchors}</body></html>\n")
        links.append(f'<a href="{project}/">{project}</a><br>\n')
    (simple / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n" + "".join(links) + "</body></html>\n")
    return wheels


def other_architecture_wheels(wheels: Iterable[Path], arch: str) -> list[Path]:
    """The ``arch`` wheels of the same versions as ``wheels``' platform wheels.

    Downloaded from the package index this computer's pip uses (``pip download
    --no-deps --only-binary :all:`` for this Python, manylinux 2.17 to 2.39), or, in an
    environment without pip (a uv venv), from PyPI's JSON API (``$VMEXEC_PYPI_URL``
    to use a mirror), once per user: they are cached in
    ``~/.cache/vmexec-localcloud/foreign/<arch>``.

    Raises:
        FakeVMError: a wheel could not be downloaded (the message names it).
    """
    arch = normalize_arch(arch)
    wanted: list[str] = []
    for wheel in wheels:
        parts = wheel.name[:-len(".whl")].split("-")
        name, version, platform_tag = parts[0], parts[1], parts[-1]
        if platform_tag == "any" or all(p.endswith(arch) for p in platform_tag.split(".")):
            continue
        wanted.append(f"{name}=={version}")
    if not wanted:
        return []
    cache = _cache_dir() / "foreign" / arch
    cache.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(17, 40)]
    platforms.append(f"manylinux2014_{arch}")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{sys.version_info.major}{sys.version_info.minor}",
           *[word for platform in platforms for word in ("--platform", platform)],
           "--dest", str(cache), "--progress-bar", "off", "--quiet", *wanted]
    pip = _pip_interpreter()
    with _BUILD_LOCK:
        if pip is None:
            for requirement in wanted:
                _download_from_pypi(requirement, arch, platforms, cache)
            result = subprocess.CompletedProcess(cmd, 0, "", "")
        else:
            cmd[0] = pip
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise FakeVMError(f"the local cloud could not fetch the {arch} wheels of "
                          f"{', '.join(wanted)} ({' '.join(cmd[:4])} ...):\n"
                          f"{result.stderr[-2000:]}")
    found = []
    for requirement in wanted:
        name, version = requirement.split("==")
        matches = sorted(w for w in cache.glob("*.whl")
                         if normalize_name(w.name.split("-")[0]) == normalize_name(name)
                         and w.name.split("-")[1] == version
                         and w.name[:-len(".whl")].split("-")[-1].endswith(arch))
        if not matches:
            raise FakeVMError(f"the local cloud found no {arch} wheel of {requirement} "
                              f"(in {cache})")
        found.append(matches[0])
    log.info("serving %d %s wheel(s) of the same versions too", len(found), arch)
    return found


def _pip_interpreter() -> Optional[str]:
    """An interpreter with pip: this one, else the one a venv without pip (uv's) was
    made from (``pip download`` with explicit tags does not depend on which)."""
    if importlib.util.find_spec("pip") is not None:
        return sys.executable
    base = getattr(sys, "_base_executable", None)
    # (A venv's python is often a symlink to the base one: compare the paths themselves.)
    if base and base != sys.executable:
        probe = subprocess.run([base, "-c", "import pip"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return str(base)
    return None


def _download_from_pypi(requirement: str, arch: str, platforms: list[str],
                        cache: Path) -> None:
    """Fetch ``name==version``'s wheel for ``platforms`` and this Python from PyPI's JSON
    API into ``cache`` (checked against the sha256 PyPI lists)."""
    import json
    import urllib.request

    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    name, version = requirement.split("==")
    if any(normalize_name(w.name.split("-")[0]) == normalize_name(name) and
           w.name.split("-")[1] == version and arch in w.name for w in cache.glob("*.whl")):
        return
    python = sys.version_info[:2]
    supported = list(cpython_tags(python, platforms=platforms)) + \
        list(compatible_tags(python, platforms=platforms))
    rank = {tag: i for i, tag in enumerate(supported)}
    base = os.environ.get("VMEXEC_PYPI_URL", "https://pypi.org/pypi").rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/{name}/json", timeout=60) as answer:
            files = json.load(answer)["releases"].get(version, [])
    except OSError as exc:
        raise FakeVMError(f"the local cloud could not fetch the {arch} wheel of "
                          f"{requirement} from {base} ({exc}); install pip here (it "
                          "honours your index settings) or set VMEXEC_PYPI_URL") from None
    best: Optional[tuple[int, dict[str, Any]]] = None
    for entry in files:
        if not entry["filename"].endswith(".whl"):
            continue
        tags = parse_wheel_filename(entry["filename"])[3]
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, entry)
    if best is None:
        raise FakeVMError(f"PyPI has no {arch} wheel of {requirement} for Python "
                          f"{python[0]}.{python[1]}")
    entry = best[1]
    with urllib.request.urlopen(entry["url"], timeout=300) as answer:
        data = answer.read()
    if hashlib.sha256(data).hexdigest() != entry["digests"]["sha256"]:
        raise FakeVMError(f"{entry['filename']} from PyPI does not match its sha256")
    (cache / entry["filename"]).write_bytes(data)


def requirement_closure(requirements: Iterable[str]) -> list[str]:
    """Installed distributions needed to satisfy ``requirements`` here, dependencies
    included (markers evaluated for this interpreter, extras not followed).

    Raises:
        FakeVMError: a needed distribution is not installed.
    """
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = normalize_name(req.name)
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise FakeVMError(f"{req.name} (needed by the machines) is not installed here: "
                              "the local cloud serves the client's own versions") from None
        seen[key] = dist.metadata["Name"]
        todo.extend(dist.requires or [])
    return sorted(seen.values(), key=normalize_name)


# Repacked wheels by (name, version), for the whole process.
_REPACKED: dict[tuple[str, str], Path] = {}
# The process's wheel cache directory (made on first use, removed at exit).
_CACHE_DIR: list[Path] = []


def _cache_dir() -> Path:
    """The directory where this process keeps built and repacked wheels. Lock held."""
    if not _CACHE_DIR or not _CACHE_DIR[0].exists():
        path = Path(tempfile.mkdtemp(prefix="vmexec-localcloud-wheels-"))
        # Caches outlive clouds (one build per test run), not the process.
        atexit.register(shutil.rmtree, path, True)
        _CACHE_DIR[:] = [path]
    return _CACHE_DIR[0]


def _repacked(name: str) -> Path:
    version = importlib.metadata.version(name)
    with _BUILD_LOCK:
        cached = _REPACKED.get((name, version))
        if cached is not None and cached.exists():
            return cached
        repacked = _cache_dir() / "repacked"
        repacked.mkdir(exist_ok=True)
        wheel = repack_installed(name, repacked)
        _REPACKED[(name, version)] = wheel
        return wheel


def _build_vmexec(dest: Path) -> Path:
    """The vmexec wheel the machines install: built from the source checkout this module
    lives in, else (``pip install vmexec[testing]``) repacked from the installed
    distribution, as the other distributions are."""
    source = Path(__file__).resolve().parents[2]
    if not (source / "pyproject.toml").exists():
        try:
            installed = importlib.metadata.distribution("vmexec")
        except importlib.metadata.PackageNotFoundError:
            raise FakeVMError(f"cannot serve vmexec to the machines: {source} is neither "
                              "a source checkout (no pyproject.toml) nor an installed "
                              "distribution; pip install 'vmexec[testing]'") from None
        here = Path(__file__).resolve()
        files = [Path(str(installed.locate_file(f))).resolve() for f in installed.files or ()]
        if here not in files:
            raise FakeVMError(f"cannot serve vmexec to the machines: the installed "
                              f"vmexec {installed.version} is not the one imported from "
                              f"{source}; reinstall it (pip install 'vmexec[testing]')")
        cached = _repacked("vmexec")
        target = dest / cached.name
        shutil.copyfile(cached, target)
        return target
    # The whole checkout: a superset of what the build reads (pyproject, vmexec/).
    digest = source_tree_hash(str(source))
    with _BUILD_LOCK:
        built = _BUILT.get(digest)
        if built is None or not built.exists():
            built = _build_from_copy(source)
            _BUILT[digest] = built
    target = dest / built.name
    shutil.copyfile(built, target)
    return target


def _build_from_copy(source: Path) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree it
    # builds, and other people and processes use this checkout at the same time.
    out = Path(tempfile.mkdtemp(prefix="build-", dir=_cache_dir()))
    tree = out / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py"):
        if (source / name).exists():
            shutil.copy2(source / name, tree / name)
    shutil.copytree(source / "vmexec", tree / "vmexec",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    uv = real_tool("uv")
    if uv is not None:
        cmd = [uv, "build", "--wheel", "--out-dir", str(out), str(tree)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(tree)]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    shutil.rmtree(tree, ignore_errors=True)
    wheels = list(out.glob("vmexec-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FakeVMError(f"building the vmexec wheel failed ({' '.join(cmd)}):\n"
                          f"{result.stderr[-3000:]}")
    log.info("built %s in %.1fs", wheels[0].name, time.monotonic() - started)
    return wheels[0]


def repack_installed(name: str, dest: Path) -> Path:
    """Rebuild the wheel of installed distribution ``name`` from its installed files.

    The product's repack (``vmexec.environment.install.repack_installed``), refusing
    what the machines could not use: an editable install would point them at this
    checkout instead of giving them the files.

    Args:
        name: the distribution.
        dest: the directory to write the wheel in.

    Returns:
        The wheel file (its tags are those recorded in the installed ``WHEEL`` file).

    Raises:
        FakeVMError: it is not installed, was not installed from a wheel, or is an
            editable install.
    """
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise FakeVMError(f"{name} is not installed here: the local cloud serves the "
                          "client's own versions (pip install it)") from None
    direct_url = dist.read_text("direct_url.json") or ""
    if not dist.read_text("WHEEL") or '"editable": true' in direct_url:
        raise FakeVMError(f"{name} was not installed from a wheel; cannot serve it")
    try:
        return Path(install.repack_installed(name, str(dest)))
    except EnvSyncError as exc:
        raise FakeVMError(f"{name}: {exc}") from None


def real_tool(name: str) -> Optional[str]:
    """The real binary of ``name`` (not a pyenv/asdf shim script that needs its env)."""
    if name == "uv":
        try:
            return os.path.realpath(find_uv())
        except EnvSyncError:
            return None
    on_path = shutil.which(name)
    return os.path.realpath(on_path) if on_path else None
