"""What an environment *is*, as data: ``EnvSpec`` and its parts, JSON, content hashes.

Owns:

* ``EnvSpec`` — the client's environment as captured (``capture.py``) or given as
  requirements: Python version, distributions with their sources, conda packages, the
  user's own code, forwarded environment variables. It round-trips through JSON
  (``to_json`` / ``from_json``) and has a content hash (``content_hash``) over what a
  machine installs — not over when or where it was captured;
* ``Artifact`` — one file a machine fetches (a lock, a wheel, a pack), content-addressed
  by sha256;
* ``default_cache_dir()`` — where the client keeps built wheels and conda packs.

The version-skew guard (``check_skew``, ``read_machine_hash``, ``ENV_HASH_FILE``) lives
in ``vmexec.skew``, below this package, so the scheduler can use it without importing
the environment; it is re-exported here. ``environment_hash`` (the client's token)
is in ``capture.py``: its default captures this process.

Imports only the standard library, ``vmexec.errors`` and ``vmexec.skew``: the bottom of
this package (every other module of it imports this one, and this one none of them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Iterable, Mapping, Optional

from vmexec.errors import EnvSyncError
from vmexec.skew import ENV_HASH_FILE, check_skew, read_machine_hash

__all__ = [
    "Distribution",
    "CondaPackage",
    "LocalCode",
    "Artifact",
    "EnvSpec",
    "SPEC_VERSION",
    "ENV_HASH_FILE",
    "normalize_name",
    "read_machine_hash",
    "check_skew",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/vmexec`` (``~/.cache/vmexec``): built wheels and packs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmexec")


#: Bumped when the JSON layout changes incompatibly (``from_json`` refuses others).
SPEC_VERSION = 1

#: Modes of an EnvSpec: what the machines install.
MODES = ("auto", "requirements", "conda-pack")

#: Sources of a distribution.
SOURCES = ("index", "vcs", "url", "local", "editable")


def normalize_name(name: str) -> str:
    """PEP 503 normalised project name (``Foo_Bar.baz`` -> ``foo-bar-baz``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256_json(value: Any) -> str:
    # sort_keys + compact separators: the same value always hashes the same.
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Distribution:
    """One installed distribution and where it came from.

    Attributes:
        name: the project name as its metadata spells it.
        version: the exact installed version.
        source: ``index`` (a package index), ``vcs`` (a VCS URL), ``url`` (an archive
            URL), ``local`` (a directory or file on this computer) or ``editable``.
        url: the VCS URL with its commit (``git+https://...@<sha>``), the archive URL,
            or the local path; empty for ``index``.
        compiled: for local/editable packages, whether they carry compiled extensions
            (then they are built per architecture on the machines, never assumed
            portable).
        source_hash: for local/editable packages, sha256 over their source files.
        installer: who installed it (``pip``, ``uv``, ``conda``, ...), for display.
    """

    name: str
    version: str
    source: str = "index"
    url: str = ""
    compiled: bool = False
    source_hash: str = ""
    installer: str = ""

    @property
    def key(self) -> str:
        """The normalised name."""
        return normalize_name(self.name)

    @property
    def is_local(self) -> bool:
        """Built into a wheel (or sdist) here rather than resolved from an index."""
        return self.source in ("local", "editable")

    def requirement(self) -> str:
        """The requirement line that reproduces it (local ones: their name and version)."""
        if self.source in ("vcs", "url"):
            return f"{self.name} @ {self.url}"
        return f"{self.name}=={self.version}"

    def describe(self) -> str:
        """``name==version  (source)`` for ``EnvSpec.text()``."""
        where = {"index": "index", "vcs": f"vcs {self.url}", "url": f"url {self.url}",
                 "local": f"local {self.url}", "editable": f"editable {self.url}"}
        extra = ", compiled: built per architecture" if self.compiled else ""
        return f"{self.name}=={self.version}  ({where.get(self.source, self.source)}{extra})"


@dataclasses.dataclass(frozen=True)
class CondaPackage:
    """One conda package record from ``<prefix>/conda-meta/*.json``."""

    name: str
    version: str
    build: str = ""
    channel: str = ""
    subdir: str = ""
    url: str = ""


@dataclasses.dataclass(frozen=True)
class LocalCode:
    """The user's own importable code found in one directory (not installed anywhere).

    Attributes:
        root: the directory (a ``sys.path`` entry or the working directory).
        modules: top-level module and package names, sorted.
        files: ``relative path -> sha256`` of every file shipped, sorted by path.
        compiled: names of modules that are compiled extensions (``*.so``): they only
            run on this computer's architecture.
    """

    root: str
    modules: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    compiled: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """sha256 over the shipped files' paths and contents (not the root's path)."""
        return _sha256_json([list(item) for item in self.files])

    @property
    def size(self) -> int:
        """Number of files shipped."""
        return len(self.files)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One file a machine fetches, content-addressed.

    Attributes:
        name: the file name the machine gives it (a wheel keeps its wheel name).
        kind: ``lock`` (requirements resolved for one arch), ``wheel`` (a local package
            or vmexec), ``code`` (the user's own modules, as a wheel), ``sdist`` (a local
            package with compiled extensions, built on the machines), ``pack``
            (conda-pack archive), ``script`` (an install script, staged when it does
            not fit in user-data).
        sha256: hex digest of the bytes.
        size: bytes.
        path: where the file is on this computer.
        arch: the architecture it is for (None: any).
        url: where the machine fetches it (a presigned URL after staging, or a local
            path/``file://`` URL for a machine on this computer).
        build_url: for ``sdist``: a presigned GET of the per-arch built wheel (a tar
            holding it) that the first machine of the arch uploads.
        build_put_url: for ``sdist``: the presigned PUT for that upload.
    """

    name: str
    kind: str
    sha256: str
    size: int
    path: str
    arch: Optional[str] = None
    url: str = ""
    build_url: str = ""
    build_put_url: str = ""

    @classmethod
    def from_file(cls, path: str, kind: str, arch: Optional[str] = None,
                  name: Optional[str] = None) -> "Artifact":
        """Hash ``path`` and describe it.

        Args:
            path: the file.
            kind: see the class docstring.
            arch: the architecture it is for, None for any.
            name: the name on the machine (default: the file's base name).
        """
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return cls(name=name or os.path.basename(path), kind=kind, sha256=digest.hexdigest(),
                   size=os.path.getsize(path), path=os.path.abspath(path), arch=arch)

    def with_url(self, url: str, build_url: str = "", build_put_url: str = "") -> "Artifact":
        """A copy that the machines fetch from ``url``."""
        return dataclasses.replace(self, url=url, build_url=build_url,
                                   build_put_url=build_put_url)


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """The environment the machines reproduce.

    Attributes:
        python: the client's ``major.minor.micro``.
        implementation: ``cpython`` (pickled code does not cross implementations).
        mode: ``auto`` (every installed distribution), ``requirements`` (the given
            ``requirements`` plus what the agent needs) or ``conda-pack``.
        distributions: installed distributions (``auto``, ``conda-pack``) and the local
            packages to build into wheels (vmexec included when it is local).
        requirements: requirement strings (``requirements`` mode).
        conda: conda packages when the client runs in a conda environment.
        conda_prefix: that environment's prefix.
        conda_platform: its conda subdir (``linux-64``, ``linux-aarch64``, ...).
        local_code: the user's own modules, per directory.
        env: environment variables for the workers (sent over the connection at
            handshake time, never written into user-data).
        exclude: project or module names left out on purpose.
        captured_at: when it was captured (seconds since the epoch; not hashed).
        platform: the client's ``sys.platform``/machine (``linux-x86_64``), for messages.
    """

    python: str
    implementation: str = "cpython"
    mode: str = "auto"
    distributions: tuple[Distribution, ...] = ()
    requirements: tuple[str, ...] = ()
    conda: tuple[CondaPackage, ...] = ()
    conda_prefix: str = ""
    conda_platform: str = ""
    local_code: tuple[LocalCode, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    captured_at: float = dataclasses.field(default_factory=time.time)
    platform: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"EnvSpec.mode must be one of {MODES}, not {self.mode!r}")
        if not re.match(r"^\d+\.\d+(\.\d+)?$", self.python):
            raise ValueError(f"EnvSpec.python must look like '3.11.7', not {self.python!r}")

    # -- derived views -------------------------------------------------------------------
    @property
    def python_minor(self) -> str:
        """``major.minor``."""
        return ".".join(self.python.split(".")[:2])

    def local_packages(self) -> list[Distribution]:
        """Local and editable distributions (built into wheels, or per arch when compiled)."""
        return [d for d in self.distributions if d.is_local]

    def requirement_lines(self) -> list[str]:
        """What the index resolution starts from, sorted: exact pins of every index
        distribution, plus the given requirements (``requirements`` mode, where the
        distributions are only the agent's); never local packages."""
        lines = [d.requirement() for d in self.distributions if d.source == "index"]
        if self.mode == "requirements":
            lines += self.requirements  # plus the agent's pins kept by capture
        return sorted(dict.fromkeys(lines), key=str.lower)

    def direct_requirements(self) -> list[str]:
        """VCS and URL requirements (installed after the lock, without dependencies)."""
        return sorted(d.requirement() for d in self.distributions
                      if d.source in ("vcs", "url"))

    def has_distribution(self, name: str) -> bool:
        """Whether ``name`` is among the distributions (any source)."""
        key = normalize_name(name)
        return any(d.key == key for d in self.distributions)

    # -- hashing ------------------------------------------------------------------------
    def hash_inputs(self) -> dict[str, Any]:
        """What ``content_hash`` covers: what a machine installs, nothing else (no
        timestamps, no paths of this computer, no environment variables)."""
        inputs: dict[str, Any] = {
            "spec": SPEC_VERSION,
            "python": self.python_minor,
            "implementation": self.implementation,
            "mode": self.mode,
            "requirements": self.requirement_lines(),
            "direct": self.direct_requirements(),
            "local": sorted([d.key, d.version, d.source_hash, d.compiled]
                            for d in self.local_packages()),
            "code": sorted([list(c.modules), c.digest] for c in self.local_code),
        }
        if self.mode == "conda-pack":
            inputs["conda"] = sorted(f"{p.name}={p.version}={p.build}" for p in self.conda)
            inputs["conda_platform"] = self.conda_platform
        return inputs

    @property
    def content_hash(self) -> str:
        """sha256 hex over ``hash_inputs()``: equal environments hash equal."""
        return _sha256_json(self.hash_inputs())

    @property
    def base_hash(self) -> str:
        """sha256 hex over what is not the user's own pure-Python code: the Python, the
        requirements, compiled local packages. Two environments with the same base differ
        only in code a machine reinstalls in seconds (its local modules and pure local
        packages); the install script then re-syncs just that."""
        inputs = self.hash_inputs()
        inputs.pop("code")
        inputs["local"] = [entry for entry in inputs["local"] if entry[3]]  # compiled
        return _sha256_json(inputs)

    # -- text --------------------------------------------------------------------------
    def text(self) -> str:
        """A printout for people (``vmexec env``): Python, distributions, local code."""
        lines = [f"Python {self.python} ({self.implementation})"
                 + (f" on {self.platform}" if self.platform else "")
                 + f"  mode={self.mode}  hash={self.content_hash[:16]}"]
        if self.mode == "requirements":
            lines.append(f"requirements ({len(self.requirements)}):")
            lines += [f"  {r}" for r in self.requirements]
        shown = self.distributions if self.mode != "requirements" else self.local_packages()
        if shown:
            lines.append(f"distributions ({len(shown)}):")
            lines += [f"  {d.describe()}" for d in sorted(shown, key=lambda d: d.key)]
        if self.conda:
            lines.append(f"conda packages ({len(self.conda)}, {self.conda_prefix}, "
                         f"{self.conda_platform}):")
            lines += [f"  {p.name}={p.version}={p.build}  ({p.channel or 'unknown channel'})"
                      for p in sorted(self.conda, key=lambda p: p.name)]
        if self.local_code:
            lines.append("local code (shipped as-is, importable on the machines):")
            for code in self.local_code:
                flag = (f"  [compiled, this architecture only: {', '.join(code.compiled)}]"
                        if code.compiled else "")
                lines.append(f"  {code.root}: {', '.join(code.modules)} "
                             f"({code.size} files){flag}")
        else:
            lines.append("local code: none")
        if self.env:
            lines.append(f"environment variables: {', '.join(sorted(self.env))}")
        if self.exclude:
            lines.append(f"excluded: {', '.join(self.exclude)}")
        return "\n".join(lines)

    # -- JSON ---------------------------------------------------------------------------
    def to_json(self) -> str:
        """The spec as JSON text (``from_json`` reads it back)."""
        data = dataclasses.asdict(self)
        data["env"] = dict(self.env)
        data["spec_version"] = SPEC_VERSION
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EnvSpec":
        """Read a spec written by ``to_json``.

        Raises:
            EnvSyncError: the text is not a spec of this version.
        """
        try:
            data = json.loads(text)
            version = data.pop("spec_version", None)
            if version != SPEC_VERSION:
                raise EnvSyncError(f"environment spec version {version!r} is not "
                                   f"{SPEC_VERSION}: capture it again with this vmexec")
            data["distributions"] = tuple(Distribution(**d) for d in data["distributions"])
            data["conda"] = tuple(CondaPackage(**p) for p in data["conda"])
            data["local_code"] = tuple(
                LocalCode(root=c["root"], modules=tuple(c["modules"]),
                          files=tuple((p, h) for p, h in c["files"]),
                          compiled=tuple(c.get("compiled", ())))
                for c in data["local_code"])
            for key in ("requirements", "exclude"):
                data[key] = tuple(data[key])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvSyncError(f"not an environment spec: {exc}") from exc


def iter_lines(text: str) -> Iterable[str]:
    """Non-empty, non-comment lines of a requirements text, stripped."""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line
