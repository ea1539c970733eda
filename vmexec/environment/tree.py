"""The user's source trees: which files count, and their content hash.

Owns ``IGNORED_DIRS`` and ``GitIgnore`` (what is not source: build outputs, VCS and cache
folders, dotfiles, and what the ``.gitignore`` files name), the walk over what would be
shipped, and ``source_tree_hash`` (a project's identity for caches and code wheels).
Used by ``capture`` (the user's own code, local packages) and ``build`` (copying a
project to build it).

Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Iterator

__all__ = ["IGNORED_DIRS", "GitIgnore", "source_tree_hash"]

#: Directory names never walked when hashing a project or shipping code.
IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", ".tox", ".nox", ".venv", "venv", "env",
    "build", "dist", "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache",
    ".eggs", ".ipynb_checkpoints", "site-packages",
})


class GitIgnore:
    """The ``.gitignore`` rules that apply under a directory, as git reads them.

    Rules come from the ``.gitignore`` files of the directory's ancestors up to the
    repository root (the first with ``.git``; without one, the directory and its
    parent) and of every folder below it, each relative to its own folder. Supported:
    comments, ``!`` negation, a trailing ``/`` (folders only), a leading or inner
    ``/`` (anchored), ``*``, ``?``, ``[...]`` and ``**``. The last matching rule wins.
    """

    def __init__(self, root: str) -> None:
        self._rules: list[tuple[str, re.Pattern[str], bool, bool]] = []
        self._loaded: set[str] = set()
        chain = []
        here = os.path.realpath(root)
        for _ in range(32):
            chain.append(here)
            if os.path.exists(os.path.join(here, ".git")):
                break
            parent = os.path.dirname(here)
            if parent == here:
                chain = chain[:2]  # not in a repository: the folder and its parent
                break
            here = parent
        for folder in reversed(chain):
            self.load(folder)

    def load(self, folder: str) -> None:
        """Add the rules of ``folder/.gitignore`` (once)."""
        folder = os.path.realpath(folder)
        if folder in self._loaded:
            return
        self._loaded.add(folder)
        try:
            with open(os.path.join(folder, ".gitignore"), encoding="utf-8",
                      errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate or line.startswith("\\"):
                line = line[1:]
            only_dirs = line.endswith("/")
            line = line.rstrip("/")
            if not line:
                continue
            anchored = "/" in line
            pattern = _glob_regex(line.lstrip("/"))
            if not anchored:
                pattern = "(?:.*/)?" + pattern
            self._rules.append((folder, re.compile(pattern + r"\Z", re.DOTALL), negate,
                                only_dirs))

    def ignored(self, path: str, is_dir: bool) -> bool:
        path = os.path.realpath(path)
        verdict = False
        for folder, pattern, negate, only_dirs in self._rules:
            if only_dirs and not is_dir:
                continue
            if not path.startswith(folder + os.sep):
                continue
            if pattern.match(os.path.relpath(path, folder).replace(os.sep, "/")):
                verdict = not negate
        return verdict


def _glob_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:end].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _walk_files(root: str) -> Iterator[str]:
    """Every file under ``root`` that would be shipped (sorted).

    Skipped: IGNORED_DIRS and egg-info, compiled bytecode, dotfiles and dot-folders
    (``.env``, ``.aws``, ``.netrc``: secrets live there, code does not), and whatever
    the ``.gitignore`` files say (the user's own statement of what is not source).
    """
    rules = GitIgnore(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rules.load(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS
                             and not d.endswith(".egg-info") and not d.startswith(".")
                             and not rules.ignored(os.path.join(dirpath, d), True))
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if not rules.ignored(path, False):
                yield path


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_tree_hash(root: str) -> str:
    """sha256 over a project's source files (paths relative to ``root`` and contents).

    Build outputs (``build/``, ``dist/``, ``*.egg-info``), VCS and cache folders are
    skipped, so building the project does not change its hash.
    """
    digest = hashlib.sha256()
    for path in _walk_files(root):
        digest.update(os.path.relpath(path, root).encode("utf-8", "surrogateescape"))
        digest.update(b"\0" + _file_sha256(path).encode("ascii") + b"\n")
    return digest.hexdigest()
