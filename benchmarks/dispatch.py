"""Dispatch overhead of vmexec against ProcessPoolExecutor, in the same run.

Trivial ``f(x) = x + 1`` on 2 slots:

* ``map`` of 20,000 items with chunksize=1 and chunksize=100 (throughput, items/s);
* ``submit(...).result()`` round trip (p50, µs).

For vmexec over local pipes, and over SSH to 127.0.0.1 when an OpenSSH ``sshd`` is
available (started here on a free loopback port). Machines are noisy, so the figures
that matter are the ratios against ProcessPoolExecutor measured in this same run.

    python benchmarks/dispatch.py [--items 20000] [--rounds 3] [--no-ssh]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Callable, Optional

from vmexec import VMExecutor


def f(x: int) -> int:
    return x + 1


def throughput(ex: Executor, items: int, chunksize: int, rounds: int) -> float:
    """Best-of-``rounds`` items per second for ``list(ex.map(f, range(items)))``."""
    list(ex.map(f, range(200), chunksize=chunksize))  # warm up workers and caches
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        result = list(ex.map(f, range(items), chunksize=chunksize))
        elapsed = time.perf_counter() - start
        assert result[-1] == items and len(result) == items
        best = max(best, items / elapsed)
    return best


def round_trip_p50(ex: Executor, calls: int = 1000) -> float:
    """Median seconds of ``ex.submit(f, 1).result()``."""
    for _ in range(50):
        ex.submit(f, 1).result()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        ex.submit(f, 1).result()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def ssh_echo_p50(server: object, calls: int = 1000) -> float:
    """Median round trip of 40 bytes through the client's SSH channel to ``cat`` and back:
    the transport's own floor, with no agent, worker or future in the way."""
    import threading

    from vmexec.providers.ssh import parse_host
    from vmexec.transports import aio
    from vmexec.transports.ssh_async import open_async_ssh

    user, host, port = parse_host(server.host_string)  # type: ignore[attr-defined]
    aio.hold()
    try:
        transport = aio.run(open_async_ssh(
            host, port, user, key_filename=server.client_key,  # type: ignore[attr-defined]
            known_hosts=server.known_hosts, timeout=30,  # type: ignore[attr-defined]
            command="cat")).result(30)
        echoed = threading.Event()
        transport.start(lambda data: echoed.set(), lambda reason: echoed.set())
        samples = []
        for i in range(calls + 50):
            echoed.clear()
            start = time.perf_counter()
            transport.write(b"x" * 40)
            echoed.wait(10)
            if i >= 50:
                samples.append(time.perf_counter() - start)
        transport.close()
        transport.join(10)
        return statistics.median(samples)
    finally:
        aio.release()


def measure(name: str, make: Callable[[], Executor], items: int, rounds: int) -> dict[str, float]:
    with make() as ex:
        row = {
            "map_cs1": throughput(ex, items, 1, rounds),
            "map_cs100": throughput(ex, items, 100, rounds),
            "p50": round_trip_p50(ex),
        }
    print(f"{name:<24} map cs=1 {row['map_cs1']:>10,.0f}/s   map cs=100 {row['map_cs100']:>12,.0f}/s"
          f"   submit p50 {row['p50'] * 1e6:>7.0f} µs", flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ssh", action="store_true", help="skip the SSH measurement")
    args = parser.parse_args(argv)

    ppe = measure("ProcessPoolExecutor(2)", lambda: ProcessPoolExecutor(2), args.items, args.rounds)
    local = measure("vmexec local", lambda: VMExecutor(2, provider="local"), args.items, args.rounds)
    ssh = None
    if not args.no_ssh:
        from vmexec.testing.sshd import SSHServer, sshd_available

        why_not = sshd_available()
        if why_not:
            print(f"(SSH skipped: {why_not})")
        else:
            with tempfile.TemporaryDirectory() as workdir, SSHServer(workdir) as server:
                ssh = measure("vmexec ssh 127.0.0.1", lambda: VMExecutor(
                    2, provider="ssh", hosts=[server.host_string], ssh_key=server.client_key,
                    known_hosts=server.known_hosts, python=sys.executable), args.items,
                    args.rounds)
                echo = ssh_echo_p50(server)
                print(f"{'ssh echo (cat)':<24} round trip p50 {echo * 1e6:.0f} µs: the SSH "
                      f"transport alone, {echo / ppe['p50']:.2f}x ProcessPoolExecutor's "
                      "submit round trip", flush=True)

    print("\nratios (vmexec / ProcessPoolExecutor; throughput: higher is better, "
          "latency: lower is better)")
    # Goals of issue 10 (scale): chunksize=1 at chunked speed, chunksize=100 no worse.
    rows = [("local", local, 10.0, 2.0, 1.2)]
    if ssh:
        rows.append(("ssh", ssh, 8.0, 2.0, 1.5))
    for name, row, want_cs1, want_cs100, want_p50 in rows:
        cs1 = row["map_cs1"] / ppe["map_cs1"]
        cs100 = row["map_cs100"] / ppe["map_cs100"]
        p50 = row["p50"] / ppe["p50"]
        goal_p50 = f"goal <= {want_p50}x"
        print(f"  {name:<6} map cs=1 {cs1:5.2f}x (goal >= {want_cs1}x)   "
              f"map cs=100 {cs100:5.2f}x (goal >= {want_cs100}x)   "
              f"submit p50 {p50:5.2f}x ({goal_p50}: {row['p50'] * 1e6:.0f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
