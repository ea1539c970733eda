"""Machine images (AMIs): one per (region, architecture, GPU or not).

By default the latest Amazon Linux 2023 image of each architecture, read from the public
SSM parameters AWS maintains in every region::

    /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64
    /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64

and, for GPU instance types, the Deep Learning Base AMI with the NVIDIA driver::

    /aws/service/deeplearning/ami/<arch>/base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id

``ami=`` overrides: one id for every region and architecture, or a mapping
``{(region, arch): ami_id}`` (pairs it does not name keep the default). Every image is
then checked with one ``DescribeImages`` call per region: it must exist and match the
architecture of the types that use it; its root device name and size are what the launch
template's encrypted root volume needs.

All names for one region are fetched with one ``GetParameters`` call.

Works on the boto3 clients it is given (it creates none); lives under ``providers/ec2``.
Must not import the scheduler, the executor, or the provider module.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional, Union

from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.errors import ConfigError
from vmexec.providers.ec2.errors import call, translate

__all__ = ["ImageInfo", "AmiOption", "ssm_parameter", "validate_ami_option", "resolve_images",
           "check_root_volume"]

log = logging.getLogger(__name__)

#: ``ami=``: one image id for everything, or ``{(region, arch): image_id}``.
AmiOption = Union[None, str, Mapping[tuple[str, str], str]]

_AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
_GPU = ("/aws/service/deeplearning/ami/{arch}/"
        "base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id")


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """An image chosen for (region, arch, gpu)."""

    image_id: str
    arch: str
    root_device: str
    root_size_gb: int
    name: str = ""
    source: str = ""  # the SSM parameter, or "ami=" for an override


def ssm_parameter(arch: str, gpu: bool) -> str:
    """The public SSM parameter naming the default image for ``arch`` (and GPUs)."""
    return (_GPU if gpu else _AL2023).format(arch=arch)


def validate_ami_option(ami: Any) -> AmiOption:
    """Check the shape of ``ami=`` before any call.

    Raises:
        ConfigError: not None, an ``ami-...`` string, or a ``{(region, arch): id}`` mapping.
    """
    if ami is None:
        return None
    if isinstance(ami, str):
        if not ami.startswith("ami-"):
            raise ConfigError(f"ami must be an image id like 'ami-0123456789abcdef0', or "
                              f"{{(region, arch): id}}, not {ami!r}")
        return ami
    if isinstance(ami, Mapping):
        for key, value in ami.items():
            if (not isinstance(key, tuple) or len(key) != 2
                    or key[1] not in ("arm64", "x86_64")):
                raise ConfigError(
                    f"ami mapping keys must be (region, arch) with arch 'arm64' or "
                    f"'x86_64', e.g. {{('us-east-1', 'arm64'): 'ami-...'}}; got {key!r}")
            if not isinstance(value, str) or not value.startswith("ami-"):
                raise ConfigError(f"ami[{key!r}] must be an image id like 'ami-0123...', "
                                  f"not {value!r}")
        return dict(ami)
    raise ConfigError(f"ami must be None, an image id, or {{(region, arch): id}}, not {ami!r}")


def resolve_images(
    ssm: Any,
    ec2: Any,
    region: str,
    wanted: set[tuple[str, bool]],
    ami: AmiOption = None,
) -> dict[tuple[str, bool], ImageInfo]:
    """Choose and check the image for each ``(arch, gpu)`` needed in ``region``.

    Args:
        ssm: an SSM client for ``region``.
        ec2: an EC2 client for ``region``.
        region: the region.
        wanted: the ``(arch, gpu)`` combinations the region's plan lines need.
        ami: the ``ami=`` override.

    Returns:
        ``(arch, gpu) -> ImageInfo``.

    Raises:
        ConfigError: a default image is not published in the region (pass ``ami=``), an
            override does not exist there, or its architecture does not match.
    """
    chosen: dict[tuple[str, bool], tuple[str, str]] = {}  # -> (image id, source)
    lookups: dict[str, list[tuple[str, bool]]] = {}
    for arch, gpu in sorted(wanted):
        override = ami if isinstance(ami, str) else (ami or {}).get((region, arch))
        if override:
            chosen[(arch, gpu)] = (override, "ami=")
        else:
            lookups.setdefault(ssm_parameter(arch, gpu), []).append((arch, gpu))
    if lookups:
        answer = call("ssm:GetParameters", region, ssm.get_parameters, Names=sorted(lookups))
        values = {p["Name"]: p["Value"] for p in answer.get("Parameters", [])}
        for name, keys in lookups.items():
            if name not in values:
                arch, gpu = keys[0]
                what = "GPU image" if gpu else "Amazon Linux 2023 image"
                raise ConfigError(
                    f"no {what} for {arch} in {region}: the public SSM parameter {name} "
                    f"is not there. Pass ami={{({region!r}, {arch!r}): 'ami-...'}} with an "
                    "image of your choice")
            for key in keys:
                chosen[key] = (values[name], name)
    ids = sorted({image_id for image_id, _ in chosen.values()})
    try:
        described = ec2.describe_images(ImageIds=ids)
    except ClientError as exc:
        if "InvalidAMIID" in (retry.error_code(exc) or ""):
            raise ConfigError(f"ami: {', '.join(ids)} not found in {region}: {exc}. Image ids "
                              "are per region; pass {(region, arch): id} for each") from exc
        raise translate(exc, operation="DescribeImages", region=region) from exc
    images = {image["ImageId"]: image for image in described.get("Images", [])}
    result = {}
    for (arch, gpu), (image_id, source) in chosen.items():
        image = images.get(image_id)
        if image is None:
            raise ConfigError(f"ami: image {image_id} ({source}) does not exist in {region} or "
                              "is not shared with this account")
        if image.get("Architecture") != arch:
            raise ConfigError(
                f"ami: image {image_id} in {region} is {image.get('Architecture')}, but the "
                f"{arch} instance types need an {arch} image: pass "
                f"ami={{({region!r}, {arch!r}): 'ami-...'}}")
        root = image.get("RootDeviceName", "/dev/xvda")
        size = 0
        for mapping in image.get("BlockDeviceMappings", []):
            if mapping.get("DeviceName") == root:
                size = int(mapping.get("Ebs", {}).get("VolumeSize", 0))
        result[(arch, gpu)] = ImageInfo(image_id=image_id, arch=arch, root_device=root,
                                        root_size_gb=size, name=image.get("Name", ""),
                                        source=source)
        log.debug("%s %s%s: %s (%s)", region, arch, " GPU" if gpu else "", image_id, source)
    return result


def check_root_volume(images: Mapping[Any, ImageInfo], root_volume_gb: Optional[int],
                      region: str) -> None:
    """Refuse a ``root_volume_gb`` smaller than an image's own root snapshot.

    Raises:
        ConfigError: naming the image and its size.
    """
    if root_volume_gb is None:
        return
    for image in images.values():
        if image.root_size_gb and root_volume_gb < image.root_size_gb:
            raise ConfigError(
                f"root_volume_gb={root_volume_gb} is smaller than the {image.root_size_gb} GB "
                f"root snapshot of {image.image_id} in {region}: use at least "
                f"{image.root_size_gb}, or None for the image's size")
