"""The ec2 provider's options: one frozen dataclass, validated once, with no AWS call.

``EC2Options.parse(...)`` checks every argument of ``EC2Provider(...)`` and normalises it
(one instance type becomes a list, the session defaults to one from the environment, the
regions to the session's); each ``ConfigError`` names the option and an example. The
provider then only talks to AWS (``discovery.discover``). The fields are the
constructor's keywords, in the order the "unknown option" message lists them.

Imports boto3 (the default session) and nothing of this package but ``plan``, ``images``
and ``resources`` (their validators). Must not import the scheduler or the executor.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import re
from typing import Any, Callable, Mapping, Optional

import boto3

from vmexec.errors import ConfigError
from vmexec.providers.base import MachineRecord
from vmexec.providers.ec2 import resources
from vmexec.providers.ec2.images import validate_ami_option
from vmexec.providers.ec2.network import validate_lookup
from vmexec.providers.ec2.plan import as_name_list

__all__ = ["EC2Options", "DEFAULT_REGION", "NAMED_KEEPALIVE"]

log = logging.getLogger(__name__)

#: Where a session without a region works.
DEFAULT_REGION = "us-east-1"
#: How long a named fleet's machines stay on without a client, unless keepalive= says.
NAMED_KEEPALIVE = 600.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _positive(name: str, value: Any, *, integer: bool, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value <= 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise ConfigError(f"{name} must be {kind}" + (" or None" if allow_none else "")
                          + f", not {value!r}")
    return value


def _strings(name: str, value: Any, example: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise ConfigError(f"{name} must be a list of strings, not one string: "
                          f"{name}=[{value!r}]")
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a list of strings such as {example}, "
                          f"not {value!r}") from None
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{name} must contain non-empty strings such as {example}, "
                              f"not {item!r}")
    return items


def _default_address(record: MachineRecord) -> tuple[str, int]:
    from vmexec.errors import TransportError

    if not record.address:
        raise TransportError(f"{record.label} has no IP address")
    return record.address, 22


@dataclasses.dataclass(frozen=True)
class EC2Options:
    """Every option of ``EC2Provider``, validated (see its docstring for each).

    ``instance_type`` and ``regions`` are lists of names; ``keepalive`` is seconds
    (``NAMED_KEEPALIVE`` unless given); ``address_for`` is a callable (default: the
    record's address, port 22); ``session`` is a ``boto3.Session`` with credentials;
    ``address_lookup`` is what ``network.validate_lookup`` made of it. ``home`` is the
    session's region (where account-wide calls go).
    """

    instance_type: tuple[str, ...]
    regions: tuple[str, ...]
    arm: Optional[bool]
    spot: bool
    ami: Any
    ssh_cidr: Optional[str]
    address_lookup: Any
    iam_instance_profile: Optional[str]
    root_volume_gb: Optional[int]
    tags: Mapping[str, str]
    name: Optional[str]
    packages: tuple[str, ...]
    index_url: Optional[str]
    find_links: tuple[str, ...]
    wheel_urls: tuple[str, ...]
    session: Any
    endpoint_url: Optional[str]
    slots_per_machine: Optional[int]
    boot_timeout: float
    max_lifetime: Optional[float]
    keepalive: float
    ssh_user: str
    address_for: Callable[[MachineRecord], tuple[str, int]]
    boot_env: Mapping[str, str]
    handle_signals: bool
    environment: Any
    exclude: Any
    env: Optional[Mapping[str, str]]
    forward_env: Any
    max_workers: int = 0
    home: str = DEFAULT_REGION

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options ``EC2Provider`` accepts besides ``max_workers``, as listed to users."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in ("max_workers", "home"))

    @classmethod
    def parse(cls, max_workers: Optional[int], *, unknown: Mapping[str, Any],
              instance_type: Any, regions: Any, arm: Any, spot: Any, ami: Any,
              ssh_cidr: Any, address_lookup: Any, iam_instance_profile: Any,
              root_volume_gb: Any, tags: Any, name: Any, packages: Any, index_url: Any,
              find_links: Any, wheel_urls: Any, environment: Any, exclude: Any, env: Any,
              forward_env: Any, session: Any, endpoint_url: Any, slots_per_machine: Any,
              boot_timeout: Any, max_lifetime: Any, keepalive: Any, ssh_user: Any,
              address_for: Any, boot_env: Any, handle_signals: Any) -> EC2Options:
        """Validate the constructor's arguments, in the order the checks always ran.

        Raises:
            ConfigError: the first wrong option (naming it), or no AWS credentials.
        """
        if unknown:
            raise ConfigError(
                f"provider 'ec2' does not take option(s) {', '.join(sorted(unknown))}; it "
                f"accepts {', '.join(cls.names())} (and the executor's timing options)")
        if max_workers is None:
            raise ConfigError("provider='ec2' needs max_workers= (task slots across the "
                              "fleet): the fleet is sized from it")
        _positive("max_workers", max_workers, integer=True, allow_none=False)
        if instance_type is None:
            raise ConfigError("provider='ec2' needs instance_type=, e.g. 'c7g.large' or "
                              "['c7g.large', 'c7i.large']")
        instance_types = as_name_list(instance_type, "instance_type",
                                      "'c7g.large' or ['c7g.large', 'c7i.large']")
        if arm not in (None, True, False):
            raise ConfigError(f"arm must be True (arm64 only), False (x86_64 only) or None "
                              f"(types as listed), not {arm!r}")
        if not isinstance(spot, bool):
            raise ConfigError(f"spot must be True or False, not {spot!r}")
        ami = validate_ami_option(ami)
        root_volume_gb = _positive("root_volume_gb", root_volume_gb, integer=True)
        slots_per_machine = _positive("slots_per_machine", slots_per_machine, integer=True)
        boot_timeout = float(_positive("boot_timeout", boot_timeout, integer=False,
                                       allow_none=False))
        max_lifetime = _positive("max_lifetime", max_lifetime, integer=False)
        keepalive = float(_positive("keepalive", keepalive, integer=False)
                          or NAMED_KEEPALIVE)
        if iam_instance_profile is not None and (not isinstance(iam_instance_profile, str)
                                                 or not iam_instance_profile.strip()):
            raise ConfigError(f"iam_instance_profile must be an instance profile name or "
                              f"ARN, not {iam_instance_profile!r}")
        user_tags = resources.validate_user_tags(tags)
        if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
            raise ConfigError(f"name must be 1-63 letters, digits, '.', '_' or '-', "
                              f"not {name!r}")
        packages = _strings("packages", packages, "['numpy==2.0', 'pandas']")
        links = (find_links,) if isinstance(find_links, str) else \
            _strings("find_links", find_links, "['https://mirror/wheels/']")
        wheels = _strings("wheel_urls", wheel_urls, "['https://.../vmexec.whl']")
        if index_url is not None and (not isinstance(index_url, str) or not index_url):
            raise ConfigError(f"index_url must be a URL string, not {index_url!r}")
        if environment is not None and (packages or wheels):
            raise ConfigError(
                "packages=/wheel_urls= go with environment=None (the image's Python); with "
                f"environment={environment!r} install them here (they are captured) or "
                "list them: environment=['numpy==2.1', ...]")
        if address_for is not None and not callable(address_for):
            raise ConfigError("address_for must be a callable record -> (host, port)")
        boot = dict(boot_env or {})
        for key, value in boot.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(f"boot_env must map str to str, got {key!r}: {value!r}")
        cidr: Optional[str] = None
        if ssh_cidr is not None:
            try:
                network = ipaddress.ip_network(ssh_cidr, strict=False)
            except (TypeError, ValueError):
                raise ConfigError(f"ssh_cidr must be a network like '203.0.113.7/32', "
                                  f"not {ssh_cidr!r}") from None
            if network.prefixlen == 0:
                log.warning("ssh_cidr=%s opens port 22 of every machine to the whole "
                            "internet; the host keys are pinned and only the fleet's key "
                            "may log in, but a narrower ssh_cidr is safer", network)
            cidr = str(network)
        lookup = validate_lookup(address_lookup)
        if endpoint_url is not None and not isinstance(endpoint_url, str):
            raise ConfigError(f"endpoint_url must be a URL string, not {endpoint_url!r}")
        if session is None:
            session = boto3.Session()
        elif not hasattr(session, "client"):
            raise ConfigError(f"session must be a boto3.Session, not {session!r}")
        if session.get_credentials() is None:
            raise ConfigError(
                "no AWS credentials found: configure them (`aws configure`, AWS_PROFILE, "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or pass session=boto3."
                "Session(profile_name=...). Or try provider='local' first")
        home = session.region_name or DEFAULT_REGION
        region_names = as_name_list(regions if regions is not None else home, "regions",
                                    "'us-east-1' or ['us-east-1', 'us-west-2']")
        return cls(
            instance_type=tuple(instance_types), regions=tuple(region_names), arm=arm,
            spot=spot, ami=ami, ssh_cidr=cidr, address_lookup=lookup,
            iam_instance_profile=iam_instance_profile, root_volume_gb=root_volume_gb,
            tags=user_tags, name=name, packages=packages, index_url=index_url,
            find_links=links, wheel_urls=wheels, session=session,
            endpoint_url=endpoint_url, slots_per_machine=slots_per_machine,
            boot_timeout=boot_timeout, max_lifetime=max_lifetime, keepalive=keepalive,
            ssh_user=ssh_user, address_for=address_for or _default_address, boot_env=boot,
            handle_signals=bool(handle_signals), environment=environment, exclude=exclude,
            env=env, forward_env=forward_env, max_workers=max_workers, home=home)
