"""What EC2 error codes mean to vmexec, in one place.

Every botocore ``ClientError`` the EC2 provider sees goes through ``classify`` (is it
capacity, quota, throttling, or something else?) and, when it must reach the user,
``translate`` / ``quota_error`` / ``capacity_error``, so that messages name the next step
(which option, which quota, which command) the same way everywhere.

    code                                   kind        what the provider does
    InsufficientInstanceCapacity, ...      capacity    fall back: zone, type, region, on-demand
    VcpuLimitExceeded, ...                 quota       stop; QuotaError names the quota
    RequestLimitExceeded, Throttling, ...  throttling  retried by every client (clients.py)
    AuthFailure, UnauthorizedOperation...  config      ConfigError: credentials/permissions
    anything else                          other       VMExecError with the AWS message

Imports botocore: lives under ``providers/ec2`` only. Must not import the scheduler, the
executor, or the other modules of this package (they import it). The test seam that
makes EC2 answer with chosen error codes is ``vmexec.testing.faults``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from botocore.exceptions import ClientError

from vmexec.errors import CapacityError, ConfigError, QuotaError, VMExecError
from vmexec.retry import THROTTLING_CODES, error_code

__all__ = [
    "CAPACITY_CODES",
    "QUOTA_CODES",
    "THROTTLING_CODES",
    "classify",
    "call",
    "translate",
    "quota_error",
    "quota_for",
    "capacity_error",
]

#: "No room for this type here now": fall back to another zone, type, region or
#: purchase option. (``Unsupported``: the type is not available in that zone.)
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
    "UnfulfillableCapacity",
    "SpotMaxPriceTooLow",
    "InsufficientCapacityOnOutpost",
})

#: The account's limits: asking elsewhere in the same region will not help.
QUOTA_CODES = frozenset({
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "InstanceLimitExceeded",
    "MaxSpotFleetRequestCountExceeded",
    "VolumeLimitExceeded",
})

#: Credentials or permissions: a setup problem, not a launch problem.
_CONFIG_CODES = frozenset({
    "AuthFailure",
    "UnauthorizedOperation",
    "OptInRequired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "RequestExpired",
    "AccessDenied",
    "AccessDeniedException",
    "Blocked",
    "PendingVerification",
})


def classify(code: Optional[str]) -> str:
    """``"capacity"``, ``"quota"``, ``"throttling"``, ``"config"`` or ``"other"``."""
    if code in CAPACITY_CODES:
        return "capacity"
    if code in QUOTA_CODES:
        return "quota"
    if code in THROTTLING_CODES:
        return "throttling"
    if code in _CONFIG_CODES:
        return "config"
    return "other"


def call(operation: str, region: Optional[str], fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with any AWS error translated (throttling was already retried
    by the client: ``clients.RetryingClient``).

    Raises:
        ConfigError, QuotaError, CapacityError, VMExecError: see ``translate``.
    """
    try:
        return fn(**kwargs)
    except ClientError as exc:
        raise translate(exc, operation=operation, region=region) from exc


def _message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message", "")) or str(exc)
    return str(exc)


def translate(exc: ClientError, *, operation: str, region: Optional[str]) -> VMExecError:
    """The vmexec error for an EC2/SSM error that no fallback can handle.

    Args:
        exc: the botocore error.
        operation: what vmexec was doing, e.g. "CreateFleet".
        region: where.

    Returns:
        ``ConfigError`` for credential/permission problems, ``QuotaError`` for quotas
        (without instance details; see ``quota_error``), ``CapacityError`` for capacity,
        else ``VMExecError``; the caller raises it ``from exc``.
    """
    code = error_code(exc) or "Unknown"
    where = f" in {region}" if region else ""
    text = _message(exc)
    kind = classify(code)
    if kind == "config":
        return ConfigError(
            f"AWS refused {operation}{where}: {code}: {text}. Check the credentials "
            "vmexec uses (AWS_PROFILE, `aws sts get-caller-identity`), that the region is "
            f"enabled, and that the IAM policy allows ec2:{operation}"
        )
    if kind == "quota":
        return QuotaError(f"EC2 quota reached{where} ({operation}): {code}: {text}")
    if kind == "capacity":
        return CapacityError(f"no EC2 capacity{where} ({operation}): {code}: {text}")
    return VMExecError(f"EC2 {operation}{where} failed: {code}: {text}")


# --- quotas -------------------------------------------------------------------------

# Instance family letters -> (on-demand quota, spot quota), each (name, code or None).
# From the Service Quotas console for EC2 (vCPU-based quotas, per region). Families
# not listed here (A, C, D, H, I, M, R, T, Z and their variants) share "Standard".
_QUOTAS: dict[str, tuple[tuple[str, Optional[str]], tuple[str, Optional[str]]]] = {
    "g": (("Running On-Demand G and VT instances", "L-DB2E81BA"),
          ("All G and VT Spot Instance Requests", "L-3819A6DF")),
    "inf": (("Running On-Demand Inf instances", "L-1945791B"),
            ("All Inf Spot Instance Requests", "L-B5D1601B")),
    "trn": (("Running On-Demand Trn instances", "L-2C3B7624"),
            ("All Trn Spot Instance Requests", None)),
    "dl": (("Running On-Demand DL instances", "L-6E869C2A"),
           ("All DL Spot Instance Requests", "L-85EED4F7")),
    "p": (("Running On-Demand P instances", "L-417A185B"),
          ("All P Spot Instance Requests", "L-7212CCBC")),
    "f": (("Running On-Demand F instances", "L-74FC7D96"),
          ("All F Spot Instance Requests", "L-88CF9481")),
    "x": (("Running On-Demand X instances", "L-7295265B"),
          ("All X Spot Instance Requests", "L-E3A00192")),
    "u": (("Running On-Demand High Memory instances", "L-43DA4232"),
          ("All High Memory Spot Instance Requests", None)),
}
_QUOTAS["vt"] = _QUOTAS["g"]
_STANDARD = (
    ("Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", "L-1216C47A"),
    ("All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", "L-34B43A08"),
)
# The family is the letters before the generation digit: c7g -> c, inf2 -> inf,
# u-6tb1 -> u.
_FAMILY_RE = re.compile(r"^([a-z]+?)(?=\d|-)")


def quota_for(instance_type: str, spot: bool) -> tuple[str, Optional[str]]:
    """The Service Quotas name and code (``L-...``) that limit ``instance_type``.

    Args:
        instance_type: e.g. ``"c7g.large"``.
        spot: the spot quota instead of the on-demand one.

    Returns:
        ``(name, code)``; code is None where vmexec does not know it.
    """
    match = _FAMILY_RE.match(instance_type.lower())
    family = match.group(1) if match else ""
    on_demand, spot_quota = _QUOTAS.get(family, _STANDARD)
    return spot_quota if spot else on_demand


def quota_error(
    exc_or_code: Any,
    *,
    region: str,
    instance_type: str,
    spot: bool,
    vcpus_needed: int,
    message: str = "",
) -> QuotaError:
    """A ``QuotaError`` naming the quota that stopped a launch and how to raise it.

    Args:
        exc_or_code: the ``ClientError``, or the error code from a fleet's ``Errors``.
        region: where the launch failed (quotas are per region).
        instance_type: the type being launched (selects the family's quota).
        spot: whether it was a spot launch (spot quotas are separate).
        vcpus_needed: vCPUs this launch wanted, suggested as the new value.
        message: AWS's message, when ``exc_or_code`` is a code.
    """
    if isinstance(exc_or_code, BaseException):
        code = error_code(exc_or_code) or "QuotaExceeded"
        message = message or _message(exc_or_code)
    else:
        code = str(exc_or_code)
    name, quota_code = quota_for(instance_type, spot)
    purchase = "spot" if spot else "on-demand"
    text = (f"EC2 quota reached in {region} launching {instance_type} ({purchase}): "
            f"{code}: {message or 'limit exceeded'}. The limit is the quota '{name}'"
            + (f" ({quota_code})" if quota_code else "")
            + f", counted in vCPUs per region; this launch needed about {vcpus_needed} "
              "vCPUs more. Raise it in the Service Quotas console "
              "(https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas"
            + (f"/{quota_code}" if quota_code else "")
            + f", region {region})")
    if quota_code:
        text += (" or with: aws service-quotas request-service-quota-increase "
                 f"--service-code ec2 --quota-code {quota_code} "
                 f"--desired-value <current + {vcpus_needed}> --region {region}")
    text += "; or lower max_workers, or add regions= to spread the fleet."
    return QuotaError(text)


def capacity_error(tried: list[str], last_errors: list[str]) -> CapacityError:
    """A ``CapacityError`` listing what was tried, after every fallback failed.

    Args:
        tried: descriptions of the candidates, e.g. "c7g.large spot in us-east-1".
        last_errors: the distinct error codes/messages seen.
    """
    seen = "; ".join(dict.fromkeys(last_errors)) or "no instances were returned"
    return CapacityError(
        f"no EC2 capacity for any candidate: tried {', '.join(tried)} ({seen}). "
        "Capacity comes and goes: try again later, or widen the choice with more "
        "instance_type= entries, more regions=, or spot=False/True."
    )
