"""Dispatch overhead of vmexec against ProcessPoolExecutor, in the same run.

Trivial ``f(x) = x + 1`` on 2 slots:

* ``map`` of 20,000 items with chunksize=1 and chunksize=100 (throughput, items/s);
* ``submit(...).result()`` round trip (p50, µs), the executors interleaved;
* the SSH channel's own round trip (``cat``), the floor under SSH's.

For vmexec over local pipes, and over SSH to 127.0.0.1 when an OpenSSH ``sshd`` is
available (started here on a free loopback port). Machines are noisy, so the figures
that matter are the ratios against ProcessPoolExecutor measured in this same run.

    python benchmarks/dispatch.py [--items 20000] [--rounds 3] [--no-ssh]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Optional

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


def round_trip_p50s(round_trips: dict[str, Callable[[], object]], blocks: int = 10,
                    calls: int = 100) -> dict[str, float]:
    """Median seconds of each round trip (``ex.submit(f, 1).result()``), measured in
    interleaved blocks of ``calls``: a round trip is a few hundred microseconds, and a
    busy machine's speed drifts more than that between one executor's run and the
    next. Interleaving gives each the same share of the drift."""
    samples: dict[str, list[float]] = {name: [] for name in round_trips}
    for one in round_trips.values():
        for _ in range(50):
            one()
    for _ in range(blocks):
        for name, one in round_trips.items():
            out = samples[name]
            for _ in range(calls):
                start = time.perf_counter()
                one()
                out.append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextlib.contextmanager
def ssh_echo(server: Any) -> Iterator[Callable[[], object]]:
    """One round trip of 40 bytes through the client's SSH channel to ``cat`` and back:
    the transport's own floor, with no agent, worker or future in the way."""
    import threading

    from vmexec.providers.ssh import parse_host
    from vmexec.transports import aio
    from vmexec.transports.ssh_async import open_async_ssh

    user, host, port = parse_host(server.host_string)
    aio.hold()
    try:
        transport = aio.run(open_async_ssh(
            host, port, user, key_filename=server.client_key, known_hosts=server.known_hosts,
            timeout=30, command="cat")).result(30)
        echoed = threading.Event()
        transport.start(lambda data: echoed.set(), lambda reason: echoed.set())

        def round_trip() -> object:
            echoed.clear()
            transport.write(b"x" * 40)
            return echoed.wait(10)

        yield round_trip
        transport.close()
        transport.join(10)
    finally:
        aio.release()


def measure(name: str, ex: Executor, items: int, rounds: int) -> dict[str, float]:
    row = {
        "map_cs1": throughput(ex, items, 1, rounds),
        "map_cs100": throughput(ex, items, 100, rounds),
    }
    print(f"{name:<24} map cs=1 {row['map_cs1']:>10,.0f}/s   map cs=100 {row['map_cs100']:>12,.0f}/s",
          flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ssh", action="store_true", help="skip the SSH measurement")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        executors: dict[str, Executor] = {
            "ppe": stack.enter_context(ProcessPoolExecutor(2)),
            "local": stack.enter_context(VMExecutor(2, provider="local")),
        }
        server = None
        if not args.no_ssh:
            from vmexec.testing.sshd import SSHServer, sshd_available

            why_not = sshd_available()
            if why_not:
                print(f"(SSH skipped: {why_not})")
            else:
                workdir = stack.enter_context(tempfile.TemporaryDirectory())
                server = stack.enter_context(SSHServer(workdir))
                executors["ssh"] = stack.enter_context(VMExecutor(
                    2, provider="ssh", hosts=[server.host_string], ssh_key=server.client_key,
                    known_hosts=server.known_hosts, python=sys.executable))
        names = {"ppe": "ProcessPoolExecutor(2)", "local": "vmexec local",
                 "ssh": "vmexec ssh 127.0.0.1"}
        rows = {key: measure(names[key], ex, args.items, args.rounds)
                for key, ex in executors.items()}
        round_trips: dict[str, Callable[[], object]] = {
            key: functools.partial(lambda ex: ex.submit(f, 1).result(), ex)
            for key, ex in executors.items()}
        if server is not None:
            round_trips["echo"] = stack.enter_context(ssh_echo(server))
            names["echo"] = "ssh echo (cat)"
        p50s = round_trip_p50s(round_trips)
        ppe = rows["ppe"]
        ppe["p50"] = p50s["ppe"]
        for key, p50 in p50s.items():
            rows.setdefault(key, {})["p50"] = p50
            print(f"{names[key]:<24} round trip p50 {p50 * 1e6:>7.0f} µs "
                  f"({p50 / ppe['p50']:.2f}x ProcessPoolExecutor's; interleaved)", flush=True)
        if "echo" in p50s:
            print("  (ssh echo: 40 bytes through the SSH channel to cat and back, the "
                  "transport alone: the floor under the SSH submit round trip)")

    print("\nratios (vmexec / ProcessPoolExecutor; throughput: higher is better, "
          "latency: lower is better)")
    # Goals of issue 10 (scale): chunksize=1 at chunked speed, chunksize=100 no worse.
    goals = [("local", 10.0, 2.0, 1.2), ("ssh", 8.0, 2.0, 1.5)]
    for name, want_cs1, want_cs100, want_p50 in goals:
        if name not in rows:
            continue
        row = rows[name]
        cs1 = row["map_cs1"] / ppe["map_cs1"]
        cs100 = row["map_cs100"] / ppe["map_cs100"]
        p50 = row["p50"] / ppe["p50"]
        print(f"  {name:<6} map cs=1 {cs1:5.2f}x (goal >= {want_cs1}x)   "
              f"map cs=100 {cs100:5.2f}x (goal >= {want_cs100}x)   "
              f"submit p50 {p50:5.2f}x (goal <= {want_p50}x: {row['p50'] * 1e6:.0f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
