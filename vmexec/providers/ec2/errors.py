"""What EC2 error codes mean to vmexec, in one place — and the seam to inject them.

Every botocore ``ClientError`` the EC2 provider sees goes through ``classify`` (is it
capacity, quota, throttling, or something else?) and, when it must reach the user,
``translate`` / ``quota_error`` / ``capacity_error``, so that messages name the next step
(which option, which quota, which command) the same way everywhere.

    code                                   kind        what the provider does
    InsufficientInstanceCapacity, ...      capacity    fall back: zone, type, region, on-demand
    VcpuLimitExceeded, ...                 quota       stop; QuotaError names the quota
    RequestLimitExceeded, Throttling, ...  throttling  retried (vmexec.retry.throttling)
    AuthFailure, UnauthorizedOperation...  config      ConfigError: credentials/permissions
    anything else                          other       VMExecError with the AWS message

**Test seam.** ``FaultInjector`` makes EC2 answer with chosen error codes, and
``ApiCallCounter`` counts calls by operation, both through botocore's event system on the
``boto3.Session`` the provider is given (clients copy the session's handlers when they
are created, so register before constructing the provider)::

    session = boto3.Session(region_name="us-east-1")
    faults = FaultInjector(session)
    faults.add("InsufficientInstanceCapacity", instance_type="c7g.large", zone="us-east-1a")
    faults.add("RequestLimitExceeded", operation="CreateFleet", times=2)
    calls = ApiCallCounter(session)
    provider = EC2Provider(max_workers=8, session=session, ...)

Capacity and quota faults on ``CreateFleet`` are reported the way AWS reports them for
``instant`` fleets — the matching overrides are dropped from the request and listed in
the response's ``Errors`` (and when nothing is left, the call answers with no instances
at all); every other fault, and every fault on other operations, raises a
``ClientError`` with the chosen code, as AWS does. The local-cloud harness reuses this.

Imports botocore: lives under ``providers/ec2`` only. Must not import the scheduler, the
executor, or the other modules of this package (they import it).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import re
import threading
import uuid
from typing import Any, Optional

from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.errors import CapacityError, ConfigError, QuotaError, VMExecError
from vmexec.retry import THROTTLING_CODES, error_code

__all__ = [
    "CAPACITY_CODES",
    "QUOTA_CODES",
    "THROTTLING_CODES",
    "classify",
    "throttled",
    "call",
    "translate",
    "quota_error",
    "quota_for",
    "capacity_error",
    "client_error",
    "Fault",
    "FaultInjector",
    "ApiCallCounter",
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


def throttled(what: str, fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)``, retried while AWS throttles it (``vmexec.retry.throttling``)."""
    return retry.throttling(what)(fn, **kwargs)


def call(operation: str, region: Optional[str], fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with throttling retried and any other AWS error translated.

    Raises:
        ConfigError, QuotaError, CapacityError, VMExecError: see ``translate``.
    """
    try:
        return throttled(f"{operation} in {region}", fn, **kwargs)
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


def client_error(code: str, operation: str, message: str = "") -> ClientError:
    """A botocore ``ClientError`` with ``code``, as AWS would raise it."""
    return ClientError(
        {"Error": {"Code": code, "Message": message or f"injected {code}"},
         "ResponseMetadata": {"HTTPStatusCode": 400, "RequestId": "vmexec-fault"}},
        operation,
    )


# --- the test seam: faults and call counts through botocore events ------------------

def _emitter(target: Any) -> Any:
    """The event emitter of a boto3 Session, a botocore client, or an emitter itself."""
    if hasattr(target, "events") and hasattr(target.events, "register"):
        return target.events  # boto3.Session
    meta = getattr(target, "meta", None)
    if meta is not None and hasattr(meta, "events"):
        return meta.events  # a client
    if hasattr(target, "register"):
        return target
    raise TypeError(f"cannot register botocore handlers on {target!r}: pass a "
                    "boto3.Session, a client or an event emitter")


@dataclasses.dataclass
class Fault:
    """One injected error: which calls it hits, and how often.

    Attributes:
        code: the EC2 error code to answer with.
        operation: the API operation it applies to (``"CreateFleet"``, ``"RunInstances"``,
            ``"TerminateInstances"``, ...).
        region, instance_type, zone, spot: narrow the fault; None matches anything.
        times: how many matching calls (or fleet overrides) it hits; None: all of them.
        message: the error message (default: "injected <code>").
        partial: for ``CreateFleet``, report the fault in the response's ``Errors`` list
            instead of raising; default: True for capacity and quota codes.
    """

    code: str
    operation: str = "CreateFleet"
    region: Optional[str] = None
    instance_type: Optional[str] = None
    zone: Optional[str] = None
    spot: Optional[bool] = None
    times: Optional[int] = None
    message: str = ""
    partial: Optional[bool] = None
    hits: int = 0

    def matches(self, operation: str, region: Optional[str], instance_type: Optional[str],
                zone: Optional[str], spot: Optional[bool]) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.operation == operation
                and self.region in (None, region)
                and self.instance_type in (None, instance_type)
                and self.zone in (None, zone)
                and (self.spot is None or self.spot == bool(spot)))


class FaultInjector:
    """Makes EC2 calls fail with chosen error codes (see the module docstring).

    Args:
        target: a ``boto3.Session`` (register before creating clients from it), a
            client, or a botocore event emitter.
    """

    def __init__(self, target: Any) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._subnet_zones: dict[str, str] = {}
        #: (operation, region, instance_type, zone, code) of every fault that fired.
        self.fired: list[tuple[str, Optional[str], Optional[str], Optional[str], str]] = []
        events = _emitter(target)
        uid = f"vmexec-faults-{uuid.uuid4().hex}"
        events.register("before-parameter-build.ec2", self._before_build,
                        unique_id=uid + "-build")
        events.register("before-call.ec2.CreateFleet", self._short_circuit,
                        unique_id=uid + "-call")
        events.register("after-call.ec2.CreateFleet", self._add_errors,
                        unique_id=uid + "-after")
        events.register("after-call.ec2.DescribeSubnets", self._learn_subnets,
                        unique_id=uid + "-subnets")

    def add(self, code: str, **match: Any) -> Fault:
        """Inject ``code`` into the calls described by ``match`` (the ``Fault`` fields)."""
        fault = Fault(code=code, **match)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    # -- handlers ------------------------------------------------------------------
    def _take(self, operation: str, region: Optional[str], instance_type: Optional[str],
              zone: Optional[str], spot: Optional[bool]) -> Optional[Fault]:
        with self._lock:
            for fault in self._faults:
                if fault.matches(operation, region, instance_type, zone, spot):
                    fault.hits += 1
                    self.fired.append((operation, region, instance_type, zone, fault.code))
                    return fault
        return None

    def _learn_subnets(self, parsed: dict[str, Any], **_: Any) -> None:
        for subnet in parsed.get("Subnets", []):
            self._subnet_zones[subnet["SubnetId"]] = subnet["AvailabilityZone"]

    def _zone(self, spec: dict[str, Any]) -> Optional[str]:
        zone = spec.get("AvailabilityZone") or spec.get("Placement", {}).get("AvailabilityZone")
        if zone:
            return str(zone)
        subnet = spec.get("SubnetId")
        return self._subnet_zones.get(subnet) if subnet else None

    def _before_build(self, params: dict[str, Any], model: Any, context: dict[str, Any],
                      **_: Any) -> None:
        operation = model.name
        region = context.get("client_region")
        if operation == "CreateFleet":
            self._fleet(params, region, context)
            return
        instance_type = params.get("InstanceType")
        spot = params.get("InstanceMarketOptions", {}).get("MarketType") == "spot" \
            if operation == "RunInstances" else None
        fault = self._take(operation, region, instance_type, self._zone(params), spot)
        if fault is not None:
            raise client_error(fault.code, operation, fault.message)

    def _fleet(self, params: dict[str, Any], region: Optional[str],
               context: dict[str, Any]) -> None:
        spec = params.get("TargetCapacitySpecification", {})
        spot = spec.get("DefaultTargetCapacityType") == "spot"
        lifecycle = "spot" if spot else "on-demand"
        errors: list[dict[str, Any]] = []
        configs = []
        for config in params.get("LaunchTemplateConfigs", []):
            kept = []
            for override in config.get("Overrides") or [{}]:
                fault = self._take("CreateFleet", region, override.get("InstanceType"),
                                   self._zone(override), spot)
                if fault is None:
                    kept.append(override)
                    continue
                partial = fault.partial if fault.partial is not None else \
                    classify(fault.code) in ("capacity", "quota")
                if not partial:
                    raise client_error(fault.code, "CreateFleet", fault.message)
                errors.append({
                    "LaunchTemplateAndOverrides": {
                        "LaunchTemplateSpecification": copy.deepcopy(
                            config.get("LaunchTemplateSpecification", {})),
                        "Overrides": copy.deepcopy(override),
                    },
                    "Lifecycle": lifecycle,
                    "ErrorCode": fault.code,
                    "ErrorMessage": fault.message or f"injected {fault.code}",
                })
            if kept:
                # A new dict: the caller's request structures must not change.
                configs.append({**config, "Overrides": kept})
        if not errors:
            return
        context["vmexec_fleet_errors"] = errors
        if configs:
            params["LaunchTemplateConfigs"] = configs
        else:
            context["vmexec_fleet_empty"] = True

    def _short_circuit(self, context: dict[str, Any], **_: Any) -> Optional[tuple[Any, Any]]:
        if not context.get("vmexec_fleet_empty"):
            return None
        # Every override failed: answer as AWS does, with no instances and the errors.
        http = AWSResponse("https://vmexec.invalid/", 200, {}, None)
        return http, {"FleetId": f"fleet-{uuid.uuid4()}", "Instances": [], "Errors": []}

    def _add_errors(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        errors = context.get("vmexec_fleet_errors")
        if errors:
            parsed.setdefault("Errors", []).extend(errors)


class ApiCallCounter:
    """Counts API calls made through a session's clients, by operation and region.

    Every attempt counts, including ones a ``FaultInjector`` fails and ones retried
    after throttling.

    Args:
        target: a ``boto3.Session`` (register before creating clients), a client, or an
            event emitter.
        service: the botocore service id to count (default ``"ec2"``; ``"ssm"`` etc.).
    """

    def __init__(self, target: Any, service: str = "ec2") -> None:
        self._lock = threading.Lock()
        self.by_operation: collections.Counter[str] = collections.Counter()
        self.by_region: collections.Counter[tuple[str, str]] = collections.Counter()
        _emitter(target).register(f"provide-client-params.{service}", self._count,
                                  unique_id=f"vmexec-count-{service}-{uuid.uuid4().hex}")

    def _count(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.by_operation[model.name] += 1
            self.by_region[(str(context.get("client_region")), model.name)] += 1

    def __getitem__(self, operation: str) -> int:
        with self._lock:
            return self.by_operation[operation]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_operation.values())

    def reset(self) -> None:
        with self._lock:
            self.by_operation.clear()
            self.by_region.clear()
