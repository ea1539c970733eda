"""Environment sync end to end on the local cloud: how long until a fake VM is ready.

Plan -> preflight -> S3 staging (moto) -> boot -> install over SSH with uv -> agent -> the
first result, for a small requirements environment plus a local module, with a cold uv
cache (a fresh machine) and with a warm one (a machine whose image already holds the
package cache, modelled by a UV_CACHE_DIR shared by the fake VMs). Then a named fleet:
the first run, a second run that reuses the warm machine (no launch, no install), and a
third after an edit of the local module (only that code re-synced).

    python benchmarks/envsync_localcloud.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from vmexec import VMExecutor
from vmexec.testing.localcloud import LocalCloud


def run_once(label: str, machine_env: dict[str, str], code: Path) -> float:
    def remote(x: int) -> int:
        import fleetmath

        return fleetmath.triple(x)

    with LocalCloud(regions=["us-east-1"], vm_tools=("uv",), machine_env=machine_env) as cloud:
        options = cloud.executor_options(environment=["tenacity"])
        start = time.perf_counter()
        with VMExecutor(1, provider="ec2", instance_type="c7i.large", regions=["us-east-1"],
                        boot_timeout=300.0, **options) as ex:
            constructed = time.perf_counter() - start
            assert ex.submit(remote, 2).result() == 6
            first = time.perf_counter() - start
        left = cloud.tagged_resources()
    print(f"{label:<28} VMExecutor() {constructed:5.2f}s   machine ready + first result "
          f"{first:6.2f}s   tagged resources left {len(left)}", flush=True)
    return first


def named_runs(code: Path) -> tuple[float, float, float]:
    """First run of a named fleet, reuse, reuse after a code edit: seconds to the first
    result of each (the same fake VM serves all three)."""
    def remote(x: int) -> int:
        import fleetmath

        return fleetmath.triple(x)

    timings = []
    with LocalCloud(regions=["us-east-1"], vm_tools=("uv",)) as cloud:
        options = cloud.executor_options(environment=["tenacity"])
        for label, body in (("named fleet, first run", "3 * x"),
                            ("named fleet, reused", "3 * x"),
                            ("reused after a code edit", "x + x + x")):
            (code / "fleetmath.py").write_text(f"def triple(x):\n    return {body}\n")
            sys.modules.pop("fleetmath", None)
            calls = sum(n for (_, op), n in cloud.api_calls.items() if op == "CreateFleet")
            start = time.perf_counter()
            with VMExecutor(1, provider="ec2", instance_type="c7i.large",
                            regions=["us-east-1"], name="bench", keepalive=120,
                            boot_timeout=300.0, **options) as ex:
                assert ex.submit(remote, 2).result() == 6
                first = time.perf_counter() - start
            launched = sum(n for (_, op), n in cloud.api_calls.items()
                           if op == "CreateFleet") - calls
            print(f"{label:<28} first result {first:6.2f}s   CreateFleet calls {launched}",
                  flush=True)
            timings.append(first)
        # The kept machine goes with the local cloud (on EC2: after keepalive, by itself).
    return timings[0], timings[1], timings[2]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "project"
        code.mkdir()
        (code / "fleetmath.py").write_text("def triple(x):\n    return 3 * x\n")
        os.chdir(code)
        sys.path.insert(0, str(code))
        shared_cache = str(Path(tmp) / "uv-cache")
        cold = run_once("cold uv cache", {}, code)
        run_once("warming the shared cache", {"UV_CACHE_DIR": shared_cache}, code)
        warm = run_once("warm uv cache", {"UV_CACHE_DIR": shared_cache}, code)
        print(f"warm / cold: {warm / cold:.2f}")
        os.environ["VMEXEC_FLEETS_DIR"] = str(Path(tmp) / "fleets")
        first, reused, edited = named_runs(code)
        print(f"named fleet reused / first run: {reused / first:.2f}; after a code edit / "
              f"first run: {edited / first:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
