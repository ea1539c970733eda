"""What one idle SSH connection costs the client: paramiko against asyncssh, same run.

Opens N agent channels to the fleet simulator with each library the way vmexec does
(``transports.ssh.open_ssh_transport``: paramiko, a transport thread plus a stderr
reader, and the scheduler's reader thread on top; ``transports.ssh_async``: asyncssh on
the shared I/O loop), then measures, for the client process only: CPU per connect,
threads and RSS per connection, and CPU while the connections sit idle (no traffic at
all: this is the library's own cost of holding a connection open).

    python benchmarks/ssh_libraries.py --machines 200 --idle 10
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vmexec.providers.ssh import parse_host  # noqa: E402
from vmexec.testing.simfleet import SimFleet  # noqa: E402
from vmexec.transports import aio  # noqa: E402
from vmexec.transports.ssh import open_ssh_transport  # noqa: E402
from vmexec.transports.ssh_async import open_async_ssh  # noqa: E402

COMMAND = "python3 -m vmexec.agent"


def measure(library: str, fleet: SimFleet, idle: float) -> dict[str, Any]:
    proc = psutil.Process()
    hosts = [parse_host(h) for h in fleet.hosts]
    rss0, threads0 = proc.memory_info().rss, proc.num_threads()
    c0, t0 = time.process_time(), time.perf_counter()
    transports: list[Any] = []
    if library == "paramiko":
        def one(host: tuple[str, str, int]) -> Any:
            user, address, port = host
            transport = open_ssh_transport(address, port, user, key_filename=fleet.ssh_key,
                                           known_hosts=fleet.known_hosts, command=COMMAND,
                                           timeout=60)
            # The scheduler gives every blocking transport a reader thread.
            threading.Thread(target=lambda: [None for _ in iter(
                lambda: transport.read(1 << 16), b"")], daemon=True).start()
            return transport

        with ThreadPoolExecutor(32) as pool:
            transports = list(pool.map(one, hosts))
    else:
        async def open_all() -> list[Any]:
            import asyncio

            return list(await asyncio.gather(*(
                open_async_ssh(address, port, user, key_filename=fleet.ssh_key,
                               known_hosts=fleet.known_hosts, command=COMMAND, timeout=60)
                for user, address, port in hosts)))

        transports = aio.run(open_all()).result()
        for transport in transports:
            transport.start(lambda data: None, lambda reason: None)
    row: dict[str, Any] = {"library": library, "machines": len(hosts)}
    row["connect_s"] = time.perf_counter() - t0
    row["cpu_per_connect_ms"] = (time.process_time() - c0) / len(hosts) * 1e3
    time.sleep(1.0)
    row["threads_per_machine"] = (proc.num_threads() - threads0) / len(hosts)
    row["rss_per_machine_kib"] = (proc.memory_info().rss - rss0) / len(hosts) / 1024
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(idle)
    row["idle_pct_core"] = (time.process_time() - c0) / (time.perf_counter() - t0) * 100
    row["idle_pct_core_per_1000"] = row["idle_pct_core"] * 1000 / len(hosts)
    for transport in transports:
        transport.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, default=200)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    print("| library | machines | connect s | CPU/connect ms | threads/machine | "
          "RSS/machine KiB | idle % core | idle % core per 1000 |")
    print("|---|---|---|---|---|---|---|---|")
    for library in ("paramiko", "asyncssh"):
        with SimFleet(machines=args.machines) as fleet:
            row = measure(library, fleet, args.idle)
        print(f"| {row['library']} | {row['machines']} | {row['connect_s']:.1f} | "
              f"{row['cpu_per_connect_ms']:.1f} | {row['threads_per_machine']:.2f} | "
              f"{row['rss_per_machine_kib']:.0f} | {row['idle_pct_core']:.2f} | "
              f"{row['idle_pct_core_per_1000']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
