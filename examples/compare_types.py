"""Which machine type is fastest, and cheapest per call? Try them all at once.

    python examples/compare_types.py                       # on this computer
    VMEXEC_PROVIDER=ec2 python examples/compare_types.py   # one machine of each type

Runs the same benchmark three times on one machine of each candidate type, in parallel,
and prints type, architecture, region, $/h, median runtime (measured on the machine),
$ per call and speed-up against the cheapest. The CLI does the same:
``vmexec compare examples.compare_types:workload --types c7g.large,c7i.large,c7a.large``.
"""

from __future__ import annotations

import os

import vmexec


def workload(n: int = 300_000) -> int:
    """A CPU-bound stand-in for your function: sum of squares modulo a prime."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


def main() -> None:
    result = vmexec.compare(workload, 300_000,
                            instance_types=["c7g.large", "c7i.large", "c7a.large"],
                            regions="us-east-1", repeat=3,
                            provider=os.environ.get("VMEXEC_PROVIDER", "local"))
    print(result)


if __name__ == "__main__":
    main()
