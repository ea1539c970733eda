"""Pick a GPU machine type: g5.xlarge gets a GPU-ready image; the code asks what it got.

    python examples/gpu_type.py                       # on this computer (no GPU needed)
    VMEXEC_PROVIDER=ec2 python examples/gpu_type.py   # one g5.xlarge on AWS

The task reports the GPUs it can see (through ``nvidia-smi`` when present), so the same
script tells you whether the machine is what you asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from vmexec import VMExecutor


def describe_gpus() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU visible on this machine"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip()


def main() -> None:
    provider = os.environ.get("VMEXEC_PROVIDER", "local")
    with VMExecutor(max_workers=1, provider=provider, instance_type="g5.xlarge",
                    regions="us-east-1", max_hourly_cost=2.0) as ex:
        print("GPUs:", ex.submit(describe_gpus).result())


if __name__ == "__main__":
    main()
