"""Building what machines fetch, on the client, once: locks, wheels, sdists, packs.

Owns ``build_artifacts(spec, resolutions)``: the lock of each architecture, a wheel per
local/editable package (vmexec included; built with ``uv build --wheel`` from a copy of
the project, cached by source hash so that an unchanged project gives the very same
bytes), an sdist per local package with compiled extensions (built on the machines,
per architecture), one wheel holding the user's own modules per code directory
(deterministic: same files, same bytes), and the conda-pack archive in ``conda-pack``
mode. Also ``repack_installed`` (an installed distribution as a wheel).

Imports the standard library and this package; no boto3 (``stage.py`` turns artifacts
into URLs), nothing of the machine's script (``install.py``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import platform as platform_module
import re
import shutil
import subprocess
import sysconfig
import tempfile
import zipfile
from typing import Mapping, Optional

from vmexec.environment.pack import conda_arch, pack_environment
from vmexec.environment.preflight import Resolution, find_uv
from vmexec.environment.spec import (
    Artifact,
    Distribution,
    EnvSpec,
    LocalCode,
    default_cache_dir,
)
from vmexec.environment.tree import IGNORED_DIRS, GitIgnore
from vmexec.errors import EnvSyncError

__all__ = [
    "build_artifacts",
    "build_code_wheel",
    "build_local_package",
    "repack_installed",
    "BUILD_TIMEOUT",
]

log = logging.getLogger(__name__)

# Zip timestamps of the wheels built here: fixed, so that equal content is equal bytes
# (a content-addressed artifact that changed every build would be re-uploaded every run).
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_SOURCE_DATE_EPOCH = "315532800"
BUILD_TIMEOUT = 900.0



def _urlsafe_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _code_distribution(code: LocalCode) -> tuple[str, str]:
    """``(distribution name, version)`` of a code wheel: named after the modules it
    holds, versioned by content, so a change is a new file name and a new cache key."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", "_".join(code.modules))[:40].strip("_") or "code"
    return f"vmexec_code_{stem}", f"0+{code.digest[:16]}"


def _write_wheel(path: str, info: str, entries: list[tuple[str, bytes]],
                 modes: Optional[Mapping[str, int]] = None) -> str:
    """Write a wheel of ``entries`` (archive name, bytes) plus its RECORD, with fixed
    timestamps, and modes 0644 unless ``modes`` says otherwise (an executable a wheel
    installs), so that equal entries give equal bytes."""
    modes = modes or {}
    record = "".join(f"{arc},sha256={_urlsafe_sha256(data)},{len(data)}\n"
                     for arc, data in entries) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in [*entries, (f"{info}/RECORD", record.encode())]:
            item = zipfile.ZipInfo(arc, date_time=_FIXED_DATE)
            item.external_attr = modes.get(arc, 0o644) << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(item, data)
    return path


def build_code_wheel(code: LocalCode, dest: str) -> str:
    """Write the user's modules of one directory as a pure wheel (deterministic bytes).

    Args:
        code: the captured directory (``capture.find_local_code``).
        dest: the directory to write into.

    Returns:
        The wheel's path.

    Raises:
        EnvSyncError: a file changed since capture (its hash differs): capture again.
    """
    name, version = _code_distribution(code)
    info = f"{name}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for rel, digest in code.files:
        with open(os.path.join(code.root, rel), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise EnvSyncError(f"{os.path.join(code.root, rel)} changed after the environment "
                               "was captured: capture it again")
        entries.append((rel.replace(os.sep, "/"), data))
    entries.append((f"{info}/METADATA", (f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                         f"{version}\nSummary: local code from {code.root} "
                                         "(vmexec)\n").encode()))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: vmexec\n"
                                     b"Root-Is-Purelib: true\nTag: py3-none-any\n"))
    entries.append((f"{info}/top_level.txt", "".join(f"{m}\n" for m in code.modules).encode()))
    return _write_wheel(os.path.join(dest, f"{name}-{version}-py3-none-any.whl"), info,
                        entries)


def repack_installed(name: str, dest: str) -> str:
    """A wheel of installed distribution ``name`` made from its installed files.

    For local packages installed from a file that is gone (tox's sdist, a wheel in a
    temporary folder). Console scripts are left out (the installer makes them again
    from ``entry_points.txt``); other files in the interpreter's scripts folder (a
    binary such as uv's) go in the wheel's ``.data/scripts``, with their modes.

    Args:
        name: the distribution.
        dest: the directory to write into.

    Returns:
        The wheel's path (tagged as the installed ``WHEEL`` file says).

    Raises:
        EnvSyncError: it is not installed, or lists no files (an editable install).
    """
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise EnvSyncError(f"{name} is not installed here: cannot repack it") from None
    wheel_text = dist.read_text("WHEEL") or "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
    tags = re.findall(r"^Tag:\s*(\S+)", wheel_text, re.MULTILINE) or ["py3-none-any"]
    python, abi, plat = (".".join(dict.fromkeys(t.split("-")[i] for t in tags))
                         for i in range(3))
    stem = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    info = f"{stem}-{dist.version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    modes: dict[str, int] = {}
    scripts_dir = pathlib.Path(sysconfig.get_path("scripts")).resolve()
    console = {ep.name for ep in dist.entry_points
               if ep.group in ("console_scripts", "gui_scripts")}
    for file in dist.files or ():
        parts = str(file).replace(os.sep, "/").split("/")
        if "__pycache__" in parts or parts[-1].endswith(".pyc"):
            continue
        if parts[0] == "..":
            located = pathlib.Path(str(file.locate())).resolve()
            if located.parent == scripts_dir and located.name not in console \
                    and located.is_file():
                arc = f"{stem}-{dist.version}.data/scripts/{located.name}"
                entries.append((arc, located.read_bytes()))
                modes[arc] = located.stat().st_mode & 0o777
            continue
        if parts[0].endswith(".dist-info"):
            if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            parts = [info, *parts[1:]]
        located = pathlib.Path(str(file.locate()))
        if located.is_file():
            arc = "/".join(parts)
            entries.append((arc, located.read_bytes()))
            modes[arc] = located.stat().st_mode & 0o777
    if not any(arc.startswith(info + "/METADATA") for arc, _ in entries):
        raise EnvSyncError(f"{name}: its installed files list no metadata (an editable "
                           "install?); cannot repack it")
    path = os.path.join(dest, f"{stem}-{dist.version}-{python}-{abi}-{plat}.whl")
    return _write_wheel(path, info, sorted(entries), modes)


def _copy_project(source: str, dest: str) -> str:
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree it
    # builds, and the user (or other processes) work in that tree at the same time.
    # Dotfiles (.env, .netrc) and what .gitignore names are not source: they must not
    # reach a build that goes to the machines.
    tree = os.path.join(dest, os.path.basename(os.path.abspath(source)) or "project")
    rules = GitIgnore(source)
    by_pattern = shutil.ignore_patterns(*IGNORED_DIRS, "*.egg-info", "*.pyc")

    def ignore(folder: str, names: list[str]) -> set[str]:
        rules.load(folder)
        skipped = set(by_pattern(folder, names))
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(".") or rules.ignored(path, os.path.isdir(path)):
                skipped.add(name)
        return skipped

    shutil.copytree(source, tree, symlinks=True, ignore=ignore)
    return tree


def build_local_package(dist: Distribution, cache_dir: Optional[str] = None) -> str:
    """Build a local/editable package: a wheel, or an sdist when it compiles code.

    The result is cached under ``cache_dir`` by the package's source hash, so an
    unchanged package is built once and keeps the same bytes.

    Args:
        dist: a ``local`` or ``editable`` distribution from the spec.
        cache_dir: the cache (default ``default_cache_dir()``).

    Returns:
        The path of the built wheel (``.whl``) or sdist (``.tar.gz``).

    Raises:
        EnvSyncError: the build failed (with uv's output).
    """
    kind = "sdist" if dist.compiled else "wheel"
    if os.path.isfile(dist.url) and dist.url.endswith(".whl") and not dist.compiled:
        return dist.url  # a pure wheel file installed from this computer: ship as is
    cache = os.path.join(cache_dir or default_cache_dir(), "builds",
                         f"{dist.key}-{dist.source_hash[:24]}-{kind}")
    cached = _cached_build(cache)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="vmexec-build-") as tmp:
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        if not os.path.exists(dist.url):
            if dist.compiled:
                raise EnvSyncError(
                    f"{dist.name} has compiled extensions and was installed from "
                    f"{dist.url}, which is gone: it cannot be built for other "
                    "architectures. Reinstall it from its source, or exclude="
                    f"[{dist.name!r}]")
            repack_installed(dist.name, out)
        else:
            _run_build(dist, kind, tmp, out)
        return _cache_build(out, cache, ".tar.gz" if dist.compiled else ".whl", dist.name)


def _run_build(dist: Distribution, kind: str, tmp: str, out: str) -> None:
    """``uv build --wheel|--sdist`` of a project folder (from a copy) or an sdist."""
    uv = find_uv()
    source = dist.url if os.path.isfile(dist.url) else _copy_project(dist.url, tmp)
    cmd = [uv, "build", f"--{kind}", "--out-dir", out, source]
    log.info("building %s %s (%s) from %s", kind, dist.name, dist.version, dist.url)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                            env={**os.environ, "SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH,
                                 "UV_NO_PROGRESS": "1"})
    if result.returncode != 0:
        raise EnvSyncError(
            f"building the {kind} of local package {dist.name} ({dist.url}) failed: "
            f"{result.stderr.strip()[-2000:]}\nFix the build, or leave it out with "
            f"exclude=[{dist.name!r}]")


def _cache_build(out: str, cache: str, suffix: str, name: str) -> str:
    """Move the one ``suffix`` file of ``out`` into the cache folder ``cache``."""
    built = sorted(f for f in os.listdir(out) if f.endswith(suffix))
    if not built:
        raise EnvSyncError(f"building {name} produced no {suffix} file")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cache))
    shutil.copy2(os.path.join(out, built[0]), os.path.join(staging, built[0]))
    shutil.rmtree(cache, ignore_errors=True)  # an earlier, interrupted cache entry
    try:
        os.rename(staging, cache)  # atomic: a concurrent build of the same source wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    cached = _cached_build(cache)
    if cached is None:
        raise EnvSyncError(f"the build of {name} vanished from the cache {cache}")
    return cached


def _cached_build(directory: str) -> Optional[str]:
    """The wheel or sdist cached in ``directory``, if any."""
    if not os.path.isdir(directory):
        return None
    built = sorted(f for f in os.listdir(directory) if f.endswith((".whl", ".tar.gz")))
    return os.path.join(directory, built[0]) if built else None


def build_artifacts(spec: EnvSpec, resolutions: Optional[Mapping[str, Resolution]] = None,
                    workdir: Optional[str] = None, cache_dir: Optional[str] = None
                    ) -> list[Artifact]:
    """Everything the machines fetch for ``spec``, built here once.

    Args:
        spec: the environment.
        resolutions: ``preflight`` results per arch (a lock artifact each); without them
            one unresolved requirements file serves every arch.
        workdir: where locks and code wheels are written (default: a new temporary
            directory under the cache).
        cache_dir: cache of built packages and packs (default ``default_cache_dir()``).

    Returns:
        The artifacts (``Artifact.path`` set, ``url`` empty until staged).

    Raises:
        EnvSyncError: a build failed.
    """
    cache = cache_dir or default_cache_dir()
    if workdir is None:
        os.makedirs(cache, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="artifacts-", dir=cache)
    os.makedirs(workdir, exist_ok=True)
    artifacts: list[Artifact] = []
    if spec.mode == "conda-pack":
        pack_path = pack_environment(spec.conda_prefix, cache_dir=cache)
        artifacts.append(Artifact.from_file(pack_path, "pack", arch=conda_arch(spec)))
    elif resolutions:
        for arch, resolution in sorted(resolutions.items()):
            path = os.path.join(workdir, f"lock-{arch}-{resolution.hash[:16]}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(resolution.lock)
            artifacts.append(Artifact.from_file(path, "lock", arch=arch))
    else:
        text = "".join(f"{line}\n" for line in spec.requirement_lines())
        digest = hashlib.sha256(text.encode()).hexdigest()
        path = os.path.join(workdir, f"requirements-{digest[:16]}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        artifacts.append(Artifact.from_file(path, "lock"))
    for dist in spec.local_packages():
        built = build_local_package(dist, cache)
        artifacts.append(Artifact.from_file(built, "sdist" if built.endswith(".tar.gz")
                                            else "wheel"))
    for code in spec.local_code:
        if code.compiled:
            log.warning("local code in %s has compiled modules (%s): they only import on "
                        "%s machines", code.root, ", ".join(code.compiled),
                        platform_module.machine())
        artifacts.append(Artifact.from_file(build_code_wheel(code, workdir), "code"))
    return artifacts
