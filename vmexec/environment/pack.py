"""``environment="conda-pack"``: the client's conda environment, packed once, unpacked on
machines of the same architecture.

Owns:

* ``conda_arch(spec)`` / ``check_conda_arch(spec, archs)`` — a conda environment holds
  binaries for one platform (its ``subdir``: ``linux-64``, ``linux-aarch64``); a plan
  with machines of another architecture (or a macOS/Windows environment, for Linux
  machines) is refused with a message pointing at ``environment="auto"``, which
  resolves per architecture;
* ``pack_environment(prefix)`` — conda-pack's Python API, packing once per environment
  state: the archive is cached under the vmexec cache by a fingerprint of the prefix
  (conda records, file sizes and mtimes), so an unchanged environment gives the very
  same file (and the staging step uploads nothing new). Editable packages are left
  out of the pack (conda-pack cannot pack them); ``install.build_artifacts`` ships them
  as wheels next to it.

The machine unpacks into ``$VMEXEC_ROOT/opt/vmexec/venv`` and runs ``conda-unpack``
(``install.install_script``).

Imports conda_pack lazily (the ``conda`` extra: ``pip install 'vmexec[conda]'``); no
boto3.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
from typing import Iterable, Optional

from vmexec.environment.preflight import normalize_arch
from vmexec.environment.spec import EnvSpec, default_cache_dir
from vmexec.errors import ConfigError, EnvSyncError

__all__ = ["conda_arch", "check_conda_arch", "pack_environment", "prefix_fingerprint",
           "unpack", "SUBDIR_ARCH"]

log = logging.getLogger(__name__)

#: conda subdirs that Linux machines can run, by architecture.
SUBDIR_ARCH = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}


def conda_arch(spec: EnvSpec) -> str:
    """The machine architecture the spec's conda environment runs on.

    Raises:
        EnvSyncError: not a Linux conda environment (nothing a machine can unpack).
    """
    subdir = spec.conda_platform
    if subdir in SUBDIR_ARCH:
        return SUBDIR_ARCH[subdir]
    raise EnvSyncError(
        f"environment='conda-pack': the conda environment {spec.conda_prefix} is built for "
        f"{subdir or 'an unknown platform'}, and the machines run Linux (linux-64 or "
        "linux-aarch64): use environment='auto', which installs the same packages from "
        "the package index for each machine's architecture")


def check_conda_arch(spec: EnvSpec, archs: Iterable[str]) -> None:
    """Refuse a plan whose machines cannot run the packed environment.

    Args:
        spec: a ``conda-pack`` spec.
        archs: the plan's architectures.

    Raises:
        EnvSyncError: some architecture differs from the environment's; the message
            points at ``environment="auto"`` and at dropping that architecture.
    """
    mine = conda_arch(spec)
    others = sorted({normalize_arch(a) for a in archs} - {mine})
    if others:
        raise EnvSyncError(
            f"environment='conda-pack' packs the conda environment {spec.conda_prefix} "
            f"({spec.conda_platform}, {mine} binaries), but the plan has {', '.join(others)} "
            f"machines, which cannot run it. Use environment='auto' (it resolves the "
            f"packages for each architecture), or only {mine} instance types (arm="
            f"{'True' if mine == 'aarch64' else 'False'})")


def prefix_fingerprint(prefix: str) -> str:
    """sha256 over the prefix's file names, sizes and mtimes (cheap: no file is read).

    Any install, removal or rewrite in the environment changes it.
    """
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(prefix):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed while walking: the next pack sees the new state
            rel = os.path.relpath(path, prefix)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8",
                                                                             "surrogateescape"))
    return digest.hexdigest()


def pack_environment(prefix: str, cache_dir: Optional[str] = None,
                     compress_level: int = 4) -> str:
    """Pack the conda environment at ``prefix`` (once per state of the environment).

    Args:
        prefix: the environment's directory (it must hold ``conda-meta/``).
        cache_dir: where packs are kept (default: the vmexec cache).
        compress_level: gzip level (4: conda-pack's default, a good size/speed trade).

    Returns:
        The ``.tar.gz`` path.

    Raises:
        ConfigError: conda-pack is not installed (``pip install 'vmexec[conda]'``), or
            ``prefix`` is not a conda environment.
        EnvSyncError: conda-pack refused the environment (its reason, e.g. files that
            pip clobbered).
    """
    try:
        import conda_pack
    except ImportError:
        raise ConfigError("environment='conda-pack' needs conda-pack: pip install "
                          "'vmexec[conda]' (or conda install conda-pack)") from None
    if not os.path.isdir(os.path.join(prefix, "conda-meta")):
        raise ConfigError(f"{prefix} is not a conda environment (no conda-meta/): use "
                          "environment='auto'")
    if cache_dir is None:
        cache_dir = default_cache_dir()
    fingerprint = prefix_fingerprint(prefix)
    packs = os.path.join(cache_dir, "packs")
    os.makedirs(packs, exist_ok=True)
    target = os.path.join(packs, f"{os.path.basename(os.path.abspath(prefix))}-"
                                 f"{fingerprint[:24]}.tar.gz")
    if os.path.isfile(target):
        log.info("conda environment %s unchanged: reusing %s", prefix, target)
        return target
    fd, partial = tempfile.mkstemp(prefix=".pack-", suffix=".tar.gz", dir=packs)
    os.close(fd)
    try:
        # on_missing_cache="ignore": packages whose conda cache entry was cleaned are
        # packed from the prefix itself (prefix paths are still rewritten).
        env = conda_pack.CondaEnv.from_prefix(prefix, on_missing_cache="ignore",
                                              ignore_editable_packages=True)
        env.pack(output=partial, format="tar.gz", force=True,
                 compress_level=compress_level)
    except conda_pack.CondaPackException as exc:
        os.unlink(partial)
        raise EnvSyncError(f"conda-pack refused {prefix}: {exc}\nFix the environment, or "
                           "use environment='auto'") from exc
    except BaseException:
        os.unlink(partial)
        raise
    os.replace(partial, target)
    log.info("packed conda environment %s (%d files) into %s (%.1f MB)", prefix, len(env),
             target, os.path.getsize(target) / 1e6)
    return target


def unpack(archive: str, dest: str) -> None:
    """Unpack a pack into ``dest`` as a machine does, minus ``conda-unpack`` (tests,
    debugging: the machine's script also runs ``bin/conda-unpack``)."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "tar_filter"):  # Python >= 3.11.4 (and 3.9.17, 3.10.12)
            tar.extractall(dest, filter="tar")  # symlinks kept, as tar(1) does
        else:  # pragma: no cover - older interpreters
            tar.extractall(dest)
