"""The documentation site builds strictly, and its Python examples run.

Convention for code in ``docs/*.md``: every fenced block opened with exactly
```` ```python ```` at the start of a line is executed, on the local provider
(``VMEXEC_PROVIDER=local``). The blocks of one page run in order in one fresh
interpreter, sharing one namespace as a reader following the page would. A block that
cannot run here (it needs SSH hosts, a cloud account, a library vmexec does not test
with) is preceded by a line ``<!-- not run: reason -->``. Other languages (```` ```bash ````,
```` ```text ````) are never run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
SKIP_MARK = re.compile(r"^<!--\s*not run:\s*\S.*-->\s*$")
# Per page; the slowest page imports scikit-learn, dask, scipy and emcee.
PAGE_TIMEOUT = 180

# Runs the blocks of one page: exec'd in __main__'s namespace, so that functions the
# blocks define travel by value exactly as in a user's script.
_RUNNER = r"""
import json, sys, traceback, __main__
page, blocks = json.load(open(sys.argv[1]))
for line, code in blocks:
    try:
        exec(compile(code, f"{page}:{line}", "exec"), __main__.__dict__)
    except ModuleNotFoundError as exc:
        print(f"MISSING-MODULE {exc.name} (block at {page}:{line})")
        sys.exit(3)
    except BaseException:
        print(f"FAILED block at {page}:{line}:\n{code}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    code: str


def python_blocks(page: Path) -> list[Block]:
    """The runnable ```python blocks of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()),
                            "")
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            assert end < len(lines), f"{page.name}:{index + 1}: unclosed code block"
            if not SKIP_MARK.match(previous.strip()):
                blocks.append(Block(index + 1, "\n".join(lines[index + 1:end]) + "\n"))
            index = end
        index += 1
    return blocks


def _missing_or_fail(what: str) -> None:
    """Skip on a developer machine; under CI a missing tool is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must check the docs but {what}: pip install -e '.[docs]'")
    pytest.skip(f"{what} (pip install -e '.[docs]')")


def test_mkdocs_build_is_strict_and_clean(tmp_path: Path):
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")
               if _find_spec(m) is None]
    if missing:
        _missing_or_fail(f"{', '.join(missing)} not installed")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()


def _find_spec(name: str) -> object:
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:  # the parent package is missing
        return None


def test_the_convention_finds_blocks():
    counts = {page.name: len(python_blocks(page)) for page in PAGES}
    assert counts.get("quickstart.md", 0) >= 4 and counts.get("integrations.md", 0) >= 6, counts


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run_on_the_local_provider(page: Path, tmp_path: Path):
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([f"docs/{page.name}", python_blocks(page)]))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(_RUNNER)
    env = {**os.environ, "VMEXEC_PROVIDER": "local"}
    # A scratch working directory: blocks must not depend on (or litter) the checkout.
    out = subprocess.run([sys.executable, str(runner), str(spec)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=PAGE_TIMEOUT)
    if out.returncode == 3:
        _missing_or_fail(out.stdout.strip())
    assert out.returncode == 0, (
        f"{out.stdout}{out.stderr}\nA ```python block in docs/ must run as written on the "
        "local provider (with its own imports and definitions); a block that cannot — it "
        "needs AWS, SSH hosts or a library vmexec does not test with — is preceded by a "
        "line <!-- not run: reason -->.")
