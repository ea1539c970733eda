"""Every ``examples/*.py`` runs to completion on the local provider.

The examples are started together (they spend much of their time starting
interpreters and importing libraries, which overlaps well) and each test waits for
its own, within a deadline. None is skipped: an example whose library is missing
fails, because the test extra installs what the examples use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Seconds from the start of all examples; generous for a busy 2-core CI machine.
DEADLINE = 240.0

# A line each example must print, so that "exit 0" also means "did its job".
EXPECTED = {
    "quickstart": "done: every machine is gone",
    "monte_carlo": "Black-Scholes",
    "hyperparameter_search": "refined search: best",
    "dask_graph": "mean of the cleaned data",
    "scipy_optimize": "minimum 0.0",
    "asyncio_gather": "8 requests served",
    "emcee_sampler": "acceptance",
    "progress_bar": "longest chain below 20,000: 278 steps (map agrees: 278)",
    "mixed_arch_two_regions": "running cost so far: $",
    "gpu_type": "GPUs: ",
    "compare_types": "(speed-up against the cheapest: c7g.large",
}


class Run(NamedTuple):
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started: float  # time.monotonic() at start


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    workdir = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "VMEXEC_PROVIDER": "local"}
    started: dict[str, Run] = {}
    for path in EXAMPLES:
        # Output to files, not pipes: nobody reads a pipe until the example ends,
        # and a full pipe would block it.
        out, err = workdir / f"{path.stem}.out", workdir / f"{path.stem}.err"
        with open(out, "wb") as out_file, open(err, "wb") as err_file:
            process = subprocess.Popen([sys.executable, str(path)], cwd=workdir, env=env,
                                       stdin=subprocess.DEVNULL, stdout=out_file,
                                       stderr=err_file)
        started[path.stem] = Run(process, out, err, time.monotonic())
    yield started
    for run in started.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def test_every_example_has_an_expected_line():
    assert {p.stem for p in EXAMPLES} == set(EXPECTED), \
        "add the new example to EXPECTED with a line it must print"


@pytest.mark.parametrize("name", [p.stem for p in EXAMPLES])
def test_example_runs_on_the_local_provider(runs: dict[str, Run], name: str):
    run = runs[name]
    try:
        code = run.process.wait(timeout=max(1.0, DEADLINE - (time.monotonic() - run.started)))
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
        pytest.fail(f"examples/{name}.py did not finish within {DEADLINE:.0f}s:\n"
                    f"{run.stdout.read_text()}\n{run.stderr.read_text()[-3000:]}")
    stdout, stderr = run.stdout.read_text(), run.stderr.read_text()
    assert code == 0, f"examples/{name}.py exited {code}:\n{stdout}\n{stderr[-3000:]}"
    assert EXPECTED.get(name, "") in stdout, stdout

