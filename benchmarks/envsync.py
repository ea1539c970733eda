"""Environment sync for this project's own test environment, step by step.

* capture: ``capture()`` of this interpreter (median of 3);
* preflight: ``uv pip compile`` per architecture (x86_64, aarch64 alone, then both
  concurrently as ``preflight`` runs them), this process's cache off;
* build: the artifacts (locks, the vmexec wheel built from this checkout, code wheels),
  with an empty build cache and again with it warm;
* staging: bytes uploaded per region to moto's S3 (``mock_aws``, two regions) for fleets
  of 2, 20 and 200 planned machines, and for a second run with unchanged artifacts;
* install: the machine's install script run on this computer (a fresh
  ``$VMEXEC_ROOT``), first with an empty ``UV_CACHE_DIR`` (every wheel downloaded from
  the package index), then with that cache warm (a new venv from the cache).

The time for a fake VM of the local cloud to become ready is measured once the install
script is wired into the boot script (``benchmarks/provision.py``).

    python benchmarks/envsync.py [--subset] [--skip-install]

``--subset`` installs only vmexec's own requirements (quick); by default the install
step reproduces the whole captured environment, as ``environment="auto"`` would.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from vmexec.environment.capture import capture
from vmexec.environment.install import PreparedEnvironment, build_artifacts
from vmexec.environment.preflight import preflight
from vmexec.environment.spec import EnvSpec


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def subset(spec: EnvSpec) -> EnvSpec:
    """vmexec and its runtime requirements only."""
    keep = {"vmexec", "cloudpickle", "psutil", "paramiko", "tenacity", "cryptography",
            "cffi", "pycparser", "bcrypt", "pynacl", "invoke"}
    return dataclasses.replace(spec, distributions=tuple(
        d for d in spec.distributions if d.key in keep))


def stage_bytes(spec: EnvSpec, resolutions: dict[str, Any], artifacts: list[Any]
                ) -> dict[str, Any]:
    import boto3
    from moto import mock_aws

    from vmexec.environment.stage import delete_staging, stage_artifacts

    regions = ["us-east-1", "eu-west-1"]
    sent: dict[str, int] = {}

    def count(request: Any, **_: Any) -> None:
        size = request.headers.get("X-Amz-Decoded-Content-Length") or \
            request.headers.get("Content-Length") or 0
        region = next((r for r in regions if r in request.url), "?")
        sent[region] = sent.get(region, 0) + int(size)

    rows: dict[str, Any] = {}
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(key, None)
    with mock_aws():
        # With a session token, as SSO/STS credentials have: the longest URLs.
        session = boto3.Session(region_name="us-east-1", aws_access_key_id="testing",
                                aws_secret_access_key="testing",
                                aws_session_token="x" * 800)
        session.events.register("request-created.s3.PutObject", count)
        session.events.register("request-created.s3.UploadPart", count)
        for machines in (2, 20, 200):
            sent.clear()
            seconds, staged = timed(lambda: stage_artifacts(
                session, regions, f"vmx-bench{machines}", artifacts,
                archs=["x86_64", "aarch64"]))
            # Every machine of a region gets the same user-data: the same URLs.
            script = len(PreparedEnvironment(spec, resolutions, artifacts).script(
                staged["us-east-1"].artifacts).encode())
            rows[f"{machines} machines"] = (dict(sent), seconds, script)
            if machines == 200:
                sent.clear()
                seconds, _ = timed(lambda: stage_artifacts(
                    session, regions, "vmx-bench200", artifacts, archs=["x86_64"]))
                rows["second run"] = (dict(sent), seconds, 0)
            delete_staging(session, regions, f"vmx-bench{machines}")
    return rows


def install(prepared: PreparedEnvironment, cache: str) -> float:
    root = tempfile.mkdtemp(prefix="vmexec-bench-machine-")
    try:
        env = {**os.environ, "VMEXEC_ROOT": root, "UV_CACHE_DIR": cache,
               "PY": sys.executable}
        seconds, result = timed(lambda: subprocess.run(
            ["bash", "-c", prepared.script()], env=env, capture_output=True, text=True,
            timeout=1800))
        if result.returncode != 0:
            raise SystemExit(f"install failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", action="store_true",
                        help="install vmexec's own requirements only")
    parser.add_argument("--skip-install", action="store_true")
    args = parser.parse_args()
    arch = platform.machine()

    samples = [timed(capture) for _ in range(3)]
    spec = samples[-1][1]
    print(f"environment: Python {spec.python}, {len(spec.distributions)} distributions "
          f"({len(spec.local_packages())} local: "
          f"{', '.join(d.name for d in spec.local_packages())}), "
          f"{len(spec.local_code)} local code folders")
    print(f"capture              {statistics.median(s for s, _ in samples) * 1000:8.0f} ms "
          f"(median of 3)")

    for target in ("x86_64", "aarch64"):
        seconds, result = timed(lambda: preflight(spec, [target], use_cache=False))
        print(f"preflight {target:10s} {seconds * 1000:8.0f} ms  "
              f"({len(result[target].packages)} packages)")
    seconds, resolutions = timed(lambda: preflight(spec, ["x86_64", "aarch64"],
                                                   use_cache=False))
    print(f"preflight both       {seconds * 1000:8.0f} ms  (concurrent, as launched)")

    with tempfile.TemporaryDirectory(prefix="vmexec-bench-") as tmp:
        cold, artifacts = timed(lambda: build_artifacts(spec, resolutions,
                                                        os.path.join(tmp, "w1"),
                                                        os.path.join(tmp, "cache")))
        warm, _ = timed(lambda: build_artifacts(spec, resolutions, os.path.join(tmp, "w2"),
                                                os.path.join(tmp, "cache")))
        print(f"build artifacts      {cold * 1000:8.0f} ms cold, {warm * 1000:.0f} ms warm "
              f"({len(artifacts)} artifacts, {sum(a.size for a in artifacts) / 1e3:.0f} kB: "
              f"{', '.join(a.kind for a in artifacts)})")

        for label, (sent, seconds, script) in stage_bytes(spec, resolutions,
                                                          artifacts).items():
            per_region = ", ".join(f"{r} {b:,} B" for r, b in sorted(sent.items())) or \
                "nothing"
            print(f"stage {label:14s} {seconds * 1000:8.0f} ms  uploaded: {per_region}"
                  + (f"; install script {script:,} B" if script else ""))

        if args.skip_install:
            return
        target_spec = subset(spec) if args.subset else spec
        if args.subset:
            resolutions = preflight(target_spec, [arch])
            artifacts = build_artifacts(target_spec, resolutions, os.path.join(tmp, "w3"),
                                        os.path.join(tmp, "cache"))
        prepared = PreparedEnvironment(target_spec, {arch: resolutions[arch]},
                                       [a for a in artifacts if a.arch in (None, arch)])
        packages = len(resolutions[arch].packages) + len(target_spec.local_packages())
        cache = os.path.join(tmp, "uv-cache")
        cold = install(prepared, cache)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache)
                   for f in fs if os.path.isfile(os.path.join(d, f)))
        warm = install(prepared, cache)
        print(f"install {arch} venv   {cold:8.1f} s cold UV_CACHE_DIR ({size / 1e6:.0f} MB "
              f"fetched), {warm:.1f} s warm  ({packages} distributions)")


if __name__ == "__main__":
    main()
