"""Half ARM, half Intel, in two regions — with the plan before and the receipt after.

    python examples/mixed_arch_two_regions.py                       # on this computer
    VMEXEC_PROVIDER=ec2 python examples/mixed_arch_two_regions.py   # on AWS (costs cents)

On EC2 this plans c7g.large (arm64) and c7i.large (x86_64) machines in us-east-1 and
us-west-2, refuses to start if the plan costs more than $1/h, copies this Python
environment to both architectures, and logs a cost receipt when the block ends. On the
local provider the cloud options are accepted and ignored, so the script runs as is.
"""

from __future__ import annotations

import collections
import logging
import os
import platform

from vmexec import VMExecutor


def where(task: int) -> tuple[int, str, str]:
    """Which architecture and machine ran ``task``."""
    return task, platform.machine(), platform.node()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vmexec.scheduler").setLevel(logging.WARNING)
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    with VMExecutor(
        max_workers=8,
        provider=provider,
        instance_type=["c7g.large", "c7i.large"],
        regions=["us-east-1", "us-west-2"],
        max_hourly_cost=1.0,
        keepalive="2 minutes",
    ) as ex:
        print(ex.plan)
        placements = collections.Counter((arch, node) for _, arch, node in ex.map(where, range(64)))
        for (arch, node), count in sorted(placements.items()):
            print(f"{count:3d} tasks on {node} ({arch})")
        print(f"running cost so far: ${ex.cost:.4f}")
    # the receipt ("N machines (...), 1m02s, ≈ $0.01, 0 resources left") is logged here


if __name__ == "__main__":
    main()
