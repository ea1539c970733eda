"""Capturing the client's Python environment into an ``EnvSpec``; ``vmexec env``.

Owns the rules for *what the machines must have*:

* every installed distribution (``importlib.metadata``) with its exact version and
  source, read from PEP 610 ``direct_url.json``: index (no file), VCS URL and commit,
  archive URL, local path, editable; local/editable ones are built into wheels by
  ``install.prepare`` and are checked here for compiled extensions (those are built per
  architecture on the machines, never assumed portable);
* conda packages when ``sys.prefix`` holds ``conda-meta/`` (the ``conda list --explicit``
  equivalent, from the JSON records);
* the user's own code that no distribution provides: importable modules and packages in
  the working directory and the ``sys.path`` directories outside site-packages and the
  standard library (the same rule ``vmexec.pickling`` uses for what travels by value);
* the environment variables the user names (``env=`` / ``forward_env=``) — never AWS
  credentials: machines get their own role (``iam_instance_profile=``).

Also ``environment_hash`` (the client's environment token for the handshake, checked
against the machine's by ``vmexec.skew.check_skew``), ``resolve_environment`` (the ``environment=`` option: ``"auto"``, ``"conda-pack"``,
a requirements file, a list of requirements, ``None``) and ``main(argv)`` for the
``vmexec env`` subcommand.

Which files of a folder count as source, and their hash, is ``tree.py``'s (re-exported
here: ``GitIgnore``, ``source_tree_hash``).

Imports the standard library and vmexec only (no boto3, no conda_pack, no packaging):
it runs wherever the client runs.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
import urllib.parse
import urllib.request
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from vmexec.environment.spec import (
    CondaPackage,
    Distribution,
    EnvSpec,
    LocalCode,
    iter_lines,
    normalize_name,
)
from vmexec.environment.tree import GitIgnore, _file_sha256, _walk_files, source_tree_hash
from vmexec.errors import ConfigError, EnvSyncError, VMExecError
from vmexec.pickling import _installed_roots

__all__ = [
    "capture",
    "environment_hash",
    "resolve_environment",
    "installed_distributions",
    "find_local_code",
    "read_conda_records",
    "collect_env",
    "main",
    "AGENT_DISTRIBUTIONS",
    "GitIgnore",
]

log = logging.getLogger(__name__)

#: What the agent itself needs on a machine: never excluded, always pinned to the
#: client's versions (cloudpickle's format must match on both ends).
AGENT_DISTRIBUTIONS = ("vmexec", "cloudpickle", "psutil")

#: Module names in a code directory that are tooling, not code a task imports.
IGNORED_MODULES = frozenset({"setup", "conftest", "noxfile", "__main__", "__init__"})

#: Shipping more of the user's own code than this is refused (it is probably data).
MAX_CODE_BYTES = 100 * 1024 * 1024

# Environment variables that may start with AWS_ and still travel: they say where,
# not who. Everything else AWS_* may be (or point at) a credential.
_AWS_HARMLESS = frozenset({"AWS_REGION", "AWS_DEFAULT_REGION"})
# An access key id anywhere in a value (AKIA: long-term, ASIA: temporary).
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Compiled extension modules: name.cpython-311-x86_64-linux-gnu.so, name.abi3.so, name.so
_EXTENSION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z0-9_-]+)*\.(so|pyd)$")
# Build backends and files that mean a project compiles code.
_COMPILING_BACKENDS = ("maturin", "scikit_build", "mesonpy", "setuptools_rust", "cmake",
                       "enscons", "pybind11", "cython")
_COMPILED_SOURCES = (".c", ".cc", ".cpp", ".cxx", ".pyx", ".rs", ".f90", ".cu")
_COMPILED_MARKERS = ("Cargo.toml", "CMakeLists.txt", "meson.build")


# --- distributions -----------------------------------------------------------------------

def _under(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def _file_url_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else ""


def _source_of(dist: importlib.metadata.Distribution) -> tuple[str, str]:
    """``(source, url)`` from PEP 610 ``direct_url.json`` (absent: from an index)."""
    text = dist.read_text("direct_url.json")
    if not text:
        return "index", ""
    try:
        data = json.loads(text)
        url = str(data["url"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable direct_url.json; treating it as from an index",
                    dist.metadata["Name"])
        return "index", ""
    if "vcs_info" in data:
        info = data["vcs_info"]
        revision = info.get("commit_id") or info.get("requested_revision", "")
        vcs_url = f"{info.get('vcs', 'git')}+{url}@{revision}"
        if data.get("subdirectory"):
            vcs_url += f"#subdirectory={data['subdirectory']}"
        return "vcs", vcs_url
    if "dir_info" in data:
        path = _file_url_path(url) or url
        return ("editable" if data["dir_info"].get("editable") else "local"), path
    path = _file_url_path(url)
    return ("local", path) if path else ("url", url)


def _project_compiles(root: str) -> bool:
    """Whether the project at ``root`` builds compiled extensions (by its files)."""
    pyproject = os.path.join(root, "pyproject.toml")
    if os.path.isfile(pyproject):
        with open(pyproject, encoding="utf-8", errors="replace") as f:
            text = f.read()
        match = re.search(r"build-backend\s*=\s*['\"]([^'\"]+)", text)
        if match and any(b in match.group(1) for b in _COMPILING_BACKENDS):
            return True
    setup_py = os.path.join(root, "setup.py")
    if os.path.isfile(setup_py):
        with open(setup_py, encoding="utf-8", errors="replace") as f:
            if re.search(r"ext_modules|Extension\(|cythonize", f.read()):
                return True
    if any(os.path.exists(os.path.join(root, m)) for m in _COMPILED_MARKERS):
        return True
    return any(p.endswith(_COMPILED_SOURCES) for p in _walk_files(root))


def _dist_compiled(dist: importlib.metadata.Distribution) -> bool:
    """Whether an installed distribution carries compiled code (by its metadata)."""
    wheel = dist.read_text("WHEEL") or ""
    if re.search(r"^Root-Is-Purelib:\s*false", wheel, re.MULTILINE | re.IGNORECASE):
        return True
    tags = re.findall(r"^Tag:\s*(\S+)", wheel, re.MULTILINE)
    if any(not tag.endswith("-none-any") for tag in tags):
        return True
    return any(str(f).endswith((".so", ".pyd", ".dylib")) for f in dist.files or ())


def installed_distributions(exclude: Iterable[str] = ()) -> list[Distribution]:
    """Every distribution importable here, one per project, with its source.

    When a project is found twice (a stray ``*.egg-info`` in the working directory next
    to the real install), the one inside site-packages wins.

    Args:
        exclude: project names to leave out.

    Raises:
        EnvSyncError: a local package's source is gone (it cannot be rebuilt).
    """
    roots = _installed_roots()
    excluded = {normalize_name(e) for e in exclude}
    chosen: dict[str, tuple[importlib.metadata.Distribution, bool]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue  # a broken .dist-info without metadata
        key = normalize_name(name)
        installed = _under(str(dist.locate_file("")), roots)
        previous = chosen.get(key)
        if previous is not None and (previous[1] or not installed):
            continue
        chosen[key] = (dist, installed)
    found = []
    for key, (dist, _) in sorted(chosen.items()):
        if key in excluded:
            continue
        source, url = _source_of(dist)
        compiled, tree_hash = False, ""
        if source in ("local", "editable"):
            if not os.path.exists(url):
                if source == "editable":
                    raise EnvSyncError(
                        f"{dist.metadata['Name']} is installed in editable mode from {url}, "
                        "which no longer exists, so it cannot be built for the machines: "
                        f"reinstall it, or leave it out with exclude="
                        f"[{dist.metadata['Name']!r}]")
                # Installed from a file since deleted (tox's sdist, a wheel in /tmp):
                # its installed files are repacked into a wheel instead.
                compiled = _dist_compiled(dist)
                tree_hash = hashlib.sha256((dist.read_text("RECORD") or "").encode()
                                           ).hexdigest()
            elif os.path.isdir(url):
                compiled = _project_compiles(url) or (source == "local"
                                                     and _dist_compiled(dist))
                tree_hash = source_tree_hash(url)
            else:  # a local wheel or sdist file
                compiled = _dist_compiled(dist)
                tree_hash = _file_sha256(url)
        installer = (dist.read_text("INSTALLER") or "").strip()
        found.append(Distribution(name=dist.metadata["Name"], version=dist.version,
                                  source=source, url=url, compiled=compiled,
                                  source_hash=tree_hash, installer=installer))
    return found


def provided_modules() -> set[str]:
    """Top-level module names that installed distributions provide."""
    names: set[str] = set()
    for dist in importlib.metadata.distributions():
        top = dist.read_text("top_level.txt")
        if top:
            names.update(line.strip() for line in top.splitlines() if line.strip())
            continue
        for file in dist.files or ():
            first = str(file).split("/", 1)[0]
            if first.endswith(".py"):
                names.add(first[:-3])
            elif "." not in first and first not in ("..", "__pycache__"):
                names.add(first)
    return names


# --- the user's own code -------------------------------------------------------------------

def _default_code_roots() -> list[str]:
    roots = [os.getcwd()]
    roots += [entry or os.getcwd() for entry in sys.path]
    return roots


def _module_of(root: str, entry: str) -> Optional[tuple[str, bool]]:
    """``(module name, compiled)`` when ``root/entry`` is importable, else None."""
    path = os.path.join(root, entry)
    if os.path.isdir(path):
        if _IDENTIFIER.match(entry) and os.path.isfile(os.path.join(path, "__init__.py")):
            compiled = any(_EXTENSION.match(os.path.basename(p)) for p in _walk_files(path))
            return entry, compiled
        return None
    if entry.endswith(".py") and _IDENTIFIER.match(entry[:-3]):
        return entry[:-3], False
    match = _EXTENSION.match(entry)
    if match and os.path.isfile(path):
        return match.group(1), True
    return None


def find_local_code(paths: Optional[Sequence[str]] = None, exclude: Iterable[str] = (),
                    max_bytes: int = MAX_CODE_BYTES) -> list[LocalCode]:
    """The user's importable code that no distribution provides, per directory.

    Args:
        paths: directories to look in (default: the working directory and every
            ``sys.path`` directory outside site-packages and the standard library).
        exclude: module names to leave out.
        max_bytes: refuse to ship more than this.

    Returns:
        One ``LocalCode`` per directory holding such code, in ``sys.path`` order; a
        module found in two directories is taken from the first (as ``import`` does).

    Raises:
        EnvSyncError: more than ``max_bytes`` of code (it names the biggest modules).
    """
    installed = _installed_roots()
    skip = set(IGNORED_MODULES) | {e for e in exclude} | provided_modules()
    skip |= set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
    skip |= {"vmexec", "cloudpickle", "psutil"}
    seen_roots: set[str] = set()
    taken: set[str] = set()
    found: list[LocalCode] = []
    sizes: dict[str, int] = {}
    for root in (paths if paths is not None else _default_code_roots()):
        real = os.path.realpath(root)
        if real in seen_roots or not os.path.isdir(real) or _under(real, installed):
            continue
        seen_roots.add(real)
        modules: list[str] = []
        compiled: list[str] = []
        files: list[tuple[str, str]] = []
        for entry in sorted(os.listdir(real)):
            module = _module_of(real, entry)
            if module is None or module[0] in skip or module[0] in taken:
                continue
            name, is_compiled = module
            taken.add(name)
            modules.append(name)
            if is_compiled:
                compiled.append(name)
            path = os.path.join(real, entry)
            for file in (_walk_files(path) if os.path.isdir(path) else [path]):
                files.append((os.path.relpath(file, real), _file_sha256(file)))
                sizes[name] = sizes.get(name, 0) + os.path.getsize(file)
        if modules:
            found.append(LocalCode(root=real, modules=tuple(modules),
                                   files=tuple(sorted(files)), compiled=tuple(compiled)))
    total = sum(sizes.values())
    if total > max_bytes:
        biggest = ", ".join(f"{n} ({s / 1e6:.0f} MB)" for n, s in
                            sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise EnvSyncError(
            f"the local code to ship is {total / 1e6:.0f} MB (biggest: {biggest}); that "
            "is probably data, not code. Leave modules out with exclude=[...], or move "
            "data out of importable folders (and read it from S3 on the machines)")
    return found


# --- conda --------------------------------------------------------------------------------

def read_conda_records(prefix: str) -> tuple[list[CondaPackage], str]:
    """The packages of the conda environment at ``prefix`` and its platform (subdir).

    Returns:
        ``(packages, subdir)``; subdir is e.g. ``linux-64`` (from the python package's
        record, else the most common non-noarch subdir), ``""`` when unknown.
    """
    meta = os.path.join(prefix, "conda-meta")
    packages: list[CondaPackage] = []
    subdirs: collections.Counter[str] = collections.Counter()
    python_subdir = ""
    for entry in sorted(os.listdir(meta)):
        if not entry.endswith(".json"):
            continue
        with open(os.path.join(meta, entry), encoding="utf-8") as f:
            try:
                record = json.load(f)
            except ValueError:
                log.warning("skipping unreadable conda record %s", entry)
                continue
        subdir = str(record.get("subdir") or "")
        package = CondaPackage(name=str(record.get("name", "")),
                               version=str(record.get("version", "")),
                               build=str(record.get("build", "")),
                               channel=str(record.get("channel", "")),
                               subdir=subdir, url=str(record.get("url", "")))
        packages.append(package)
        if subdir and subdir != "noarch":
            subdirs[subdir] += 1
        if package.name == "python" and subdir:
            python_subdir = subdir
    platform_ = python_subdir or (subdirs.most_common(1)[0][0] if subdirs else "")
    return packages, platform_


# --- environment variables -----------------------------------------------------------------

def collect_env(env: Optional[Mapping[str, str]] = None,
                forward_env: Iterable[str] = ()) -> dict[str, str]:
    """The environment variables the workers get: ``env`` plus the named ones from here.

    Args:
        env: name -> value.
        forward_env: names whose values are taken from this process's environment.

    Raises:
        ConfigError: a name is invalid or not set here, or it is (or holds) an AWS
            credential: machines must use their own role (``iam_instance_profile=``).
    """
    if isinstance(forward_env, str):
        raise ConfigError(f"forward_env must be a list of names, not one string: "
                          f"forward_env=[{forward_env!r}]")
    result: dict[str, str] = {}
    for name in forward_env:
        if name not in os.environ:
            raise ConfigError(f"forward_env: {name!r} is not set in this environment; set "
                              f"it, or pass its value with env={{{name!r}: ...}}")
        result[name] = os.environ[name]
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(f"env must map names to string values, got {name!r}: "
                              f"{value!r}")
        result[name] = value
    for name, value in result.items():
        if not _ENV_NAME.match(name):
            raise ConfigError(f"env: {name!r} is not a valid environment variable name")
        if (name.upper().startswith("AWS_") and name.upper() not in _AWS_HARMLESS) or \
                _AWS_KEY_ID.search(value):
            raise ConfigError(
                f"env: refusing to send {name} to the machines: AWS credentials never "
                "leave this computer. Give the machines their own role with "
                "iam_instance_profile='<instance profile>' (boto3 on the machine finds it "
                "by itself)")
    return result


# --- capture ------------------------------------------------------------------------------

def _python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def capture(paths: Optional[Sequence[str]] = None, forward_env: Iterable[str] = (),
            env: Optional[Mapping[str, str]] = None, exclude: Iterable[str] = (), *,
            mode: str = "auto", requirements: Sequence[str] = ()) -> EnvSpec:
    """Capture this process's environment.

    Args:
        paths: directories searched for the user's own code (default: the working
            directory and the non-installed ``sys.path`` directories).
        forward_env: environment variable names to forward to the workers.
        env: environment variables to set on the workers.
        exclude: project names and module names to leave out.
        mode: ``auto`` (every installed distribution), ``requirements`` (only
            ``requirements`` plus what the agent needs), ``conda-pack``.
        requirements: the requirement strings of ``requirements`` mode.

    Returns:
        The ``EnvSpec``.

    Raises:
        ConfigError: ``exclude`` names what the agent needs, a bad ``env``, or
            ``conda-pack`` outside a conda environment.
        EnvSyncError: a local package's source is gone, or too much local code.
    """
    if isinstance(exclude, str):
        raise ConfigError(f"exclude must be a list of names: exclude=[{exclude!r}]")
    exclude = tuple(exclude)
    needed = {normalize_name(e) for e in exclude} & set(AGENT_DISTRIBUTIONS)
    if needed:
        raise ConfigError(f"exclude: {', '.join(sorted(needed))} cannot be left out: the "
                          "vmexec agent on the machines needs it")
    variables = collect_env(env, forward_env)
    distributions = installed_distributions(exclude)
    conda: list[CondaPackage] = []
    conda_platform = ""
    conda_prefix = ""
    if os.path.isdir(os.path.join(sys.prefix, "conda-meta")):
        conda_prefix = sys.prefix
        conda, conda_platform = read_conda_records(sys.prefix)
    elif mode == "conda-pack":
        raise ConfigError(
            f"environment='conda-pack' needs a conda environment, but this Python "
            f"({sys.prefix}) has no conda-meta/: use environment='auto'")
    if mode == "requirements":
        distributions = _agent_only(distributions, requirements)
    spec = EnvSpec(python=_python_version(), implementation=sys.implementation.name,
                   mode=mode, distributions=tuple(distributions),
                   requirements=tuple(requirements), conda=tuple(conda),
                   conda_prefix=conda_prefix, conda_platform=conda_platform,
                   local_code=tuple(find_local_code(paths, exclude)), env=variables,
                   exclude=exclude, platform=f"{sys.platform}-{platform.machine()}")
    log.info("captured environment %s: Python %s, %d distributions (%d local), %d local "
             "code folders", spec.content_hash[:16], spec.python, len(spec.distributions),
             len(spec.local_packages()), len(spec.local_code))
    return spec


def _agent_only(distributions: list[Distribution],
                requirements: Sequence[str]) -> list[Distribution]:
    """``requirements`` mode: keep only the agent's distributions, as pins or local
    wheels; the user's requirements override a pin they name themselves."""
    named = {normalize_name(re.split(r"[\s<>=!~;\[@]", r, 1)[0]) for r in requirements}
    kept = []
    for dist in distributions:
        if dist.key in AGENT_DISTRIBUTIONS and (dist.is_local or dist.key not in named):
            kept.append(dist)
    return kept


def read_requirements(path: str, _seen: Optional[set[str]] = None) -> list[str]:
    """Requirement lines of a requirements file (``-r`` includes followed).

    Raises:
        ConfigError: the file is missing or uses options other than ``-r`` (index
            options belong in ``index_url=`` / ``find_links=``).
    """
    seen = _seen if _seen is not None else set()
    real = os.path.realpath(path)
    if real in seen:
        return []
    seen.add(real)
    try:
        with open(real, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"environment={path!r}: cannot read the requirements file: "
                          f"{exc.strerror}") from None
    lines: list[str] = []
    for line in iter_lines(text):
        if line.startswith(("-r ", "--requirement ")):
            include = line.split(None, 1)[1]
            lines += read_requirements(os.path.join(os.path.dirname(real), include), seen)
        elif line.startswith("-"):
            raise ConfigError(
                f"{path}: option line {line!r} is not supported: pass index options as "
                "index_url=/find_links=, and local packages by installing them here "
                "(environment='auto' builds them into wheels)")
        else:
            lines.append(line)
    return lines


def environment_hash(spec: Optional[EnvSpec] = None) -> str:
    """The environment token the client puts in its handshake.

    ``"<content hash> <captured_at>"``: the hash decides equality; the capture time only
    tells ``check_skew`` which side is older. The machine's install script writes the
    same token to ``$VMEXEC_ROOT/opt/vmexec/env-hash``.

    Args:
        spec: the synced environment (default: ``capture()`` of this process).
    """
    if spec is None:
        spec = capture()
    return f"{spec.content_hash} {int(spec.captured_at)}"


def resolve_environment(environment: Union[str, Sequence[str], None] = "auto", *,
                        paths: Optional[Sequence[str]] = None,
                        forward_env: Iterable[str] = (),
                        env: Optional[Mapping[str, str]] = None,
                        exclude: Iterable[str] = ()) -> Optional[EnvSpec]:
    """The ``EnvSpec`` for an ``environment=`` option value.

    Args:
        environment: ``"auto"`` (capture everything), ``"conda-pack"``, a requirements
            file path, a list of requirement strings, or None (the image already has
            everything: nothing is synced).
        paths, forward_env, env, exclude: as for ``capture``.

    Returns:
        The spec, or None for ``environment=None``.

    Raises:
        ConfigError: an unknown value, an unreadable file, bad ``env``/``exclude``.
    """
    if environment is None:
        return None
    options: dict[str, Any] = dict(paths=paths, forward_env=forward_env, env=env,
                                   exclude=exclude)
    if environment in ("auto", "conda-pack"):
        return capture(mode=str(environment), **options)
    if isinstance(environment, str):
        if not os.path.isfile(environment):
            raise ConfigError(
                f"environment={environment!r} is neither 'auto', 'conda-pack', None nor an "
                "existing requirements file (pass a list for requirement strings: "
                f"environment=[{environment!r}])")
        return capture(mode="requirements", requirements=read_requirements(environment),
                       **options)
    try:
        requirements = list(environment)
    except TypeError:
        raise ConfigError(f"environment must be 'auto', 'conda-pack', a requirements file, "
                          f"a list of requirements or None, not {environment!r}") from None
    for item in requirements:
        if not isinstance(item, str) or not item.strip() or item.strip().startswith("-"):
            raise ConfigError(f"environment: {item!r} is not a requirement string such as "
                              "'numpy==2.1' (index options go in index_url=/find_links=)")
    return capture(mode="requirements", requirements=[r.strip() for r in requirements],
                   **options)


# --- vmexec env ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmexec env",
        description="Show the environment vmexec would reproduce on the machines: Python, "
                    "one name==version line per distribution with its source, and the "
                    "local code it would ship.")
    parser.add_argument("environment", nargs="?", default="auto",
                        help="'auto' (default), 'conda-pack', or a requirements file")
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME",
                        help="leave a project or module out (repeatable)")
    parser.add_argument("--path", action="append", dest="paths", metavar="DIR",
                        help="look for local code here instead of the working directory "
                             "and sys.path (repeatable)")
    parser.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                        help="an environment variable to forward (repeatable)")
    parser.add_argument("--preflight", nargs="?", const="x86_64,aarch64", metavar="ARCHS",
                        help="also resolve for these architectures (default "
                             "x86_64,aarch64): refuses what has no build there")
    parser.add_argument("--index-url", help="package index for --preflight")
    parser.add_argument("--find-links", action="append", metavar="URL",
                        help="wheel folder/URL for --preflight (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the spec as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``vmexec env``: print the captured environment; returns the exit status.

    0: printed (and every requested architecture resolved); 1: the environment cannot
    be reproduced (EnvSyncError, printed); 2: a usage or configuration error.
    """
    args = _parser().parse_args(argv)
    try:
        spec = resolve_environment(args.environment, paths=args.paths,
                                   forward_env=args.forward_env, exclude=args.exclude)
        assert spec is not None  # argparse never passes None
        print(spec.to_json() if args.json else spec.text())
        if args.preflight:
            from vmexec.environment.preflight import preflight

            archs = [a.strip() for a in args.preflight.split(",") if a.strip()]
            resolutions = preflight(spec, archs, index_url=args.index_url,
                                    find_links=args.find_links)
            for arch, resolution in resolutions.items():
                print(resolution.summary())
    except ConfigError as exc:
        print(f"vmexec env: {exc}", file=sys.stderr)
        return 2
    except VMExecError as exc:
        print(f"vmexec env: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m vmexec.environment.capture`
    sys.exit(main())
