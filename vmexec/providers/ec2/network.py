"""Where the client is, as EC2 sees it: what each region's security group admits on
port 22, and which of a machine's addresses the client dials.

Owns ``ClientNetwork``, asked by the EC2 provider when it first launches in a region
(never while planning or pricing: ``dry_run`` and ``max_hourly_cost`` need no network)::

    ssh_cidr= given        -> that CIDR, public addresses (no lookup at all)
    IMDS answers, and the
    region and VPC match   -> the client's security groups (else its VPC's CIDR),
                              machines dialled at their private addresses
    otherwise              -> this computer's public address as AWS sees it: a GET of
                              AWS's "what is my IP" endpoint (checkip.amazonaws.com),
                              a /32 (or /128), cached for the run; with
                              ``address_lookup=False``, the route's source address,
                              which must be public

and ``moved()``, which looks again when connections fail: a laptop that changed networks
gets its new /32 authorized and the old one revoked (``follow``).

Endpoints: ``address_lookup=`` or ``$VMEXEC_CHECKIP_URL`` (read by ``vmexec.config``)
for the address, and the AWS SDKs' own ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` and
``AWS_EC2_METADATA_DISABLED`` for the instance metadata service, so that the local cloud
(``vmexec.testing``) can answer both on loopback.

Must not import: the scheduler, the executor, transports. boto3 clients come from the
caller.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Union

from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.config import checkip_url_from_environment
from vmexec.errors import ConfigError
from vmexec.providers.ec2 import errors as ec2_errors

__all__ = ["CHECKIP_URL", "ClientNetwork", "ClientPlacement", "RegionAccess",
           "detect_ssh_cidr", "lookup_public_address", "read_imds", "validate_lookup"]

log = logging.getLogger(__name__)

#: AWS's own "what is my IP" endpoint: the address AWS sees this computer connect from.
CHECKIP_URL = "https://checkip.amazonaws.com/"
_IMDS_ENDPOINT = "http://169.254.169.254"
# Short: the lookup runs once per run, before the first launch; a network that does not
# answer in this time will not carry a fleet's SSH connections either.
CHECKIP_TIMEOUT = 3.0
# Shorter: outside AWS nothing answers at 169.254.169.254 and every client pays this once.
IMDS_TIMEOUT = 1.0
# After connections fail, the address is looked up again at most this often.
_RECHECK_INTERVAL = 5.0
_MAX_ANSWER = 100  # an address is shorter; anything longer is not checkip's answer


def validate_lookup(value: Any) -> Union[bool, str]:
    """Check the ``address_lookup=`` option: True, False or an http(s) URL.

    Raises:
        ConfigError: anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value
    raise ConfigError(f"address_lookup must be True (ask {CHECKIP_URL} for this computer's "
                      f"public address), False (no lookup: pass ssh_cidr=) or the URL of an "
                      f"endpoint answering the same way, not {value!r}")


def lookup_public_address(url: str = CHECKIP_URL, timeout: float = CHECKIP_TIMEOUT
                          ) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The address ``url`` says this computer connects from (one GET).

    Raises:
        OSError: no answer in ``timeout`` seconds, an HTTP error, or an answer that is
            not an IP address (the message says which).
    """
    request = urllib.request.Request(url, headers={"User-Agent": "vmexec"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(_MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        raise OSError(f"GET {url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OSError(f"GET {url} failed: {reason}") from None
    text = body.decode("ascii", "replace").strip()
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise OSError(f"GET {url} answered {text[:40]!r}, not an IP address") from None


@dataclasses.dataclass(frozen=True)
class ClientPlacement:
    """The client's own instance, from the instance metadata service (IMDSv2)."""

    instance_id: str
    region: str
    vpc_id: str
    private_ip: str
    vpc_cidrs: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()


def read_imds(endpoint: Optional[str] = None, timeout: float = IMDS_TIMEOUT
              ) -> Optional[ClientPlacement]:
    """Where this client runs, if it is an EC2 instance; None elsewhere.

    Args:
        endpoint: the metadata service (default: ``$AWS_EC2_METADATA_SERVICE_ENDPOINT``,
            else 169.254.169.254); nothing is asked when ``$AWS_EC2_METADATA_DISABLED``
            is true and no endpoint is given.
        timeout: seconds per request.
    """
    if endpoint is None:
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
            return None
        endpoint = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or _IMDS_ENDPOINT
    base = endpoint.rstrip("/") + "/latest"
    try:
        token_request = urllib.request.Request(
            base + "/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(token_request, timeout=timeout) as response:
            token = response.read(200).decode("ascii").strip()

        def get(path: str) -> str:
            request = urllib.request.Request(f"{base}/meta-data/{path}",
                                             headers={"X-aws-ec2-metadata-token": token})
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return str(answer.read(4096).decode("utf-8").strip())

        mac = get("mac")
        interface = f"network/interfaces/macs/{mac}"
        placement = ClientPlacement(
            instance_id=get("instance-id"), region=get("placement/region"),
            vpc_id=get(f"{interface}/vpc-id"), private_ip=get("local-ipv4"),
            vpc_cidrs=tuple(get(f"{interface}/vpc-ipv4-cidr-blocks").split()),
            security_groups=tuple(get(f"{interface}/security-group-ids").split()))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.debug("no instance metadata at %s (%s): not inside EC2", endpoint, exc)
        return None
    log.info("this client is EC2 instance %s in %s (%s)", placement.instance_id,
             placement.region, placement.vpc_id)
    return placement


def detect_ssh_cidr() -> str:
    """This client's address as a /32 (or /128), found without sending anything.

    A UDP socket ``connect`` to a public address only asks the kernel for the route,
    whose source address is ours; no packet leaves the machine.

    Raises:
        ConfigError: no route, or the address is private (behind NAT, AWS sees another
            address): the message says to pass ``ssh_cidr=``.
    """
    for family, target in ((socket.AF_INET, "198.51.100.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((target, 9))
                address = ipaddress.ip_address(sock.getsockname()[0])
        except OSError:
            continue
        if not address.is_global:
            raise ConfigError(
                f"ssh_cidr: this computer's address {address} is private (behind NAT, AWS "
                "sees another address) and address_lookup=False forbids asking AWS for it. "
                "Pass ssh_cidr='<your public IP>/32' (e.g. from "
                "`curl https://checkip.amazonaws.com`), or the CIDR of your network")
        return f"{address}/{address.max_prefixlen}"
    raise ConfigError("ssh_cidr: this computer has no route to the internet to find its "
                      "address; pass ssh_cidr='<address>/32' explicitly")


@dataclasses.dataclass(frozen=True)
class RegionAccess:
    """How one region's machines are reached.

    Attributes:
        cidr: the network tcp/22 admits.
        source_groups: security groups tcp/22 also admits (a client in the same VPC).
        private: dial the machines' private addresses (same VPC).
        automatic: ``cidr`` is the looked-up public address (it follows address changes).
    """

    cidr: str
    source_groups: tuple[str, ...] = ()
    private: bool = False
    automatic: bool = False


class ClientNetwork:
    """The client's place on the network, found once per run, when first needed.

    Args:
        ssh_cidr: the user's ``ssh_cidr=`` (validated), or None to find out.
        lookup: ``address_lookup=``: True (``$VMEXEC_CHECKIP_URL``, else AWS's
            endpoint), a URL, or False (no request: the route's source address).
        imds_endpoint: the metadata service (default: the AWS SDK variables).

    Thread-safe: connect threads may ask at once; each lookup runs once.
    """

    def __init__(self, ssh_cidr: Optional[str], lookup: Union[bool, str] = True,
                 imds_endpoint: Optional[str] = None) -> None:
        self.ssh_cidr = ssh_cidr
        self.lookup = lookup
        self._imds_endpoint = imds_endpoint
        self._lock = threading.Lock()
        self._placement: Optional[ClientPlacement] = None
        self._placement_known = False
        self._public: Optional[str] = None
        self._public_error: Optional[ConfigError] = None
        self._checked_at = 0.0

    @property
    def url(self) -> Optional[str]:
        """The endpoint asked for the public address (None: no lookup)."""
        if self.lookup is False:
            return None
        if isinstance(self.lookup, str):
            return self.lookup
        return checkip_url_from_environment() or CHECKIP_URL

    # -- what the provider asks ------------------------------------------------------------
    def access(self, region: str, vpc_id: str) -> RegionAccess:
        """What the security group in ``region`` (in ``vpc_id``) admits, and how to dial.

        Raises:
            ConfigError: the public address could not be found (names ``ssh_cidr=``).
        """
        if self.ssh_cidr is not None:
            return RegionAccess(cidr=self.ssh_cidr)
        placement = self.placement()
        if placement is not None and placement.region == region \
                and placement.vpc_id == vpc_id:
            cidr = f"{placement.private_ip}/32" if placement.security_groups else \
                (placement.vpc_cidrs[0] if placement.vpc_cidrs else f"{placement.private_ip}/32")
            return RegionAccess(cidr=cidr, source_groups=placement.security_groups,
                                private=True)
        return RegionAccess(cidr=self.public_cidr(), automatic=self.lookup is not False)

    def placement(self) -> Optional[ClientPlacement]:
        """The client's instance, if it is one (asked once)."""
        with self._lock:
            if not self._placement_known:
                self._placement = read_imds(self._imds_endpoint)
                self._placement_known = True
            return self._placement

    def public_cidr(self) -> str:
        """This computer's public address as a /32 or /128 (looked up once).

        Raises:
            ConfigError: the lookup failed (or is off and the route's address is
                private); the message names ``ssh_cidr=``.
        """
        with self._lock:
            if self._public is None and self._public_error is None:
                try:
                    self._public = self._find_public()
                except ConfigError as exc:
                    self._public_error = exc
                self._checked_at = time.monotonic()
            if self._public_error is not None:
                raise self._public_error
            assert self._public is not None
            return self._public

    def moved(self, force: bool = False) -> Optional[tuple[str, str]]:
        """Look the public address up again (connections are failing).

        At most once per few seconds unless ``force``; only for a looked-up address.

        Returns:
            ``(old, new)`` when it changed, else None.
        """
        url = self.url
        if self.ssh_cidr is not None or url is None:
            return None
        with self._lock:
            old = self._public
            if old is None or (not force and
                               time.monotonic() - self._checked_at < _RECHECK_INTERVAL):
                return None
            self._checked_at = time.monotonic()
            try:
                address = lookup_public_address(url)
            except OSError as exc:
                log.info("looking up this computer's address again failed: %s", exc)
                return None
            new = f"{address}/{address.max_prefixlen}"
            if new == old:
                return None
            self._public = new
        log.warning("this computer's public address changed from %s to %s (another "
                    "network?): the fleet's security groups follow", old, new)
        return old, new

    def _find_public(self) -> str:
        url = self.url
        if url is None:
            return detect_ssh_cidr()
        try:
            address = lookup_public_address(url)
        except OSError as exc:
            raise ConfigError(
                f"ssh_cidr: could not find this computer's public address, which the "
                f"fleet's security group lets in on port 22 ({exc}). Pass "
                "ssh_cidr='<your public IP>/32' (or your network's CIDR), or run from a "
                f"network that reaches {url}") from None
        cidr = f"{address}/{address.max_prefixlen}"
        log.info("this computer's public address is %s (from %s): port 22 of the fleet "
                 "is open to %s only", address, url, cidr)
        return cidr


# -- security group rules beyond resources.allow_ssh -------------------------------------

def _ssh_rule(**sources: Any) -> list[dict[str, Any]]:
    return [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **sources}]


def _cidr_sources(cidr: str) -> dict[str, Any]:
    network = ipaddress.ip_network(cidr, strict=False)
    if network.version == 4:
        return {"IpRanges": [{"CidrIp": str(network), "Description": "vmexec client"}]}
    return {"Ipv6Ranges": [{"CidrIpv6": str(network), "Description": "vmexec client"}]}


def _change(ec2: Any, region: str, operation: str, group_id: str,
            permissions: list[dict[str, Any]], expected: tuple[str, ...]) -> bool:
    """One ingress change; False when AWS answers with an ``expected`` error code."""
    fn = (ec2.authorize_security_group_ingress if operation.startswith("Authorize")
          else ec2.revoke_security_group_ingress)
    try:
        fn(GroupId=group_id, IpPermissions=permissions)
    except ClientError as exc:
        if retry.error_code(exc) in expected:
            return False
        raise ec2_errors.translate(exc, operation=operation, region=region) from None
    return True


def allow_groups(ec2: Any, region: str, group_id: str, source_groups: tuple[str, ...]
                 ) -> None:
    """Admit ``source_groups`` (the client's, in the same VPC) on tcp/22 of ``group_id``.

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    pairs = [{"GroupId": g, "Description": "vmexec client"} for g in source_groups]
    _change(ec2, region, "AuthorizeSecurityGroupIngress", group_id,
            _ssh_rule(UserIdGroupPairs=pairs), ("InvalidPermission.Duplicate",))
    log.info("%s: security group %s admits the client's group(s) %s on tcp/22", region,
             group_id, ", ".join(source_groups))


def follow(ec2: Any, region: str, group_id: str, old: str, new: str) -> None:
    """Move tcp/22 of ``group_id`` from ``old`` to ``new``: authorize, then revoke.

    A group already deleted (a failed launch was undone) is left alone.

    Raises:
        VMExecError/ConfigError: the translated AWS error.
    """
    gone = ("InvalidGroup.NotFound",)
    if not _change(ec2, region, "AuthorizeSecurityGroupIngress", group_id,
                   _ssh_rule(**_cidr_sources(new)), ("InvalidPermission.Duplicate",) + gone):
        log.debug("%s: %s already admits %s (or is gone)", region, group_id, new)
    _change(ec2, region, "RevokeSecurityGroupIngress", group_id,
            _ssh_rule(**_cidr_sources(old)), ("InvalidPermission.NotFound",) + gone)
    log.info("%s: security group %s: tcp/22 moved from %s to %s", region, group_id, old, new)
