"""Preflight: resolve an ``EnvSpec`` for each target architecture before any launch.

Owns ``preflight(spec, platforms)``: one ``uv pip compile`` per architecture, run
concurrently, for ``{arch}-manylinux_2_28`` and the client's Python version with
``--only-binary :all:`` — so that a package with no wheel for a target (nothing a
machine could install without a compiler, and nothing we could promise to build) is
an ``EnvSyncError`` naming the package, the platform and the options *now*, not on
machine 1,731. Each success is a ``Resolution``: the lock a machine of that arch
installs (``uv pip install -r``).

Pure-Python packages that publish no wheel at all (only an sdist) are not refused: the
pin is retried with source builds allowed for that package alone, since building it
needs no compiler. Local packages with compiled extensions are never in the
resolution: they are flagged (``Resolution.per_arch_builds``) and built on the first
machine of each architecture.

Results are cached in this process by (spec hash, arch, index options, manylinux).

Imports the standard library and vmexec only; runs the ``uv`` binary that the ``uv``
distribution ships (``uv.find_uv_bin()``), else ``uv`` on PATH.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional, Sequence, Union

from vmexec.environment.spec import EnvSpec, iter_lines, normalize_name
from vmexec.errors import ConfigError, EnvSyncError

__all__ = ["Resolution", "preflight", "find_uv", "normalize_arch", "DEFAULT_MANYLINUX",
           "clear_cache", "manylinux_for_images", "index_options"]

log = logging.getLogger(__name__)

#: glibc baseline assumed for an image vmexec does not recognise (an ``ami=`` of one's
#: own): 2.28 is what most projects publish for aarch64 and x86_64 alike.
DEFAULT_MANYLINUX = "2_28"

#: The glibc of the images vmexec knows, by a word of their SSM parameter or AMI name
#: (first match wins). A wheel built for the image's own glibc (bcrypt 5 publishes
#: manylinux_2_34 only, for example) installs there, so preflight must accept it.
IMAGE_GLIBC: tuple[tuple[str, str], ...] = (
    ("al2023", "2_34"),                 # Amazon Linux 2023 (the default image)
    ("amazon-linux-2023", "2_34"),      # the Deep Learning Base AMI on AL2023 (GPU types)
    ("amzn2-", "2_26"), ("amazon-linux-2/", "2_26"),  # Amazon Linux 2
    ("ubuntu-noble", "2_39"), ("ubuntu-jammy", "2_35"), ("ubuntu-focal", "2_31"),
    ("debian-13", "2_41"), ("debian-12", "2_36"), ("debian-11", "2_31"),
)

#: Seconds one resolution may take (it fetches metadata from the index).
COMPILE_TIMEOUT = 600.0

_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
                 "aarch64": "aarch64", "arm64": "aarch64"}
_NO_WHEEL = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?) has no wheels with a matching "
                       r"platform tag")
_NO_USABLE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?) has no usable wheels")
_SDIST_RETRIES = 8

_cache: dict[tuple[str, str, str, str], "Resolution"] = {}
_cache_lock = threading.Lock()


def manylinux_for_images(descriptions: Iterable[str]) -> str:
    """The manylinux target every image of a plan supports.

    Args:
        descriptions: per image, its SSM parameter and/or AMI name (any text naming it).

    Returns:
        The lowest glibc among them as ``"2_34"``; ``DEFAULT_MANYLINUX`` when an image is
        not recognised (or there is none).
    """
    found: list[tuple[int, int]] = []
    for text in descriptions:
        lowered = text.lower()
        glibc = next((g for word, g in IMAGE_GLIBC if word in lowered), None)
        if glibc is None:
            return DEFAULT_MANYLINUX
        major, minor = glibc.split("_")
        found.append((int(major), int(minor)))
    if not found:
        return DEFAULT_MANYLINUX
    lowest = min(found)
    return f"{lowest[0]}_{lowest[1]}"


def normalize_arch(arch: str) -> str:
    """``x86_64`` or ``aarch64`` from any usual spelling (``arm64``, ``amd64``).

    Raises:
        ConfigError: an architecture vmexec's machines do not have.
    """
    key = str(arch).strip().lower()
    if key not in _ARCH_ALIASES:
        raise ConfigError(f"unknown architecture {arch!r}: use 'x86_64' or 'aarch64'")
    return _ARCH_ALIASES[key]


def find_uv() -> str:
    """Path of the uv binary (the ``uv`` distribution's, else PATH's).

    Raises:
        EnvSyncError: no uv here (``pip install uv``).
    """
    try:
        import uv as uv_module

        return os.path.realpath(uv_module.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvSyncError("environment sync needs uv on this computer: pip install uv")


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The requirements of one architecture, resolved to wheels that exist for it.

    Attributes:
        arch: ``x86_64`` or ``aarch64``.
        platform: uv's target, e.g. ``aarch64-manylinux_2_28``.
        python: the Python version resolved for.
        lock: the lock text (``name==version`` lines) a machine installs with uv.
        spec_hash: the ``EnvSpec.content_hash`` it came from.
        index: the index options used (for the cache key and messages).
        per_arch_builds: local packages with compiled extensions, built on the machines.
        source_builds: pure-Python packages without any wheel, built from source.
    """

    arch: str
    platform: str
    python: str
    lock: str
    spec_hash: str
    index: str = ""
    per_arch_builds: tuple[str, ...] = ()
    source_builds: tuple[str, ...] = ()

    @property
    def packages(self) -> dict[str, str]:
        """Normalised name -> pinned version."""
        pins = {}
        for line in iter_lines(self.lock):
            name, sep, version = line.partition("==")
            if sep:
                pins[normalize_name(name.strip())] = version.split(";")[0].strip()
        return pins

    @property
    def hash(self) -> str:
        """sha256 of the lock text."""
        return hashlib.sha256(self.lock.encode("utf-8")).hexdigest()

    def summary(self) -> str:
        """One line for people."""
        extra = ""
        if self.per_arch_builds:
            extra += f"; built on the first {self.arch} machine: {', '.join(self.per_arch_builds)}"
        if self.source_builds:
            extra += f"; pure-Python sdists: {', '.join(self.source_builds)}"
        return (f"{self.arch}: {len(self.packages)} packages resolved for {self.platform}, "
                f"Python {self.python}{extra}")


def index_options(index_url: Optional[str], find_links: Sequence[str]) -> list[str]:
    """uv/pip's package index options: ``--index-url`` (or ``--no-index`` when only
    ``find_links`` are given: offline, as on the machines), then each ``--find-links``."""
    options: list[str] = []
    if index_url:
        options += ["--index-url", index_url]
    elif find_links:
        options.append("--no-index")  # find_links alone: offline, as on the machines
    for link in find_links:
        options += ["--find-links", link]
    return options


def _pure_installed(name: str) -> bool:
    """Whether ``name`` is installed here as pure Python (so an sdist builds anywhere)."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    wheel = dist.read_text("WHEEL") or ""
    tags = re.findall(r"^Tag:\s*(\S+)", wheel, re.MULTILINE)
    return bool(tags) and "Root-Is-Purelib: true" in wheel and all(
        t.endswith("-none-any") for t in tags)


def _refusal(arch: str, platform: str, python: str, stderr: str) -> EnvSyncError:
    """The EnvSyncError for a failed resolution, naming package, platform, options."""
    cause = stderr.strip()
    match = _NO_WHEEL.search(cause) or _NO_USABLE.search(cause)
    other = "x86_64" if arch == "aarch64" else "aarch64"
    if match:
        package, version = match.group(1), match.group(2)
        available = re.search(r"Wheels are available for `[^`]+` \(v[^)]+\) on the "
                              r"following platforms?: (.+)", cause)
        where = f" (its wheels: {available.group(1).strip()})" if available else ""
        error = EnvSyncError(
            f"{package}=={version} has no build for {arch} ({platform}, Python {python})"
            f"{where}, so machines of that architecture cannot install it. Options: pin "
            f"another version of {package} that publishes {arch} wheels; leave it out "
            f"with exclude=[{package!r}] if the tasks do not need it; or drop {arch} from "
            f"the plan (only {other} instance types, e.g. arm="
            f"{'False' if arch == 'aarch64' else 'True'})")
        error.package = package  # type: ignore[attr-defined]
    else:
        tail = "\n".join(cause.splitlines()[-12:])
        error = EnvSyncError(
            f"the environment cannot be resolved for {arch} ({platform}, Python "
            f"{python}):\n{tail}\nOptions: fix or pin the requirement uv names; leave a "
            f"package out with exclude=[...]; or drop {arch} from the plan")
        error.package = None  # type: ignore[attr-defined]
    error.platform = platform  # type: ignore[attr-defined]
    error.arch = arch  # type: ignore[attr-defined]
    return error


def _compile(uv: str, requirements: str, arch: str, python: str, manylinux: str,
             index_options: list[str], input_names: list[str]) -> tuple[str, list[str]]:
    """Run uv for one arch; returns ``(lock, pure packages built from source)``."""
    platform = f"{arch}-manylinux_{manylinux}"
    source_ok: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vmexec-preflight-") as tmp:
        infile = os.path.join(tmp, "requirements.in")
        with open(infile, "w", encoding="utf-8") as f:
            f.write(requirements)
        for _ in range(_SDIST_RETRIES):
            if source_ok:
                # Binary-only for every input except the pure sdists found so far
                # (uv has no "all but X"; transitive packages are pinned inputs in
                # auto mode).
                allowed = {normalize_name(n) for n in source_ok}
                binary = [o for n in input_names if normalize_name(n) not in allowed
                          for o in ("--only-binary", n)]
            else:
                binary = ["--only-binary", ":all:"]
            cmd = [uv, "pip", "compile", infile, "--python-platform", platform,
                   "--python-version", python, *binary, *index_options,
                   "--no-header", "--no-annotate", "--quiet"]
            log.debug("preflight %s: %s", arch, " ".join(cmd))
            try:
                result = subprocess.run(cmd, capture_output=True, text=True,
                                        timeout=COMPILE_TIMEOUT,
                                        env={**os.environ, "UV_NO_PROGRESS": "1"})
            except subprocess.TimeoutExpired:
                raise EnvSyncError(
                    f"resolving the environment for {arch} took over {COMPILE_TIMEOUT:.0f}s: "
                    "is the package index reachable (index_url=)?") from None
            if result.returncode == 0:
                return result.stdout, source_ok
            sdist_only = _NO_USABLE.search(result.stderr)
            if sdist_only and sdist_only.group(1) not in source_ok and \
                    _pure_installed(sdist_only.group(1)):
                log.info("preflight %s: %s publishes no wheel but is pure Python here; "
                         "allowing its sdist", arch, sdist_only.group(1))
                source_ok.append(sdist_only.group(1))
                continue
            raise _refusal(arch, platform, python, result.stderr)
    raise EnvSyncError(f"resolving for {arch}: more than {_SDIST_RETRIES} packages publish "
                       f"no wheel ({', '.join(source_ok)}); pin versions with wheels")


def preflight(spec: EnvSpec, platforms: Iterable[str] = ("x86_64", "aarch64"),
              index_url: Optional[str] = None,
              find_links: Union[str, Sequence[str], None] = None, *,
              manylinux: str = DEFAULT_MANYLINUX, use_cache: bool = True
              ) -> dict[str, Resolution]:
    """Resolve ``spec`` for every target architecture, concurrently.

    Args:
        spec: the environment (``auto`` or ``requirements`` mode; ``conda-pack``
            environments are checked by ``pack.check_conda_arch`` instead).
        platforms: architectures of the plan (``x86_64``, ``aarch64``; aliases accepted).
        index_url: the package index the machines use (default: uv's, i.e. PyPI).
        find_links: wheel folders/URLs; without ``index_url`` the resolution is offline
            (``--no-index``), as the machines' install will be.
        manylinux: glibc baseline of the machines' image, e.g. ``2_34`` for Amazon
            Linux 2023 (``manylinux_for_images``); default ``2_28``.
        use_cache: reuse this process's earlier result for the same inputs.

    Returns:
        ``{arch: Resolution}``, one per distinct architecture.

    Raises:
        EnvSyncError: some package has no build for some architecture (the message names
            the package, the platform and the options; with several failures, all of
            them), or the index cannot be reached.
    """
    archs = list(dict.fromkeys(normalize_arch(p) for p in platforms))
    if not archs:
        raise ConfigError("preflight needs at least one architecture")
    links = [find_links] if isinstance(find_links, str) else list(find_links or ())
    options = index_options(index_url, links)
    index_key = " ".join(options)
    lines = spec.requirement_lines()
    requirements = "".join(f"{line}\n" for line in lines)
    input_names = [re.split(r"[\s<>=!~;\[@]", line, 1)[0] for line in lines]
    per_arch = tuple(sorted(d.name for d in spec.local_packages() if d.compiled))
    uv = find_uv()

    def one(arch: str) -> Resolution:
        key = (spec.content_hash, arch, index_key, manylinux)
        if use_cache:
            with _cache_lock:
                if key in _cache:
                    return _cache[key]
        if lines:
            lock, sdists = _compile(uv, requirements, arch, spec.python, manylinux,
                                    options, input_names)
        else:
            lock, sdists = "", []
        resolution = Resolution(arch=arch, platform=f"{arch}-manylinux_{manylinux}",
                                python=spec.python, lock=lock, spec_hash=spec.content_hash,
                                index=index_key, per_arch_builds=per_arch,
                                source_builds=tuple(sdists))
        with _cache_lock:
            _cache[key] = resolution
        return resolution

    if per_arch:
        log.warning("local package(s) %s have compiled extensions: they will be built on "
                    "the first machine of each architecture (the image needs a compiler; "
                    "the install script installs gcc with dnf/apt when missing)",
                    ", ".join(per_arch))
    results: dict[str, Resolution] = {}
    errors: list[EnvSyncError] = []
    with ThreadPoolExecutor(len(archs), thread_name_prefix="vmexec-preflight") as pool:
        futures = {arch: pool.submit(one, arch) for arch in archs}
        for arch, future in futures.items():
            try:
                results[arch] = future.result()
            except EnvSyncError as exc:
                errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        combined = EnvSyncError("the environment cannot be installed on every architecture "
                                "of the plan:\n- " + "\n- ".join(str(e) for e in errors))
        combined.errors = errors  # type: ignore[attr-defined]
        raise combined
    for resolution in results.values():
        log.info("preflight %s", resolution.summary())
    return results


def clear_cache() -> None:
    """Forget every cached resolution (tests, or after the index changed)."""
    with _cache_lock:
        _cache.clear()
