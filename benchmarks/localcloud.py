"""A fleet of fake VMs: how long until the first result, and until every machine is ready.

Starts a ``LocalCloud`` (moto + fake VMs on this computer, see
``vmexec.testing.localcloud``) and runs ``VMExecutor(provider="ec2")`` on it with enough
slots for ``--machines`` machines. Every machine runs vmexec's real boot script: keys,
sshd restart, a venv with pip, vmexec and its dependencies installed from the cloud's
local index; then the client connects over SSH and starts the agent.

Printed, measured from the ``VMExecutor(...)`` call:

* plan + launch (the constructor, then the first ``CreateFleet`` calls);
* the first result (the first machine booted, connected and ran a task);
* every machine ready (all joined the fleet);
* all results, and teardown (terminate, delete, verify by tag);

plus the spread of the machines' own boot times (their boot logs' "ready in Ns"), the
EC2 API calls by operation, and the wheels the machines downloaded. Boots are CPU-bound
here (every machine creates a venv and installs about 20 MB of wheels), so on a small
computer "every machine ready" measures this computer, not vmexec; "first result" is
the latency a user sees.

    python benchmarks/localcloud.py [--machines 20] [--regions us-east-1,us-west-2]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import resource
import statistics
import sys
import time
from concurrent.futures import as_completed

import psutil

from vmexec import VMExecutor
from vmexec.testing.localcloud import LocalCloud


def task(seconds: float) -> str:
    time.sleep(seconds)
    return os.environ.get("VMEXEC_ROOT", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--instance-type", default="c7i.large",
                        help="2 vCPUs = 2 slots per machine")
    parser.add_argument("--regions", default="us-east-1,us-west-2")
    parser.add_argument("--task-seconds", type=float, default=0.5)
    parser.add_argument("--deadman-interval", type=int, default=None,
                        help="VMEXEC_DEADMAN_INTERVAL for the machines (their dead-man "
                             "loop scans /proc, which all fake VMs share)")
    parser.add_argument("--concurrent-boots", type=int, default=None,
                        help="boot scripts run at once (default: the CPU count)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    regions = args.regions.split(",")
    slots = 2 * args.machines  # c7i.large / c7g.large: 2 vCPUs each

    with LocalCloud(regions=regions, max_concurrent_boots=args.concurrent_boots) as cloud:
        boot_env = cloud.boot_env()
        if args.deadman_interval is not None:
            boot_env["VMEXEC_DEADMAN_INTERVAL"] = str(args.deadman_interval)
        options = cloud.executor_options(boot_env=boot_env)
        print(f"local cloud: {os.cpu_count()} CPUs, {args.machines} machines x 2 slots "
              f"({args.instance_type}) in {', '.join(regions)}, "
              f"{cloud.max_concurrent_boots} boot scripts at a time")
        t0 = time.monotonic()
        ex = VMExecutor(max_workers=slots, provider="ec2", instance_type=args.instance_type,
                        regions=regions, heartbeat_interval=2.0, heartbeat_timeout=120.0,
                        watchdog_timeout=300.0, boot_timeout=args.timeout, **options)
        t_constructed = time.monotonic()
        try:
            # Enough work for every slot, several rounds, so the fleet grows to its size
            # and keeps every machine busy while the last ones boot.
            futures = [ex.submit(task, args.task_seconds) for _ in range(slots * 4)]
            first = next(as_completed(futures, timeout=args.timeout))
            t_first = time.monotonic()
            first.result()
            cloud.wait_for(lambda: len(ex.fleet) >= args.machines, args.timeout,
                           lambda: f"{args.machines} machines (have {len(ex.fleet)})")
            t_all_ready = time.monotonic()
            per_vm = _vm_memory(cloud)
            roots = [f.result(timeout=args.timeout) for f in futures]
            t_results = time.monotonic()
        finally:
            t_shutdown = time.monotonic()
            ex.shutdown(wait=True)
            t_down = time.monotonic()
        boots = _boot_seconds(cloud)
        leftovers = cloud.tagged_resources()

    print(f"  VMExecutor(...) (plan)        {t_constructed - t0:7.2f} s")
    print(f"  first result                  {t_first - t0:7.2f} s")
    print(f"  all {args.machines} machines ready        {t_all_ready - t0:7.2f} s")
    print(f"  all {len(futures)} results              {t_results - t0:7.2f} s "
          f"(on {len(set(roots))} machines)")
    print(f"  teardown                      {t_down - t_shutdown:7.2f} s "
          f"(left tagged: {len(leftovers)})")
    if boots:
        print(f"  machine boot scripts          min {min(boots)} s, median "
              f"{statistics.median(boots):g} s, max {max(boots)} s")
    if per_vm:
        print(f"  memory per ready machine        {statistics.median(per_vm):7.0f} MiB RSS "
              f"(median; its sshd, agent, workers, dead-man loop)")
    calls = collections.Counter()
    for (_, operation), count in cloud.api_calls.items():
        calls[operation] += count
    print("  EC2/SSM API calls: " + ", ".join(f"{op} {n}" for op, n in sorted(calls.items())))
    print(f"  wheels downloaded by machines: {cloud.wheel_requests}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"  CPU of this process (client + moto + harness): "
          f"{usage.ru_utime + usage.ru_stime:.1f} s; peak RSS {usage.ru_maxrss / 1024:.0f} MiB")
    return 0 if not leftovers else 1


def _vm_memory(cloud: LocalCloud) -> list[float]:
    """RSS in MiB of each machine's processes (shared pages counted in each: an upper
    bound)."""
    sizes = []
    for vm in cloud.vms.values():
        total = 0
        for proc in vm.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        if total:
            sizes.append(total / 2**20)
    return sizes


def _boot_seconds(cloud: LocalCloud) -> list[int]:
    found = []
    for vm in cloud.vms.values():
        match = re.search(r"ready in (\d+)s", vm.boot_log())
        if match:
            found.append(int(match.group(1)))
    return found


if __name__ == "__main__":
    sys.exit(main())
