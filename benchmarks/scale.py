"""What one client pays per machine and per task, from 10 to 2000 machines.

Runs the unchanged client (``provider="ssh"``, real SSH, pinned host keys, the real
wire protocol) against ``vmexec.testing.simfleet``: simulated machines in one other
process, each on its own loopback address. Everything measured is the *client
process*: its CPU time (``time.process_time``: all its threads), its RSS and threads.

For each fleet size N (machines) and slots per machine:

* ready: seconds from the first submit until all N machines have joined;
* CPU/connect: client CPU during that phase, per machine;
* idle: client CPU while N machines sit connected and idle (heartbeats included), as a
  percentage of one core, over ``--idle`` seconds;
* CPU/task for ``map(sleep_task, [0]*K)`` at chunksize 1 and 100;
* tasks/s fleet-wide for 1 ms tasks (``sleep_task(0.001)``: each holds a slot 1 ms);
* p50/p99 submit→result of single ``submit`` calls (40 in flight);
* RSS and threads added per machine.

ProcessPoolExecutor(2) runs the same chunksize-1 map in the same run, as the
reference for CPU per task.

    python benchmarks/scale.py                       # N = 10 100 500 1000 2000, 1 and 2 slots
    python benchmarks/scale.py --machines 10 100 --slots 1 --json out.json
    python benchmarks/scale.py --plot docs/img/scale.png   (needs matplotlib)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Any

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vmexec import VMExecutor  # noqa: E402
from vmexec.testing.simfleet import SimFleet, sleep_task  # noqa: E402


def cpu() -> float:
    return time.process_time()


def measure(machines: int, slots: int, idle_seconds: float, tasks: int) -> dict[str, Any]:
    proc = psutil.Process()
    row: dict[str, Any] = {"machines": machines, "slots": slots}
    with SimFleet(machines=machines, slots=slots) as fleet:
        warm_up(fleet)  # imports, the I/O loop, crypto: paid once, not per machine
        rss0, threads0 = proc.memory_info().rss, proc.num_threads()
        ex = VMExecutor(max_workers=machines * slots, heartbeat_interval=5.0,
                        **fleet.executor_options())
        try:
            # Connect: enough work to want every slot; wait until all machines joined.
            c0, t0 = cpu(), time.perf_counter()
            warm = [ex.submit(sleep_task, 1.0) for _ in range(machines * slots)]
            while len(ex._scheduler.machines()) < machines:
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"only {len(ex._scheduler.machines())} of {machines} "
                                       "machines joined in 600 s")
                time.sleep(0.01)
            row["ready_s"] = time.perf_counter() - t0
            row["cpu_per_connect_ms"] = (cpu() - c0) / machines * 1e3
            wait(warm)
            row["rss_per_machine_kib"] = (proc.memory_info().rss - rss0) / machines / 1024
            row["threads"] = proc.num_threads()
            row["threads_per_machine"] = (proc.num_threads() - threads0) / machines
            # Idle: connected, nothing to do; heartbeats run.
            time.sleep(1.0)
            c0, t0 = cpu(), time.perf_counter()
            time.sleep(idle_seconds)
            row["idle_pct_core"] = (cpu() - c0) / (time.perf_counter() - t0) * 100
            # CPU per task, map chunksize 1 and 100 (zero-second tasks).
            for chunksize in (1, 100):
                c0 = cpu()
                out = list(ex.map(sleep_task, [0.0] * tasks, range(tasks), chunksize=chunksize))
                assert out == list(range(tasks))
                row[f"cpu_per_task_cs{chunksize}_us"] = (cpu() - c0) / tasks * 1e6
            # Fleet-wide throughput of 1 ms tasks.
            n = max(tasks, machines * slots * 20)
            t0 = time.perf_counter()
            out = list(ex.map(sleep_task, [0.001] * n))
            row["tasks_per_s_1ms"] = n / (time.perf_counter() - t0)
            # Latency of single submits, 40 in flight.
            latencies: list[float] = []
            lock = threading.Lock()
            sem = threading.Semaphore(40)

            def done(started: float) -> Any:
                def callback(_: Any) -> None:
                    with lock:
                        latencies.append(time.perf_counter() - started)
                    sem.release()
                return callback

            for _ in range(2000):
                sem.acquire()
                ex.submit(sleep_task, 0.0).add_done_callback(done(time.perf_counter()))
            for _ in range(40):
                sem.acquire()
            latencies.sort()
            row["p50_ms"] = statistics.median(latencies) * 1e3
            row["p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1e3
        finally:
            t0 = time.perf_counter()
            ex.shutdown(wait=True)
            row["shutdown_s"] = time.perf_counter() - t0
    return row


def warm_up(fleet: SimFleet) -> None:
    """One throwaway connection, so that RSS per machine is the slope, not imports."""
    from vmexec.providers.ssh import parse_host
    from vmexec.transports import aio
    from vmexec.transports.ssh_async import open_async_ssh

    user, host, port = parse_host(fleet.hosts[0])
    aio.hold()
    transport = aio.run(open_async_ssh(host, port, user, key_filename=fleet.ssh_key,
                                       known_hosts=fleet.known_hosts, timeout=60,
                                       command="python3 -m vmexec.agent")).result()
    transport.close()
    transport.join(10)
    import vmexec.executor  # noqa: F401  (and everything the executor imports)


def reference(tasks: int) -> dict[str, Any]:
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(sleep_task, [0.0] * 100))
        c0 = cpu()
        out = list(pool.map(sleep_task, [0.0] * tasks, range(tasks)))
        assert out == list(range(tasks))
        per_task = (cpu() - c0) / tasks * 1e6
    return {"ppe_cpu_per_task_cs1_us": per_task}


COLUMNS = [
    ("machines", "N", "{:d}"), ("slots", "slots", "{:d}"), ("ready_s", "all ready s", "{:.1f}"),
    ("cpu_per_connect_ms", "CPU/connect ms", "{:.2f}"),
    ("idle_pct_core", "idle % core", "{:.2f}"),
    ("cpu_per_task_cs1_us", "CPU/task cs=1 µs", "{:.1f}"),
    ("cpu_per_task_cs100_us", "CPU/task cs=100 µs", "{:.1f}"),
    ("tasks_per_s_1ms", "tasks/s (1 ms)", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
    ("rss_per_machine_kib", "RSS/machine KiB", "{:.0f}"),
    ("threads", "threads", "{:d}"),
    ("shutdown_s", "shutdown s", "{:.1f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else "—"
                                       for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for slots in sorted({r["slots"] for r in rows}):
        sel = [r for r in rows if r["slots"] == slots]
        n = [r["machines"] for r in sel]
        axes[0].plot(n, [r["cpu_per_task_cs1_us"] for r in sel], "o-",
                     label=f"map cs=1, {slots} slot(s)")
        axes[0].plot(n, [r["cpu_per_task_cs100_us"] for r in sel], "s--",
                     label=f"map cs=100, {slots} slot(s)")
        axes[1].plot(n, [r["cpu_per_connect_ms"] for r in sel], "o-",
                     label=f"CPU per connect, {slots} slot(s)")
        axes[2].plot(n, [r["idle_pct_core"] for r in sel], "o-", label=f"{slots} slot(s)")
    axes[0].axhline(15, color="grey", linestyle=":", label="goal 15 µs")
    axes[2].axhline(5, color="grey", linestyle=":", label="goal 5 %")
    axes[0].set(xscale="log", xlabel="machines", ylabel="client CPU µs per task",
                title="client CPU per task")
    axes[1].set(xscale="log", xlabel="machines", ylabel="client CPU ms per machine",
                title="client CPU per machine connected")
    axes[2].set(xscale="log", xlabel="machines", ylabel="% of one core",
                title="idle client CPU (heartbeats)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, nargs="+", default=[10, 100, 500, 1000, 2000])
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--idle", type=float, default=15.0, help="idle window, seconds")
    parser.add_argument("--tasks", type=int, default=20000, help="tasks per map measurement")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one configuration, in a fresh process (so RSS is this fleet's alone)
        print(json.dumps(measure(args.machines[0], args.slots[0], args.idle, args.tasks)))
        return
    rows = []
    ref = reference(args.tasks)
    print(f"ProcessPoolExecutor(2), map cs=1: {ref['ppe_cpu_per_task_cs1_us']:.1f} µs client "
          "CPU per task", flush=True)
    for slots in args.slots:
        for machines in args.machines:
            out = subprocess.run(
                [sys.executable, __file__, "--one", "--machines", str(machines), "--slots",
                 str(slots), "--idle", str(args.idle), "--tasks", str(args.tasks)],
                check=True, stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row.update(ref)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
