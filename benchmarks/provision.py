"""Provisioning cost of an EC2 fleet: vmexec's batched launch against a one-call-per-machine loop.

Against moto (a ``moto.server`` process on 127.0.0.1; no AWS account, no network):

* **vmexec**: ``EC2Provider`` plans 2000 slots over 4 regions x 2 architectures
  (c7g.large arm64 + c7i.large x86_64, 2 vCPUs each -> 1000 machines), launches them all,
  then tears the fleet down and verifies by tag that nothing is left.
* **loop**: the same 1000 machines with a bare ``run_instances`` call per machine (AMIs
  looked up the same way), then one ``terminate_instances`` per region.

For each: EC2 API calls by operation (counted with botocore events), client wall time,
and the client's peak RSS. Each scenario runs in its own process so that its peak RSS is
its own, and the moto server runs in a third, so that moto's memory is not counted.
The figures that matter are the ratios; moto answers faster than AWS, which makes the
per-call overhead of the loop *smaller* here than in real life.

    python benchmarks/provision.py [--slots 2000] [--regions us-east-1,us-west-2,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1"]
TYPES = ["c7g.large", "c7i.large"]
SSM = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def scenario_vmexec(url: str, slots: int, regions: list[str]) -> dict[str, Any]:
    import boto3

    from vmexec.providers.ec2 import EC2Provider
    from vmexec.testing.faults import ApiCallCounter

    session = boto3.Session(region_name=regions[0])
    calls = ApiCallCounter(session)
    ssm_calls = ApiCallCounter(session, service="ssm")
    retries = _RetryCounter()
    logging.getLogger("vmexec.retry").addHandler(retries)
    logging.getLogger("vmexec.retry").setLevel(logging.INFO)
    phases = {}
    baseline = _rss_mb()
    start = time.perf_counter()
    provider = EC2Provider(slots, instance_type=TYPES, regions=regions,
                           ssh_cidr="203.0.113.7/32", endpoint_url=url, session=session,
                           handle_signals=False, environment=None)
    phases["plan"] = time.perf_counter() - start
    mark = time.perf_counter()
    records = provider.launch(slots)
    phases["launch"] = time.perf_counter() - mark
    peak_after_launch = _peak_rss_mb()
    mark = time.perf_counter()
    provider.terminate(None)
    phases["teardown"] = time.perf_counter() - mark
    summary = provider.teardown_summary
    assert summary is not None and summary.clean, summary and summary.text()
    return {
        "machines": len(records),
        "slots": sum(r.slots for r in records),
        "archs": sorted({r.arch or "" for r in records}),
        "calls": dict(calls.by_operation) | {f"ssm:{k}": v
                                             for k, v in ssm_calls.by_operation.items()},
        "seconds": time.perf_counter() - start,
        "phases": phases,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_after_launch_mb": peak_after_launch,
        "rss_after_imports_mb": baseline,
        "retries": retries.count,
    }


def scenario_loop(url: str, slots: int, regions: list[str]) -> dict[str, Any]:
    import boto3

    from vmexec.testing.faults import ApiCallCounter

    session = boto3.Session(region_name=regions[0])
    calls = ApiCallCounter(session)
    ssm_calls = ApiCallCounter(session, service="ssm")
    machines = slots // 2  # 2 vCPUs per machine, as in the plan
    per_group = machines // (len(regions) * len(TYPES))
    baseline = _rss_mb()
    start = time.perf_counter()
    launched: dict[str, list[str]] = {}
    for region in regions:
        ec2 = session.client("ec2", region_name=region, endpoint_url=url)
        ssm = session.client("ssm", region_name=region, endpoint_url=url)
        images = {p["Name"]: p["Value"] for p in ssm.get_parameters(
            Names=[SSM.format(arch=a) for a in ("arm64", "x86_64")])["Parameters"]}
        for instance_type in TYPES:
            arch = "arm64" if instance_type.startswith("c7g") else "x86_64"
            for _ in range(per_group):
                answer = ec2.run_instances(
                    ImageId=images[SSM.format(arch=arch)], InstanceType=instance_type,
                    MinCount=1, MaxCount=1,
                    TagSpecifications=[{"ResourceType": "instance", "Tags": [
                        {"Key": "bench", "Value": "loop"}]}])
                launched.setdefault(region, []).append(answer["Instances"][0]["InstanceId"])
    launch_seconds = time.perf_counter() - start
    mark = time.perf_counter()
    for region, ids in launched.items():
        ec2 = session.client("ec2", region_name=region, endpoint_url=url)
        for i in range(0, len(ids), 1000):
            ec2.terminate_instances(InstanceIds=ids[i:i + 1000])
    return {
        "machines": sum(len(ids) for ids in launched.values()),
        "slots": 2 * sum(len(ids) for ids in launched.values()),
        "calls": dict(calls.by_operation) | {f"ssm:{k}": v
                                             for k, v in ssm_calls.by_operation.items()},
        "seconds": time.perf_counter() - start,
        "phases": {"launch": launch_seconds, "teardown": time.perf_counter() - mark},
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": baseline,
    }


class _RetryCounter(logging.Handler):
    """Counts vmexec.retry's "retry in Ns" lines: throttling or waits a run paid for."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / (1024 * 1024)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _reset(url: str) -> None:
    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=60).read()


def _warm(url: str, regions: list[str]) -> None:
    """Make moto load each region's data once, outside both measurements."""
    import boto3

    session = boto3.Session(region_name=regions[0])
    for region in regions:
        ec2 = session.client("ec2", region_name=region, endpoint_url=url)
        ec2.describe_instance_types(InstanceTypes=TYPES)
        ec2.describe_images(Owners=["amazon"], MaxResults=5)


def _run_child(name: str, url: str, slots: int, regions: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--url", url,
                          "--slots", str(slots), "--regions", ",".join(regions)],
                         check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _report(name: str, result: dict[str, Any]) -> None:
    calls = result["calls"]
    print(f"\n== {name}: {result['machines']} machines, {result['slots']} slots"
          + (f", archs {', '.join(result['archs'])}" if result.get("archs") else ""))
    print(f"   wall {result['seconds']:.2f}s ("
          + ", ".join(f"{k} {v:.2f}s" for k, v in result["phases"].items())
          + f"), peak RSS {result['peak_rss_mb']:.0f} MB "
          f"({result['rss_after_imports_mb']:.0f} MB after imports"
          + (f", {result['peak_rss_after_launch_mb']:.0f} MB at the end of the launch"
             if "peak_rss_after_launch_mb" in result else "") + ")"
          + (f", {result['retries']} retries" if "retries" in result else ""))
    print(f"   API calls: {sum(calls.values())}")
    for operation, count in sorted(calls.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"     {operation:34s} {count:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=2000)
    parser.add_argument("--regions", default=",".join(REGIONS))
    parser.add_argument("--child", choices=["vmexec", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    regions = args.regions.split(",")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", regions[0])
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    if args.child:
        fn = scenario_vmexec if args.child == "vmexec" else scenario_loop
        print(json.dumps(fn(args.url, args.slots, regions)))
        return
    server, url = _start_moto()
    try:
        _warm(url, regions)
        vmexec_result = _run_child("vmexec", url, args.slots, regions)
        _reset(url)
        _warm(url, regions)
        loop_result = _run_child("loop", url, args.slots, regions)
    finally:
        server.kill()
        server.wait()
    print(f"provision {args.slots} slots over {len(regions)} regions x {len(TYPES)} types "
          f"({', '.join(TYPES)}) against moto {url}")
    _report("vmexec (plan + CreateFleet batches + teardown with verification)", vmexec_result)
    _report("bare run_instances loop (one call per machine)", loop_result)
    vm_calls = sum(vmexec_result["calls"].values())
    loop_calls = sum(loop_result["calls"].values())
    launch_calls = vmexec_result["calls"].get("CreateFleet", 0)
    print("\n== ratios (loop / vmexec)")
    print(f"   launch calls      {loop_result['calls'].get('RunInstances', 0)} / {launch_calls}"
          f" = {loop_result['calls'].get('RunInstances', 0) / max(1, launch_calls):.0f}x")
    print(f"   all API calls     {loop_calls} / {vm_calls} = {loop_calls / max(1, vm_calls):.1f}x")
    print(f"   launch wall time  {loop_result['phases']['launch']:.2f}s / "
          f"{vmexec_result['phases']['launch']:.2f}s = "
          f"{loop_result['phases']['launch'] / vmexec_result['phases']['launch']:.1f}x")
    print(f"   total wall time   {loop_result['seconds']:.2f}s / {vmexec_result['seconds']:.2f}s"
          f" = {loop_result['seconds'] / vmexec_result['seconds']:.1f}x")
    print(f"   peak RSS          {loop_result['peak_rss_mb']:.0f} MB / "
          f"{vmexec_result['peak_rss_mb']:.0f} MB = "
          f"{loop_result['peak_rss_mb'] / vmexec_result['peak_rss_mb']:.2f}x")
    grew = {name: r["peak_rss_mb"] - r["rss_after_imports_mb"]
            for name, r in (("loop", loop_result), ("vmexec", vmexec_result))}
    print(f"   RSS growth        {grew['loop']:.0f} MB / {grew['vmexec']:.0f} MB "
          "(peak minus after-imports: what the run itself holds)")


if __name__ == "__main__":
    main()
