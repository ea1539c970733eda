"""Installing an environment on a machine: the artifacts it needs and the script it runs.

Owns:

* ``build_artifacts(spec, resolutions)`` — on the client, once: the lock of each
  architecture, a wheel per local/editable package (vmexec included; built with
  ``uv build --wheel`` from a copy of the project, cached by source hash so that an
  unchanged project gives the very same bytes), an sdist per local package with
  compiled extensions (built on the machines, per architecture), one wheel holding the
  user's own modules per code directory (deterministic: same files, same bytes), and the
  conda-pack archive in ``conda-pack`` mode;
* ``install_script(prepared, arch, artifacts)`` — the bash a machine runs (embedded in
  user-data, or run by a fake VM): fetch each artifact (presigned URL, ``file://`` or a
  path) and check its sha256, find Python of the client's minor version, ``uv venv``
  ``$VMEXEC_ROOT/opt/vmexec/venv``, ``uv pip install -r`` the lock, the local wheels,
  build compiled local packages (the first machine of an architecture shares its build
  through a presigned PUT), write the environment hash to
  ``$VMEXEC_ROOT/opt/vmexec/env-hash``. ``UV_CACHE_DIR`` persists under
  ``$VMEXEC_ROOT/var/cache/vmexec/uv`` so a re-run (or an image with a warm cache)
  installs in seconds; an environment already installed with the same hash is kept,
  and one with the same *base* (``EnvSpec.base_hash``: everything but the user's
  pure-Python code) gets just the changed local wheels reinstalled (a named fleet
  re-synced after an edit of the user's code);
* ``prepare_environment(environment=..., archs=...)`` — capture/resolve, preflight and
  build in one call: what a provider does before its first launch.

Imports the standard library and vmexec (``pack`` imports conda_pack only in conda-pack
mode). No boto3 (``stage.py`` turns artifacts into URLs).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import platform as platform_module
import re
import shlex
import shutil
import subprocess
import tempfile
import zipfile
from typing import Iterable, Mapping, Optional, Sequence, Union

from vmexec.environment.capture import (
    IGNORED_DIRS,
    GitIgnore,
    environment_hash,
    resolve_environment,
)
from vmexec.environment.pack import check_conda_arch, conda_arch, pack_environment
from vmexec.environment.preflight import (
    DEFAULT_MANYLINUX,
    Resolution,
    find_uv,
    index_options,
    normalize_arch,
    preflight,
)
from vmexec.environment.spec import (
    Artifact,
    Distribution,
    EnvSpec,
    LocalCode,
    default_cache_dir,
)
from vmexec.errors import EnvSyncError

__all__ = [
    "PreparedEnvironment",
    "prepare_environment",
    "build_artifacts",
    "build_code_wheel",
    "build_local_package",
    "repack_installed",
    "install_script",
    "bootstrap_script",
    "stdin_command",
    "built_builds",
    "BUILT_MARKER",
    "redact_urls",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

# Zip timestamps of the wheels built here: fixed, so that equal content is equal bytes
# (a content-addressed artifact that changed every build would be re-uploaded every run).
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_SOURCE_DATE_EPOCH = "315532800"
BUILD_TIMEOUT = 900.0


# --- building -----------------------------------------------------------------------------

def _urlsafe_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _code_distribution(code: LocalCode) -> tuple[str, str]:
    """``(distribution name, version)`` of a code wheel: named after the modules it
    holds, versioned by content, so a change is a new file name and a new cache key."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", "_".join(code.modules))[:40].strip("_") or "code"
    return f"vmexec_code_{stem}", f"0+{code.digest[:16]}"


def _write_wheel(path: str, info: str, entries: list[tuple[str, bytes]]) -> str:
    """Write a wheel of ``entries`` (archive name, bytes) plus its RECORD, with fixed
    timestamps and modes so that equal entries give equal bytes."""
    record = "".join(f"{arc},sha256={_urlsafe_sha256(data)},{len(data)}\n"
                     for arc, data in entries) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in [*entries, (f"{info}/RECORD", record.encode())]:
            item = zipfile.ZipInfo(arc, date_time=_FIXED_DATE)
            item.external_attr = 0o644 << 16
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
    temporary folder). Scripts outside site-packages are left out (the installer makes
    console scripts again from ``entry_points.txt``).

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
    for file in dist.files or ():
        parts = str(file).replace(os.sep, "/").split("/")
        if parts[0] == ".." or "__pycache__" in parts or parts[-1].endswith(".pyc"):
            continue
        if parts[0].endswith(".dist-info"):
            if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            parts = [info, *parts[1:]]
        located = pathlib.Path(str(file.locate()))
        if located.is_file():
            entries.append(("/".join(parts), located.read_bytes()))
    if not any(arc.startswith(info + "/METADATA") for arc, _ in entries):
        raise EnvSyncError(f"{name}: its installed files list no metadata (an editable "
                           "install?); cannot repack it")
    path = os.path.join(dest, f"{stem}-{dist.version}-{python}-{abi}-{plat}.whl")
    return _write_wheel(path, info, sorted(entries))


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


# --- the machine's script ---------------------------------------------------------------

def _q(value: str) -> str:
    return shlex.quote(value)


#: The machine-side scripts are files under ``scripts/`` (checked by shellcheck in CI,
#: tests/test_scripts.py); the only generated parts are headers of variable assignments,
#: every value shell-quoted.
SCRIPTS = pathlib.Path(__file__).with_name("scripts")


def _script(name: str) -> str:
    """``scripts/<name>`` without its comment lines: what machines run has to fit in
    user-data (16 KB), and the comments are for the people reading the file."""
    text = (SCRIPTS / name).read_text(encoding="utf-8")
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.strip() and not line.lstrip().startswith("#"))


#: ``vx_get url file`` (scripts/vx-get.sh): a download whose URL reaches curl or Python
#: on stdin, never a command line. Shared by the install script and its bootstrap.
VX_GET = _script("vx-get.sh")

# The install script's header: the one part filled in by ``str.format`` (values
# shell-quoted by install_script); the body after it is scripts/vx-get.sh and
# scripts/install-common.sh as they are (their braces escaped for ``format``).
_HEADER = """\
# vmexec environment {token_short} ({mode}), generated by vmexec/environment/install.py
vx_want={token}
vx_base={base}
vx_token_short={token_short}
vx_python_version={minor_version}
vx_python_major={major}
vx_python_minor={minor}
vx_uv_version={uv_version}
vx_index=({uv_index})
vx_check={check}
vx_check_names={check_names}
vx_built_marker={built_marker}
{uv_locks}
"""
_COMMON = _HEADER + (VX_GET + _script("install-common.sh")).replace("{", "{{").replace("}", "}}")
_DISPATCH = _script("install-dispatch.sh")
_BOOTSTRAP = _script("bootstrap.sh")
_STDIN_RUN = _script("stdin-run.sh").strip()  # one command line


def uv_version() -> str:
    """The uv version machines install when their image has none: this computer's
    (``uv`` distribution), else ``UV_FALLBACK_VERSION``."""
    try:
        return importlib.metadata.version("uv")
    except importlib.metadata.PackageNotFoundError:
        return UV_FALLBACK_VERSION


#: The uv pinned for machines when this computer has no ``uv`` distribution.
UV_FALLBACK_VERSION = "0.13.9"

_UV_LOCKS: dict[tuple[str, str, Optional[str], tuple[str, ...]], Optional[str]] = {}
_UV_LOCK_TIMEOUT = 120.0


def uv_bootstrap_requirements(arch: str, python: str, index_url: Optional[str],
                              find_links: Sequence[str]) -> Optional[str]:
    """``uv==<version> --hash=sha256:...`` lines for ``arch``, resolved here with the
    machines' index options (``uv pip compile --generate-hashes``); None when the index
    has no uv wheel of that version for the arch (machines then need uv on the image).
    Cached per process."""
    key = (normalize_arch(arch), python, index_url, tuple(find_links))
    if key in _UV_LOCKS:
        return _UV_LOCKS[key]
    version = uv_version()
    words = index_options(index_url, find_links)
    lock: Optional[str] = None
    try:
        result = subprocess.run(
            [find_uv(), "pip", "compile", "-", "--python-platform",
             f"{key[0]}-manylinux_2_28", "--python-version", python, "--only-binary", ":all:",
             "--generate-hashes", *words, "--no-header", "--no-annotate", "--quiet"],
            input=f"uv=={version}\n", capture_output=True, text=True,
            timeout=_UV_LOCK_TIMEOUT, env={**os.environ, "UV_NO_PROGRESS": "1"})
        if result.returncode == 0 and "--hash=sha256:" in result.stdout:
            lock = result.stdout
        else:
            log.info("no checksummed uv %s for %s machines (%s): machines of that "
                     "architecture need uv on their image", version, key[0],
                     (result.stderr.strip().splitlines() or ["no hashes"])[-1])
    except (EnvSyncError, OSError, subprocess.TimeoutExpired) as exc:
        log.info("cannot resolve uv %s for %s machines here (%s): machines of that "
                 "architecture need uv on their image", version, key[0], exc)
    _UV_LOCKS[key] = lock
    return lock


def _uv_lock_cases(archs: Sequence[str], python: str, index_url: Optional[str],
                   find_links: Sequence[str]) -> str:
    """The header's ``vx_uv_lock_<arch>=`` lines: per arch, its hashed pin (an arch
    without one has no line, and its machines need uv on the image)."""
    lines = []
    for arch in archs:
        lock = uv_bootstrap_requirements(arch, python, index_url, find_links)
        if lock:
            lines.append(f"vx_uv_lock_{normalize_arch(arch)}={_q(lock.strip())}")
    return "\n".join(lines)


def _index_words(index_url: Optional[str], find_links: Sequence[str]) -> str:
    return " ".join(_q(w) for w in index_options(index_url, find_links))


def _source(artifact: Artifact) -> str:
    return artifact.url or artifact.path


def _fetch_lines(artifacts: Iterable[Artifact]) -> list[str]:
    return [f"  vx_fetch {_q(_source(a))} {_q(a.name)} {a.sha256}" for a in artifacts]


def _arch_body(spec: EnvSpec, arch: str, artifacts: Sequence[Artifact],
               resolution: Optional[Resolution], uv_index: str,
               build_sha256: Optional[Mapping[str, str]] = None) -> str:
    """The install commands of one architecture (a bash function body)."""
    mine = [a for a in artifacts if a.arch in (None, arch)]
    # Artifacts for every arch are fetched by vx_fetch_shared: each presigned URL is
    # written once (they are long, and user-data has 16 KB).
    lines = ["  vx_fetch_shared"] + _fetch_lines(a for a in mine if a.arch == arch)
    packs = [a for a in mine if a.kind == "pack"]
    if spec.mode == "conda-pack":
        if not packs:
            raise EnvSyncError(f"no conda pack for {arch}: environment='conda-pack' serves "
                               "machines of the packed environment's architecture only; use "
                               "environment='auto'")
        lines.append(f"  vx_unpack {_q(packs[0].name)}")
    else:
        lines.append("  vx_fresh_venv")
        locks = [a for a in mine if a.kind == "lock"]
        binary = "--only-binary :all:" if resolution is not None and \
            not resolution.source_builds else ""
        for lock in locks:
            lines.append(f'  vx_pip {uv_index} {binary} -r "$vx_art/{lock.name}" || vx_die '
                         f'{_q(f"uv could not install the {arch} requirements (see the log)")}')
        direct = spec.direct_requirements()
        if direct:
            lines.append(f"  vx_pip {uv_index} --no-deps {' '.join(_q(d) for d in direct)} "
                         "|| vx_die 'cannot install the VCS/URL requirements'")
    lines += _wheel_lines(mine)
    for sdist in (a for a in mine if a.kind == "sdist"):
        known = (build_sha256 or {}).get(f"{sdist.name}/{arch}", "")
        lines.append(f"  vx_build {_q(sdist.name)} {_q(sdist.build_url)} "
                     f"{_q(sdist.build_put_url)} {_q(known)}")
    lines.append("  vx_done")
    return "\n".join(lines)


def _wheel_lines(artifacts: Sequence[Artifact], reinstall: bool = False) -> list[str]:
    """Install the local wheels (the user's modules, pure local packages) of an arch."""
    wheels = [a for a in artifacts if a.kind in ("wheel", "code")]
    if not wheels:
        return []
    names = " ".join(f'"$vx_art/{a.name}"' for a in wheels)
    # --reinstall: a changed local package may keep its version number.
    flags = "--no-deps --reinstall" if reinstall else "--no-deps"
    return [f"  vx_pip {flags} {names} || vx_die 'cannot install the local wheels'"]


def _update_body(artifacts: Sequence[Artifact], arch: str) -> str:
    """Re-sync only the user's code onto a venv whose base (``EnvSpec.base_hash``) is
    already the client's: fetch and reinstall the local wheels, nothing else."""
    wheels = [a for a in artifacts if a.arch in (None, arch) and a.kind in ("wheel", "code")]
    return "\n".join([*_fetch_lines(wheels), *_wheel_lines(wheels, reinstall=True),
                      "  vx_done"])


def install_script(prepared: Union["PreparedEnvironment", EnvSpec],
                   arch: Union[str, Sequence[str]],
                   artifacts: Optional[Sequence[Artifact]] = None, *,
                   index_url: Optional[str] = None,
                   find_links: Union[str, Sequence[str], None] = None,
                   build_sha256: Optional[Mapping[str, str]] = None) -> str:
    """The bash commands that install the environment on a machine.

    ``build_sha256`` maps ``"<sdist name>/<arch>"`` to the sha256 of a shared build a
    machine of this client uploaded (``built_builds`` reads them from its output):
    only a download with that hash is installed; without one the machine builds.

    One script serves every architecture in ``arch``: it picks its part by
    ``uname -m``. Paths are under ``${VMEXEC_ROOT:-}`` (empty on a real machine). It
    uses the boot script's ``$PY`` when that is the right Python, and its ``fail``
    function when there is one (so the reason reaches the client).

    Args:
        prepared: a ``PreparedEnvironment`` (spec, resolutions, artifacts, index
            options), or a bare ``EnvSpec`` (then pass ``artifacts``).
        arch: one architecture or several.
        artifacts: what to fetch (staged: with URLs; else fetched from their local
            paths, for machines on this computer). Default: the prepared ones.
        index_url: package index for the machines (default: the prepared one, else
            uv's default, PyPI).
        find_links: wheel folders/URLs for the machines (alone: an offline install).

    Returns:
        The script (bash; no heredocs; every value shell-quoted).

    Raises:
        EnvSyncError: an architecture has no lock (not preflighted) or no pack.
    """
    archs = [normalize_arch(a) for a in ([arch] if isinstance(arch, str) else arch)]
    if isinstance(prepared, PreparedEnvironment):
        spec, resolutions = prepared.spec, prepared.resolutions
        artifacts = prepared.artifacts if artifacts is None else artifacts
        index_url = prepared.index_url if index_url is None else index_url
        find_links = prepared.find_links if find_links is None else find_links
    else:
        spec, resolutions = prepared, {}
    if artifacts is None:
        raise EnvSyncError("install_script needs the artifacts of a bare EnvSpec "
                           "(build_artifacts)")
    links = [find_links] if isinstance(find_links, str) else list(find_links or ())
    uv_index = _index_words(index_url, links)
    token = environment_hash(spec)
    major, minor = spec.python_minor.split(".")
    agent = spec.has_distribution("vmexec")
    names = "vmexec.agent, cloudpickle, psutil" if agent else "sys"
    script = [_COMMON.format(token=_q(token), base=_q(spec.base_hash),
                             token_short=_q(token[:16]), mode=_q(spec.mode),
                             uv_index=uv_index, major=int(major), minor=int(minor),
                             minor_version=_q(spec.python_minor),
                             check=_q(f"import {names}"), check_names=_q(names),
                             uv_version=_q(uv_version()), built_marker=_q(BUILT_MARKER),
                             uv_locks=_uv_lock_cases(archs, spec.python, index_url,
                                                     links))]
    for target in archs:
        has_lock = any(a.kind == "lock" and a.arch in (None, target) for a in artifacts)
        if spec.mode != "conda-pack" and not has_lock:
            raise EnvSyncError(f"no requirements lock for {target}: run preflight for every "
                               "architecture of the plan (prepare_environment(archs=...))")
        body = _arch_body(spec, target, artifacts, resolutions.get(target), uv_index,
                          build_sha256)
        script.append(f"vx_install_{target}() {{\n{body}\n}}\n")
        script.append(f"vx_update_{target}() {{\n{_update_body(artifacts, target)}\n}}\n")
    shared = _fetch_lines(a for a in artifacts if a.arch is None) or ["  :"]
    script.insert(1, "vx_fetch_shared() {\n" + "\n".join(shared) + "\n}\n")
    script.append(f"vx_archs={_q(' '.join(archs))}\n{_DISPATCH}")
    return "".join(script)


def bootstrap_script(script: Artifact) -> str:
    """A few lines for user-data that fetch a staged install script and run it.

    For when the install script with its presigned URLs does not fit next to the boot
    script in EC2's 16 KB of user-data: stage the script itself
    (``stage.stage_script``) and put this in user-data instead. It runs the script in
    the same shell (``.``), so the boot script's ``fail`` and ``$PY`` still apply.

    Args:
        script: the staged script (``url`` set).

    Raises:
        EnvSyncError: the artifact has no URL (it was not staged).
    """
    if not script.url:
        raise EnvSyncError("bootstrap_script needs a staged script (stage.stage_script)")
    header = (f"# vmexec environment: fetch the staged install script, check it, run it "
              f"in this shell\nvx_boot_name={_q(script.name)}\nvx_boot_url={_q(script.url)}\n"
              f"vx_boot_sha256={_q(script.sha256)}\n")
    return header + VX_GET + _BOOTSTRAP


_PRESIGNED_QUERY = re.compile(r"(https?://[^\s'\"?]+)\?[^\s'\"]*")


def redact_urls(text: str) -> str:
    """``text`` with the query of every http(s) URL replaced by ``?<redacted>``.

    A presigned URL's query is its credential (signature, access key id, session
    token): it must not reach logs or error messages.
    """
    return _PRESIGNED_QUERY.sub(r"\1?<redacted>", text)


#: The line a machine prints after sharing a build: marker, sdist name, arch, sha256.
BUILT_MARKER = "VMEXEC-BUILT"
_BUILT_LINE = re.compile(rf"^{BUILT_MARKER} (\S+) (\S+) ([0-9a-f]{{64}})$", re.MULTILINE)


def built_builds(output: str) -> dict[str, str]:
    """``{"<sdist name>/<arch>": sha256}`` of the builds an install's output says it
    shared (for ``install_script(build_sha256=...)``)."""
    return {f"{m.group(1)}/{normalize_arch(m.group(2))}": m.group(3)
            for m in _BUILT_LINE.finditer(output)}


def stdin_command(script: str) -> tuple[str, bytes]:
    """Run ``script`` (bash) on a machine without putting it on a command line.

    A command line is world-readable (``ps``, ``/proc/*/cmdline``) and lands in debug
    logs; the install script carries presigned URLs. The returned command reads exactly
    the script's bytes from its stdin into a private temporary file (mode 0600, removed
    on exit) and runs it with bash; the caller writes the returned bytes to the
    command's stdin.

    Returns:
        ``(command, stdin bytes)``.
    """
    payload = script.encode("utf-8")
    return f"sh -c {_q(_STDIN_RUN)} sh {len(payload)}", payload


# --- everything at once ------------------------------------------------------------------

@dataclasses.dataclass
class PreparedEnvironment:
    """An environment ready to ship: spec, per-arch resolutions, built artifacts.

    Attributes:
        spec: the captured or requested environment.
        resolutions: ``{arch: Resolution}`` (empty in conda-pack mode).
        artifacts: the files to stage (local paths).
        index_url, find_links: the machines' index options.
    """

    spec: EnvSpec
    resolutions: dict[str, Resolution]
    artifacts: list[Artifact]
    index_url: Optional[str] = None
    find_links: tuple[str, ...] = ()

    @property
    def token(self) -> str:
        """The handshake's environment token (``spec.environment_hash``)."""
        return environment_hash(self.spec)

    @property
    def archs(self) -> list[str]:
        """Architectures prepared for."""
        if self.resolutions:
            return sorted(self.resolutions)
        return sorted({a.arch for a in self.artifacts if a.arch})

    def script(self, artifacts: Optional[Sequence[Artifact]] = None,
               build_sha256: Optional[Mapping[str, str]] = None) -> str:
        """``install_script`` for every prepared architecture."""
        return install_script(self, self.archs, artifacts, build_sha256=build_sha256)


def prepare_environment(environment: Union[str, Sequence[str], None] = "auto",
                        archs: Iterable[str] = ("x86_64",), *,
                        exclude: Iterable[str] = (), env: Optional[Mapping[str, str]] = None,
                        forward_env: Iterable[str] = (), paths: Optional[Sequence[str]] = None,
                        index_url: Optional[str] = None,
                        find_links: Union[str, Sequence[str], None] = None,
                        workdir: Optional[str] = None, cache_dir: Optional[str] = None,
                        manylinux: Optional[str] = None
                        ) -> Optional[PreparedEnvironment]:
    """Capture (or read) the environment, preflight every arch, build the artifacts.

    What a provider calls before its first launch: every failure here happens before
    any machine exists.

    Args:
        environment: ``"auto"``, ``"conda-pack"``, a requirements file, a list of
            requirements, or None (nothing to sync: returns None).
        archs: the plan's architectures.
        exclude, env, forward_env, paths: as for ``capture``.
        index_url, find_links: the machines' package index options.
        workdir, cache_dir: as for ``build_artifacts``.
        manylinux: the machines' glibc baseline (``preflight.manylinux_for_images`` of
            the plan's images; default ``preflight.DEFAULT_MANYLINUX``).

    Returns:
        The prepared environment, or None for ``environment=None``.

    Raises:
        ConfigError: a bad option (including AWS credentials in ``env``).
        EnvSyncError: a package has no build for an arch, conda-pack on another arch, a
            local build failed.
    """
    spec = resolve_environment(environment, paths=paths, forward_env=forward_env, env=env,
                               exclude=exclude)
    if spec is None:
        return None
    targets = [normalize_arch(a) for a in archs]
    links = (find_links,) if isinstance(find_links, str) else tuple(find_links or ())
    if spec.mode == "conda-pack":
        check_conda_arch(spec, targets)
        resolutions: dict[str, Resolution] = {}
    else:
        resolutions = preflight(spec, targets, index_url=index_url, find_links=links,
                                manylinux=manylinux or DEFAULT_MANYLINUX)
    artifacts = build_artifacts(spec, resolutions, workdir, cache_dir)
    return PreparedEnvironment(spec, resolutions, artifacts, index_url, links)
