"""EC2 API faults and call counts, injected through botocore's event system.

The one fault injector of vmexec's tests: the moto-based unit tests register it on the
``boto3.Session`` they give the EC2 provider, and ``LocalCloud`` registers it on its
own session (its ``capacity_error`` / ``api_error`` / ``throttle`` are this class's).
Clients copy a session's handlers when they are made, so register before the provider
or client exists; faults added later still apply (the handlers read the live list)::

    session = boto3.Session(region_name="us-east-1")
    faults = FaultInjector(session)
    faults.add("InsufficientInstanceCapacity", instance_type="c7g.large", zone="us-east-1a")
    faults.add("RequestLimitExceeded", operation="CreateFleet", times=2)
    calls = ApiCallCounter(session)
    provider = EC2Provider(max_workers=8, session=session, ...)

How a fault answers, as AWS would:

* the call fails with the fault's code (a ``ClientError``) — answered in ``before-call``,
  before botocore's own retry loop, so that the caller's retry policy sees every
  refusal and the ``after-call`` handlers run as for any failed call;
* on ``CreateFleet`` (type ``instant``) a *partial* fault — by default a capacity or
  quota code (``classify`` of the EC2 provider) — drops the pools it covers from the
  request and lists them in the response's ``Errors``; when no pool is left the call
  answers with no instances at all. The caller's request is never modified.

A fault matches an operation, a region, and a pool (instance type, zone, spot or
on-demand); None matches anything. The pool of a call comes from its parameters, or
from the launch template and subnet they name when the injector is given a ``lookup``
(a fault-free client per region), as ``LocalCloud``'s is.

Imports boto3's botocore and the EC2 provider's ``classify`` (what a code means is the
product's to say). Must not import the scheduler, the executor or a transport.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional

import botocore.awsrequest
import botocore.exceptions

from vmexec.providers.ec2.errors import classify

__all__ = ["Fault", "FaultInjector", "ApiCallCounter", "client_error"]

log = logging.getLogger(__name__)

#: The operations that launch machines: where capacity faults apply by default.
LAUNCH_OPERATIONS = ("RunInstances", "CreateFleet")

# A launch's pool: (instance type, zone, spot).
_Pool = tuple[Optional[str], Optional[str], bool]


def client_error(code: str, operation: str, message: str = "") -> botocore.exceptions.ClientError:
    """A botocore ``ClientError`` with ``code``, as AWS would raise it (for fakes)."""
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message or f"injected {code}"},
         "ResponseMetadata": {"HTTPStatusCode": 400, "RequestId": "vmexec-fault"}},
        operation,
    )


@dataclasses.dataclass(eq=False)
class Fault:
    """One injected API error. Returned when added; ``remove()`` ends it.

    Attributes:
        code: the AWS error code (``InsufficientInstanceCapacity``, ...).
        message: the error message.
        operations: the API operations it applies to (empty: every EC2 operation).
        status: the HTTP status of the error answer.
        region, zone, instance_type: None matches any.
        spot: True only spot launches, False only on-demand (and other calls), None both.
        remaining: how many more hits it has (None: until removed); used up, it is
            removed.
        hits: how many calls (or fleet pools, see ``per_pool``) it failed so far.
        partial: on ``CreateFleet``, leave the matching pools out and report them in the
            response's ``Errors`` (True) or fail the whole call (False); None: partial
            for capacity and quota codes.
        per_pool: on ``CreateFleet``, every pool it covers is one hit (True), or the
            whole call is (False).
    """

    code: str
    message: str = ""
    operations: frozenset[str] = frozenset()
    status: int = 400
    region: Optional[str] = None
    zone: Optional[str] = None
    instance_type: Optional[str] = None
    spot: Optional[bool] = None
    remaining: Optional[int] = None
    hits: int = 0
    partial: Optional[bool] = None
    per_pool: bool = False
    _owner: Optional["FaultInjector"] = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.message:
            self.message = f"injected {self.code}"

    @property
    def capacity(self) -> bool:
        """Whether it leaves ``CreateFleet`` pools out instead of failing the call."""
        if self.partial is not None:
            return self.partial
        return classify(self.code) in ("capacity", "quota")

    def remove(self) -> None:
        """Stop injecting this fault."""
        if self._owner is not None:
            self._owner.remove(self)

    def matches_pool(self, instance_type: Optional[str], zone: Optional[str],
                     spot: bool) -> bool:
        """Whether a launch of ``instance_type`` in ``zone`` (spot or not) hits this fault."""
        if self.instance_type is not None and instance_type != self.instance_type:
            return False
        # A launch that names no zone lets AWS pick one with capacity.
        if self.zone is not None and zone != self.zone:
            return False
        return self.spot is None or self.spot == spot

    def applies(self, operation: str, region: Optional[str]) -> bool:
        """Whether calls of ``operation`` in ``region`` may hit this fault."""
        return (not self.operations or operation in self.operations) and \
            self.region in (None, region)

    def matches(self, operation: str, region: Optional[str], pool: _Pool) -> bool:
        """Whether a call of ``operation`` in ``region`` for ``pool`` hits this fault."""
        return self.applies(operation, region) and self.matches_pool(*pool)


class FaultInjector:
    """Makes EC2 calls fail with chosen error codes (see the module docstring).

    Args:
        target: a ``boto3.Session`` (register before creating clients from it), a
            client, or a botocore event emitter.
        lookup: ``region -> EC2 client`` without faults, to read the launch templates
            and subnets that requests name (None: pools come from the parameters and
            from the subnets this target's clients described).
        url: the endpoint named in the answers it makes up.
    """

    def __init__(self, target: Any, lookup: Optional[Callable[[str], Any]] = None,
                 url: str = "https://vmexec.invalid/") -> None:
        self._lookup = lookup
        self._url = url
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._templates = LaunchTemplates(lookup) if lookup is not None else None
        self._subnet_zones: dict[tuple[str, str], str] = {}
        #: (operation, region, instance_type, zone, code) of every fault that fired.
        self.fired: list[tuple[str, Optional[str], Optional[str], Optional[str], str]] = []
        events = _emitter(target)
        uid = f"vmexec-faults-{uuid.uuid4().hex}"
        # Decided on the caller's own parameters (before serialisation flattens them),
        # answered in before-call, which can replace the HTTP request.
        events.register("before-parameter-build.ec2", self._before_build,
                        unique_id=uid + "-build")
        events.register("before-call.ec2", self._before_call, unique_id=uid + "-call")
        events.register("after-call.ec2.CreateFleet", self._fleet_errors,
                        unique_id=uid + "-after")
        events.register("after-call.ec2.DescribeSubnets", self._learn_subnets,
                        unique_id=uid + "-subnets")

    # --- adding and removing faults ------------------------------------------------------

    @property
    def faults(self) -> list[Fault]:
        """The faults in force."""
        with self._lock:
            return list(self._faults)

    def add(self, code: str, *, operation: Optional[str] = "CreateFleet",
            operations: Optional[Iterable[str]] = None, times: Optional[int] = None,
            **match: Any) -> Fault:
        """Inject ``code`` into the calls described by ``match``.

        Args:
            code: the EC2 error code to answer with.
            operation: the operation it applies to (``"CreateFleet"``,
                ``"RunInstances"``, ...); ``operations`` names several (empty: all).
            times: how many matching calls, or ``CreateFleet`` pools, it hits (None:
                every one).
            **match: more ``Fault`` fields: ``region``, ``instance_type``, ``zone``,
                ``spot``, ``message``, ``partial``, ``status``.

        Returns:
            The ``Fault``.
        """
        names = frozenset(operations) if operations is not None else \
            frozenset([operation] if operation else [])
        return self._add(Fault(code=code, operations=names, remaining=times, per_pool=True,
                               **match))

    def capacity_error(self, *, instance_type: Optional[str] = None,
                       zone: Optional[str] = None, region: Optional[str] = None,
                       spot: Optional[bool] = None,
                       code: str = "InsufficientInstanceCapacity",
                       times: Optional[int] = None) -> Fault:
        """Make launches of a type / zone / region (spot or not) fail for lack of capacity.

        ``RunInstances`` fails with ``code``; ``CreateFleet`` (type instant) leaves the
        matching pools out and reports them in the response's ``Errors``, as EC2 does,
        launching from the remaining pools.

        Args:
            instance_type, zone, region: what is short (None: any).
            spot: True only spot, False only on-demand, None both.
            code: e.g. ``InsufficientInstanceCapacity``, ``Unsupported``,
                ``SpotMaxPriceTooLow``, ``InsufficientCapacityOnHost``.
            times: how many launch calls it affects (None: until removed).

        Returns:
            The ``Fault`` (``remove()`` ends it; ``hits`` counts affected calls).
        """
        message = (f"We currently do not have sufficient {instance_type or 'instance'} "
                   f"capacity in the Availability Zone you requested "
                   f"({zone or region or 'any'}). (injected by LocalCloud)")
        return self._add(Fault(code=code, message=message,
                               operations=frozenset(LAUNCH_OPERATIONS),
                               region=region, zone=zone, instance_type=instance_type,
                               spot=spot, remaining=times, partial=True))

    def api_error(self, code: str, *, operations: Iterable[str] = LAUNCH_OPERATIONS,
                  region: Optional[str] = None, message: str = "", status: int = 400,
                  times: Optional[int] = None) -> Fault:
        """Make API calls fail with ``code`` (e.g. ``VcpuLimitExceeded`` for a quota).

        Args:
            code: the AWS error code.
            operations: the operations it applies to (e.g. ``["RunInstances"]``).
            region: only this region (None: all).
            message: the error message (a sensible default names the code).
            status: the HTTP status.
            times: how many calls it fails (None: until removed).

        Returns:
            The ``Fault``.
        """
        return self._add(Fault(
            code=code, message=message or f"{code} (injected by LocalCloud)",
            operations=frozenset(operations), status=status, region=region,
            remaining=times, partial=False))

    def throttle(self, count: int, *, operations: Optional[Iterable[str]] = None,
                 region: Optional[str] = None, code: str = "RequestLimitExceeded") -> Fault:
        """The next ``count`` matching calls fail with ``RequestLimitExceeded`` (HTTP 503).

        The error is returned before botocore's own retries, so the caller's retry policy
        sees every one of them.

        Args:
            count: how many calls to refuse, then calls succeed again.
            operations: only these operations (None: every EC2 operation).
            region: only this region (None: all).
            code: ``RequestLimitExceeded`` or ``Throttling``.

        Returns:
            The ``Fault``.
        """
        return self._add(Fault(
            code=code, message="Request limit exceeded. (injected by LocalCloud)",
            operations=frozenset(operations or ()), status=503, region=region,
            remaining=count, partial=False))

    def remove(self, fault: Fault) -> None:
        """Stop injecting ``fault``."""
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def _add(self, fault: Fault) -> Fault:
        fault._owner = self
        with self._lock:
            self._faults.append(fault)
        return fault

    # --- matching --------------------------------------------------------------------------

    def _hit_locked(self, fault: Fault, operation: str, region: Optional[str],
                    pool: _Pool) -> bool:
        """Count one hit of ``fault``; False once it is used up."""
        if fault.remaining is not None:
            if fault.remaining <= 0:
                return False
            fault.remaining -= 1
            if fault.remaining == 0 and fault in self._faults:
                self._faults.remove(fault)
        fault.hits += 1
        self.fired.append((operation, region, pool[0], pool[1], fault.code))
        return True

    def _before_build(self, params: dict[str, Any], model: Any, context: dict[str, Any],
                      **_: Any) -> None:
        """``before-parameter-build``: decide which fault, if any, answers this call."""
        operation = model.name
        region = region_of(context)
        if operation == "CreateFleet":
            self._fleet(params, region, context)
            return
        candidates = [f for f in self.faults if f.applies(operation, region)]
        if not candidates:
            return
        # Reading a template or a subnet costs a call: only for faults that name a pool.
        pooled = any(f.instance_type is not None or f.zone is not None or f.spot is not None
                     for f in candidates)
        pool = self._call_pool(operation, region, params, read=pooled)
        with self._lock:
            for fault in self._faults:
                if fault.matches(operation, region, pool) and \
                        self._hit_locked(fault, operation, region, pool):
                    context["vmexec_fault"] = fault
                    break

    def _fleet(self, params: dict[str, Any], region: str, context: dict[str, Any]) -> None:
        """CreateFleet: drop the pools a partial fault covers, remembering them as the
        fleet's ``Errors``; a whole-call fault answers the call instead."""
        candidates = [f for f in self.faults if f.applies("CreateFleet", region)]
        if not candidates:
            return
        read = any(f.instance_type is not None or f.zone is not None for f in candidates)
        target = params.get("TargetCapacitySpecification", {})
        spot = target.get("DefaultTargetCapacityType") == "spot"
        lifecycle = "spot" if spot else "on-demand"
        errors: list[dict[str, Any]] = []
        configs: list[dict[str, Any]] = []
        taken: list[Fault] = []  # faults that hit this call
        for config in params.get("LaunchTemplateConfigs") or [{}]:
            spec = config.get("LaunchTemplateSpecification", {})
            data = self._template(region, spec) if read else {}
            overrides = config.get("Overrides") or [{}]
            kept = []
            for override in overrides:
                pool = (override.get("InstanceType") or data.get("InstanceType"),
                        self._zone_of(region, override, read) or _template_zone(data), spot)
                fault = self._take_fleet_fault(region, pool, taken)
                if fault is None:
                    kept.append(override)
                    continue
                if not fault.capacity:
                    context["vmexec_fault"] = fault
                    return
                errors.append({
                    "LaunchTemplateAndOverrides": {"LaunchTemplateSpecification": spec,
                                                   "Overrides": override},
                    "Lifecycle": lifecycle, "ErrorCode": fault.code,
                    "ErrorMessage": fault.message})
            if kept and kept != overrides:
                configs.append({**config, "Overrides": kept})
            elif kept and config:
                configs.append(config)
        if not errors:
            return
        context["vmexec_fleet_errors"] = errors
        log.info("CreateFleet in %s: %d pool(s) without capacity (injected)", region,
                 len(errors))
        if configs:
            # A new list: the caller's own structures must not change under it.
            params["LaunchTemplateConfigs"] = configs
        else:
            context["vmexec_fleet_empty"] = True

    def _take_fleet_fault(self, region: str, pool: _Pool, taken: list[Fault]
                          ) -> Optional[Fault]:
        """The fault that hits ``pool`` of a CreateFleet call, its hit counted.

        A fault that counts the whole call once (``per_pool`` False) and already hit
        this call covers its other pools too, even when that hit used it up.
        """
        with self._lock:
            for fault in taken:
                if not fault.per_pool and fault.matches("CreateFleet", region, pool):
                    return fault
            for fault in list(self._faults):
                if fault.matches("CreateFleet", region, pool) and \
                        self._hit_locked(fault, "CreateFleet", region, pool):
                    taken.append(fault)
                    return fault
            return None

    # --- answering -------------------------------------------------------------------------

    def _before_call(self, model: Any, context: dict[str, Any], **_: Any
                     ) -> Optional[tuple[Any, dict[str, Any]]]:
        """``before-call``: answer with the chosen error instead of calling AWS."""
        fault = context.get("vmexec_fault")
        if fault is not None:
            log.info("injecting %s into %s in %s", fault.code, model.name,
                     region_of(context))
            return self._synthesize(fault.status, {
                "Error": {"Code": fault.code, "Message": fault.message}})
        if context.get("vmexec_fleet_empty"):
            # Every pool failed: answer as AWS does, with no instances and the errors.
            return self._synthesize(200, {
                "FleetId": f"fleet-{uuid.uuid4()}", "Instances": [],
                "Errors": context.get("vmexec_fleet_errors", [])})
        return None

    def _fleet_errors(self, parsed: dict[str, Any], context: dict[str, Any],
                      **_: Any) -> None:
        """``after-call`` of CreateFleet: report the pools left out as the fleet's Errors."""
        if context.get("vmexec_fleet_errors") and not context.get("vmexec_fleet_empty") \
                and not context.get("vmexec_fault"):
            parsed.setdefault("Errors", []).extend(context["vmexec_fleet_errors"])

    def _synthesize(self, status: int, parsed: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        request_id = str(uuid.uuid4())
        parsed["ResponseMetadata"] = {"RequestId": request_id, "HTTPStatusCode": status,
                                      "HTTPHeaders": {}, "RetryAttempts": 0}
        error = parsed.get("Error")
        body = (f"<Response><Errors><Error><Code>{error['Code']}</Code><Message>"
                f"{error['Message']}</Message></Error></Errors><RequestID>{request_id}"
                f"</RequestID></Response>" if error else "").encode()
        http = botocore.awsrequest.AWSResponse(self._url, status, {}, _RawBody(body))
        return http, parsed

    # --- what a call launches --------------------------------------------------------------

    def _call_pool(self, operation: str, region: str, params: dict[str, Any],
                   read: bool) -> _Pool:
        """(instance type, zone, spot) of a call other than CreateFleet.

        Args:
            read: also read the launch template and subnet it names (API calls).
        """
        data = self._template(region, params.get("LaunchTemplate") or {}) if read else {}
        instance_type = params.get("InstanceType") or data.get("InstanceType")
        zone = self._zone_of(region, params, read) or _template_zone(data)
        interfaces = params.get("NetworkInterfaces") or data.get("NetworkInterfaces") or []
        if zone is None and interfaces:
            zone = self._subnet_zone(region, interfaces[0].get("SubnetId"), read)
        market = (params.get("InstanceMarketOptions") or
                  data.get("InstanceMarketOptions") or {}).get("MarketType")
        return instance_type, zone, operation == "RunInstances" and market == "spot"

    def _template(self, region: str, spec: dict[str, Any]) -> dict[str, Any]:
        if self._templates is None or not spec:
            return {}
        return self._templates.data(region, spec)

    def _zone_of(self, region: str, spec: dict[str, Any], read: bool = True
                 ) -> Optional[str]:
        zone = spec.get("AvailabilityZone") or (spec.get("Placement") or {}).get(
            "AvailabilityZone")
        if zone:
            return str(zone)
        return self._subnet_zone(region, spec.get("SubnetId"), read)

    def _learn_subnets(self, parsed: dict[str, Any], context: dict[str, Any],
                       **_: Any) -> None:
        region = region_of(context)
        with self._lock:
            for subnet in parsed.get("Subnets", []):
                self._subnet_zones[(region, subnet["SubnetId"])] = subnet["AvailabilityZone"]

    def _subnet_zone(self, region: str, subnet: Optional[str], read: bool = True
                     ) -> Optional[str]:
        if not subnet:
            return None
        with self._lock:
            if (region, subnet) in self._subnet_zones:
                return self._subnet_zones[(region, subnet)]
        if self._lookup is None or not read:
            return None
        try:
            found = self._lookup(region).describe_subnets(SubnetIds=[subnet])["Subnets"]
        except botocore.exceptions.ClientError:
            return None
        zone = found[0]["AvailabilityZone"] if found else None
        if zone:
            with self._lock:
                self._subnet_zones[(region, subnet)] = zone
        return zone


class LaunchTemplates:
    """Launch template data by (region, template, version), read once per numbered version.

    Args:
        lookup: ``region -> EC2 client`` to read them with (one without faults).
    """

    def __init__(self, lookup: Callable[[str], Any]) -> None:
        self._lookup = lookup
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], dict[str, Any]] = {}

    def data(self, region: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The data of the template version ``spec`` names ({} when none or unreadable).

        Args:
            region: where the template is.
            spec: a ``LaunchTemplateSpecification`` (``LaunchTemplateId`` or
                ``LaunchTemplateName``, optional ``Version``: ``$Default`` when absent).
        """
        ident = spec.get("LaunchTemplateId") or spec.get("LaunchTemplateName")
        if not ident:
            return {}
        version = str(spec.get("Version") or "$Default")
        key = (region, str(ident), version)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        args: dict[str, Any] = {"Versions": [version]}
        if spec.get("LaunchTemplateId"):
            args["LaunchTemplateId"] = spec["LaunchTemplateId"]
        else:
            args["LaunchTemplateName"] = spec["LaunchTemplateName"]
        try:
            versions = self._lookup(region).describe_launch_template_versions(**args)
            data = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        except (botocore.exceptions.ClientError, IndexError, KeyError) as exc:
            log.debug("launch template %s not readable: %s", ident, exc)
            data = {}
        # A numbered version never changes; $Latest and $Default move.
        if version not in ("$Latest", "$Default"):
            with self._lock:
                self._cache[key] = data
        return dict(data)


class ApiCallCounter:
    """Counts API calls made through a session's clients, by operation and region.

    Every call counts, including ones a ``FaultInjector`` fails (an attempt botocore
    retries by itself counts once).

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


class _RawBody:
    """The ``raw`` of a made-up ``AWSResponse`` (botocore reads ``stream()``)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


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


def region_of(context: dict[str, Any]) -> str:
    return str(context.get("client_region") or "")


def _template_zone(data: dict[str, Any]) -> Optional[str]:
    zone = (data.get("Placement") or {}).get("AvailabilityZone")
    return str(zone) if zone else None
