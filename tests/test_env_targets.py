"""Preflight targets the glibc of the images the plan uses (issue 11, item 8b): a wheel
built for Amazon Linux 2023's glibc 2.34 installs there, so it must not be refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aws_fixtures import TEST_CIDR
from test_env_preflight import CP, make_wheel, spec_of
from vmexec.environment.preflight import DEFAULT_MANYLINUX, manylinux_for_images, preflight
from vmexec.errors import EnvSyncError
from vmexec.providers.ec2 import EC2Provider


@pytest.mark.parametrize("images, expected", [
    (["/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64 al2023-ami-2023"],
     "2_34"),
    (["/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-amazon-linux-2023/"
      "latest/ami-id Deep Learning Base"], "2_34"),
    (["al2023-ami-kernel-default-x86_64", "amzn2-ami-kernel-5.10-hvm"], "2_26"),
    (["ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server"], "2_35"),
    (["ami= my-own-golden-image"], DEFAULT_MANYLINUX),
    ([], DEFAULT_MANYLINUX),
])
def test_the_target_is_the_lowest_glibc_of_the_plans_images(images: list[str],
                                                            expected: str) -> None:
    assert manylinux_for_images(images) == expected


@pytest.fixture(scope="module")
def new_glibc_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("glibc-2-34")
    # Like bcrypt 5.0.0: wheels for glibc 2.34 only.
    make_wheel(folder, "newglibc", "5.0", f"{CP}-{CP}-manylinux_2_34_x86_64")
    make_wheel(folder, "newglibc", "5.0", f"{CP}-{CP}-manylinux_2_34_aarch64")
    return folder


def test_a_wheel_for_the_images_glibc_is_accepted(new_glibc_wheels: Path) -> None:
    spec = spec_of("newglibc==5.0")
    with pytest.raises(EnvSyncError, match=r"newglibc==5.0 has no build for x86_64 "
                                           r"\(x86_64-manylinux_2_28"):
        preflight(spec, ["x86_64"], find_links=[str(new_glibc_wheels)], manylinux="2_28")
    resolved = preflight(spec, ["x86_64", "aarch64"], find_links=[str(new_glibc_wheels)],
                         manylinux="2_34")
    assert {arch: r.platform for arch, r in resolved.items()} == {
        "x86_64": "x86_64-manylinux_2_34", "aarch64": "aarch64-manylinux_2_34"}
    assert all(r.packages["newglibc"] == "5.0" for r in resolved.values())


def test_an_ec2_plan_on_amazon_linux_2023_targets_glibc_2_34(
        session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Discovery (before anything is created) prepares the environment for the plan.
    import vmexec.providers.ec2.discovery as discovery

    seen: dict[str, Any] = {}

    def prepare(environment: Any, archs: Any, **options: Any) -> None:
        seen.update(options, archs=archs)
        return None

    monkeypatch.setattr(discovery, "prepare_environment", prepare)
    provider = EC2Provider(2, instance_type=["c7g.large", "c7i.large"], regions="us-east-1",
                           ssh_cidr=TEST_CIDR, session=session, handle_signals=False,
                           environment=["numpy"])
    try:
        # moto serves the public SSM parameters of Amazon Linux 2023 for both archs.
        assert {i.source for i in provider.images["us-east-1"].values()} == {
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"}
        assert seen["manylinux"] == "2_34" and seen["archs"] == ["arm64", "x86_64"]
    finally:
        provider.terminate(None)
