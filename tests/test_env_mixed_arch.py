"""Environment sync through the local cloud for a mixed fleet (issue 11, item 8): the
cloud's index serves the other architecture's wheels of the client's versions, preflight
resolves both architectures against it for Amazon Linux 2023's glibc, and the fleet
runs numpy code with no exclude=."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import pytest


def _numpy_sum(n: int) -> tuple[str, float, str]:
    import numpy

    return numpy.__version__, float(numpy.arange(n).sum()), os.environ.get("VMEXEC_ROOT", "")


def test_numpy_environment_syncs_to_a_mixed_fleet() -> None:
    from vmexec import VMExecutor
    from vmexec.testing.localcloud import LocalCloud
    from vmexec.testing.sshd import sshd_available

    missing = sshd_available()
    if missing is not None:
        pytest.fail(f"the local cloud needs OpenSSH's sshd: {missing}")
    version = importlib.metadata.version("numpy")
    with LocalCloud(regions=["us-east-1"], vm_tools=("uv",), extra_distributions=["numpy"],
                    wheel_architectures=("x86_64", "aarch64")) as cloud:
        served = {w.name for w in cloud.wheels}
        assert any(n.startswith(f"numpy-{version}-") and "aarch64" in n for n in served)
        options: dict[str, Any] = cloud.executor_options(environment=[f"numpy=={version}"])
        with VMExecutor(4, provider="ec2", instance_type=["c7g.large", "c7i.large"],
                        regions="us-east-1", boot_timeout=300, heartbeat_interval=0.5,
                        **options) as ex:
            prepared = ex.provider.environment
            assert prepared is not None
            # Both architectures resolved, for the image's glibc, from the cloud's index.
            assert {a: r.platform for a, r in prepared.resolutions.items()} == {
                "aarch64": "aarch64-manylinux_2_34", "x86_64": "x86_64-manylinux_2_34"}
            assert all(r.packages["numpy"] == version for r in prepared.resolutions.values())
            cloud.wait_for(lambda: len({m.arch for m in ex.fleet}) == 2 or
                           not list(ex.map(_numpy_sum, range(4))), 400,
                           "a machine of each architecture")
            results = list(ex.map(_numpy_sum, [10] * 8))
            archs = {m.arch for m in ex.fleet}
        assert archs == {"arm64", "x86_64"}
        assert {(v, s) for v, s, _ in results} == {(version, 45.0)}
        assert all(root.startswith(str(cloud.workdir)) for _, _, root in results)
        assert cloud.tagged_resources() == []
        assert cloud.offmachine_requests == []
