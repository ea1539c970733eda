"""The local cloud: moto's EC2 whose instances boot for real on this machine.

``LocalCloud`` (a context manager, for one test module or benchmark) puts together:

* the API (``vmexec.testing.motoserver``): moto's ``ThreadedMotoServer`` on a free port
  of 127.0.0.1. moto's state is process-wide: a cloud resets it when it starts and when
  it closes, so one cloud at a time may be open per process (a second one refuses to
  start); a ``boto3.Session`` with fake credentials whose every request is checked to
  go to that server (a ``before-send`` guard), plus ``AWS_ENDPOINT_URL`` and fake
  credentials in the environment while the cloud is open, so that nothing can reach a
  real endpoint;
* API faults (``vmexec.testing.faults.FaultInjector`` on the session: capacity per type
  / zone / region / spot, quotas, throttling bursts, so they reach every client the
  provider makes from it);
* the machines (``vmexec.testing.machines``): a watcher that gives every instance a
  fake VM (``vmexec.testing.fakevm``) running its user-data for real, powers off and
  reclaims instances, and the faults that live in a machine (dies, freezes, an sshd
  that never answers, a boot script that fails, spot interruption notices);
* the machines' package index (``vmexec.testing.wheelhouse``) and the client's network
  (``vmexec.testing.network``): "what is my IP", the metadata service of a client
  placed inside a VPC, and with ``firewall=True`` each machine's security group
  enforced on its SSH port;
* clients in other processes (``remote_options`` here, ``remote_executor_options``
  there, ``vmexec.testing.remote``): they reach the cloud through its control socket,
  so that killing one (even with SIGKILL) leaves the cloud and the machines alone.

Usage::

    with LocalCloud() as cloud:
        with VMExecutor(4, provider="ec2", instance_type="c7i.large",
                        regions=["us-east-1"], **cloud.executor_options()) as ex:
            print(list(ex.map(abs, range(-3, 3))))
        assert cloud.tagged_resources() == []

boto3 and moto are imported here for the harness, the one place outside
``vmexec.providers.ec2`` that may (tests only; ``vmexec.testing`` imports nothing on its
own). Must not import: paramiko, the scheduler, the executor or any provider's client
code: the harness plays the cloud, it does not drive the client.
"""

from __future__ import annotations

import collections
import getpass
import hashlib
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable, Optional, Union

import boto3
import botocore.config
import botocore.exceptions

from vmexec.providers.ec2.resources import TAG_FLEET
from vmexec.testing.control import ControlServer
from vmexec.testing.fakevm import FakeVM
from vmexec.testing.faults import Fault, FaultInjector, LaunchTemplates
from vmexec.testing.machines import MachineWatcher
from vmexec.testing.motoserver import (
    FAKE_CREDENTIALS,
    POLL_OPERATIONS,
    OffMachineRequestError,
    QuietMotoServer,
    for_endpoint,
    refused,
    reset_moto,
)
from vmexec.testing.network import ClientNetwork
from vmexec.testing.remote import CLIENT_REQUESTS, remote_executor_options
from vmexec.testing.vmhost import FakeVMError, FakeVMHost
from vmexec.testing.wheelhouse import (
    build_wheelhouse,
    real_tool,
    repack_installed,
    requirement_closure,
)

__all__ = ["LocalCloud", "FaultInjector", "ApiFaults", "Fault", "OffMachineRequestError",
           "build_wheelhouse", "requirement_closure", "repack_installed",
           "remote_executor_options", "FAKE_CREDENTIALS"]

log = logging.getLogger(__name__)

#: The fault injector's former name here (one injector serves every test now).
ApiFaults = FaultInjector

#: The tag key that marks everything vmexec creates (kept for importers of this name).
FLEET_TAG = TAG_FLEET

def _read_through(part: str, name: str, doc: str) -> Any:
    """A read-only attribute of ``LocalCloud`` that is ``name`` of one of its parts."""
    return property(lambda cloud: getattr(getattr(cloud, part), name), doc=doc)


# The cloud open in this process (at most one: moto's backends are process-wide).
_OPEN: list["LocalCloud"] = []
_OPEN_LOCK = threading.Lock()


class LocalCloud:
    """A moto-backed EC2 whose instances are fake VMs on this machine.

    Args:
        workdir: where machines, keys, logs and wheels live (default: a new temporary
            directory, removed on ``close()``; a given one is kept for post-mortems).
        regions: regions the watcher polls from the start; regions any client of
            ``session`` calls are added as they are used.
        distro_sshd: machines run an sshd with a throwaway host key from power-on until
            the boot script installs the pinned key (as real images do).
        poll_interval: seconds between looks at moto when nothing asked for one (the
            session's own launch and terminate calls ask at once).
        extra_distributions: more installed distributions to serve to the machines.
        vm_tools: commands put on every machine's PATH from this computer
            (e.g. ``("uv",)``; a stock image has none of them).
        max_concurrent_boots: boot scripts that run at once (default: the CPU count).
            A real cloud boots every machine on its own CPUs; here they share this
            computer's, and twenty venv installs at once would make every machine late
            instead of the first ones early. The others wait "powered off", their
            instances already "running", as on a slow hypervisor.
        machine_env: extra variables in every machine's SSH sessions (e.g. a
            ``UV_CACHE_DIR`` shared by all machines: an image with a warm package cache).
        wheel_architectures: serve these architectures' wheels of the same versions
            too, fetched from the package index at start (``build_wheelhouse``), e.g.
            ``("x86_64", "aarch64")`` so that environment sync resolves a mixed fleet.
        firewall: enforce each machine's security group on its SSH port (a gate per
            machine), so that what the client authorizes and revokes matters.
        client_address: the address the emulated "what is my IP" endpoint answers.
        start: start now (default), else call ``start()``.

    Attributes:
        session: a ``boto3.Session`` with fake credentials, guarded and fault-injecting.
        faults: the session's ``FaultInjector`` (``capacity_error`` & co. are shortcuts).
        endpoint_url: the moto server's URL.
        workdir: the cloud's directory (machines under ``workdir/vms/<instance id>``).
        index_url: the machines' PEP 503 index (``http://127.0.0.1:PORT/simple/``).
        find_links: the machines' flat wheel page (``http://127.0.0.1:PORT/files/``).
        wheels: the wheel files served.
        api_calls: ``Counter`` of ``(region, operation)`` made through ``session``.
        wheel_requests: wheels the machines downloaded from the index.
        offmachine_requests: URLs the guard refused (a test should assert it is empty).
        checkip_url: the emulated "what is my IP" endpoint; ``checkip_requests`` counts
            the requests it answered.
        imds_url: the emulated metadata service (answers after ``place_client``).
        client_address: the client's public address as the cloud sees it.
        firewall_refusals: connections a gate refused (``firewall=True``).

    Raises:
        FakeVMError: sshd/ssh-keygen are missing or the wheel cannot be built.
    """


    def __init__(self, workdir: Union[str, os.PathLike[str], None] = None, *,
                 regions: Iterable[str] = ("us-east-1",), distro_sshd: bool = True,
                 poll_interval: float = 1.0, extra_distributions: Iterable[str] = (),
                 vm_tools: Iterable[str] = (), max_concurrent_boots: Optional[int] = None,
                 machine_env: Optional[dict[str, str]] = None,
                 wheel_architectures: Iterable[str] = (), firewall: bool = False,
                 client_address: str = "203.0.113.7", start: bool = True) -> None:
        self._own_workdir = workdir is None
        # Short paths: the control socket's path must fit in 107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="lc-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._distro_sshd = distro_sshd
        self._extra_distributions = tuple(extra_distributions)
        self._vm_tools = tuple(vm_tools)
        self._machine_env = dict(machine_env or {})
        self._wheel_architectures = tuple(wheel_architectures)
        self._lock = threading.RLock()
        self.firewall = firewall
        region_list = list(regions)
        self._regions: set[str] = set(region_list)
        self._default_region = region_list[0] if region_list else "us-east-1"
        self._server: Optional[QuietMotoServer] = None
        self._control: Optional[ControlServer] = None
        self._saved_env: dict[str, Optional[str]] = {}
        self._internal: dict[str, Any] = {}
        self._templates = LaunchTemplates(self.client)
        self._machines = MachineWatcher(self, self._lock, self._templates,
                                        poll_interval=poll_interval,
                                        max_concurrent_boots=max_concurrent_boots)
        self._network = ClientNetwork(self, self._lock, self._templates,
                                      self._machines.launch_template_of,
                                      client_address=client_address, firewall=firewall)
        self.api_calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.offmachine_requests: list[str] = []
        self.endpoint_url = ""
        self.wheels: list[Path] = []
        self.session: boto3.Session = boto3.Session(region_name=self._default_region,
                                                    **FAKE_CREDENTIALS)
        self.faults: FaultInjector  # made in start(), once the endpoint is known
        self._harness_session = boto3.Session(region_name=self._default_region,
                                              **FAKE_CREDENTIALS)
        self._started = False
        if start:
            self.start()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start moto, the package index, the control socket and the watcher.

        Raises:
            FakeVMError: a part could not start (everything started is stopped again).
        """
        if self._started:
            return
        self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise


    def _start(self) -> None:
        with _OPEN_LOCK:
            if _OPEN:
                # A second cloud would reset the first's account, and both watchers
                # would give every instance a fake VM of their own.
                raise FakeVMError(f"{_OPEN[0]!r} is still open in this process: moto's "
                                  "state is process-wide, close it before opening another")
            _OPEN.append(self)
        server = QuietMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        self._server = server
        host, port = server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._network.start(self.workdir / "wheelhouse")
        self._isolate_environment()
        # Every API call goes through the guard; fault handlers read the live fault list
        # so faults added after a client was made still apply.
        for sess in (self.session, self._harness_session):
            sess.events.register("before-send", self._guard)
        events = self.session.events
        # before-parameter-build runs for every call, before any fault can answer it.
        events.register("before-parameter-build", self._count_call)
        events.register("after-call.ec2", self._after_launch)
        events.register("after-call.ec2.DescribeInstances", self._public_addresses)
        self.faults = FaultInjector(self.session, self.client, self.endpoint_url)
        # moto's backends are process-wide: start from an empty cloud.
        reset_moto(self.endpoint_url)
        self.wheels = build_wheelhouse(self.workdir / "wheelhouse", self._extra_distributions,
                                       self._wheel_architectures)
        control_path = str(self.workdir / "ctl.sock")
        self._control = ControlServer(control_path, self._on_machine_request)
        marker_prefix = f"lc{os.getpid()}-{uuid.uuid4().hex[:8]}"
        host_ = FakeVMHost(self.workdir, control_path, marker_prefix,
                           distro_sshd=self._distro_sshd, extra_path=self._tool_dirs(),
                           machine_env=self._machine_env)
        self._machines.start(host_)
        log.info("local cloud up: moto at %s, index at %s, machines in %s", self.endpoint_url,
                 self.index_url, self.workdir)

    def close(self) -> None:
        """Stop every machine, the watcher, the index, moto; restore the environment.

        Idempotent. Machines still running are killed without terminating their
        instances (moto goes away with them).
        """
        self._machines.close()
        if self._control is not None:
            self._control.close()
            self._control = None
        self._network.close()
        if self._server is not None:
            # moto's state is process-wide: leave none of this cloud's behind.
            try:
                reset_moto(self.endpoint_url)
            except OSError as exc:
                log.warning("could not reset moto at %s: %s", self.endpoint_url, exc)
            self._server.stop()
            self._server = None
        self._restore_environment()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCloud {self.endpoint_url or 'stopped'} {len(self._machines)} machine(s)>"

    # --- what the client is given ------------------------------------------------------

    def executor_options(self, **overrides: Any) -> dict[str, Any]:
        """Options for ``VMExecutor(provider="ec2", ...)`` that point it at this cloud.

        Args:
            **overrides: replace or add options.

        Returns:
            ``endpoint_url``, ``session``, ``address_for``, ``boot_env``, ``index_url``
            (the machines install vmexec and its agent's dependencies from this cloud's
            index), ``ssh_user`` (this computer's user: sshd logs in real accounts
            only), ``address_lookup`` (this cloud's "what is my IP" endpoint: the
            security groups admit ``client_address``) and ``environment=None``: the
            machines install vmexec and the agent's requirements only. Environment sync
            (``environment="auto"``) installs the client's whole environment, which
            the index serves only with ``LocalCloud(extra_distributions=[...])``
            listing it (this test environment is about 530 MB of wheels).
        """
        options: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "session": self.session,
            "address_for": self.address_for,
            "boot_env": self.boot_env(),
            "index_url": self.index_url,
            "ssh_user": getpass.getuser(),
            "address_lookup": self.checkip_url,
            "environment": None,
        }
        options.update(overrides)
        return options

    def remote_options(self, **overrides: Any) -> dict[str, Any]:
        """``executor_options()`` for a client in another process, as plain data.

        A session and ``address_for`` cannot cross a process boundary: that process
        passes this (e.g. as JSON) to ``remote_executor_options()``, which rebuilds them
        around this cloud's control socket. Start the process while the cloud is open:
        it inherits the cloud's ``AWS_*`` environment (moto, fake credentials).

        Args:
            **overrides: replace or add options (JSON-serialisable ones).

        Returns:
            ``{"control": ..., "region": ..., "options": {...}}``.
        """
        options = self.executor_options(**overrides)
        del options["session"], options["address_for"]
        control = self._control.path if self._control is not None else ""
        return {"control": control, "region": self._default_region, "options": options}

    def boot_env(self) -> dict[str, str]:
        """Variables the boot script should export: the harness's sshd restart and
        power-off commands (the harness also sets them when it runs the script)."""
        host = self._machines.host
        return {"VMEXEC_SSHD_RELOAD": f"{host.ctl} sshd-reload",
                "VMEXEC_POWEROFF": f"{host.ctl} poweroff"}

    def address_for(self, record: Any) -> tuple[str, int]:
        """The ``(host, port)`` where instance ``record.id`` (or an id string) answers SSH.

        The address is fixed the first time an instance is asked about or seen, so the
        client may ask before the machine has booted (it then gets "connection refused",
        as from a booting machine).
        """
        instance_id = record if isinstance(record, str) else record.id
        address = self._machines.address(instance_id)
        if not self.firewall or isinstance(record, str):
            return address
        # The client dials through the machine's gate, which applies its security group
        # to the address it dialled (record.address: public or private).
        return self._network.gate(instance_id, address, getattr(record, "address", None))

    # --- the client's network ------------------------------------------------------------

    def place_client(self, region: Optional[str] = None) -> dict[str, Any]:
        """Put the client "inside" EC2: an instance in ``region``'s default VPC with its
        own security group, as the metadata service (``imds_url``) then describes it.

        Sets ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (and clears
        ``AWS_EC2_METADATA_DISABLED``) while the cloud is open, so clients find it.

        Returns:
            ``region``, ``vpc_id``, ``vpc_cidr``, ``security_group``, ``private_ip``,
            ``instance_id`` of the client.
        """
        region = region or self._default_region
        with self._lock:
            self._regions.add(region)
        placement = self._network.place(region)
        self._set_env({"AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_url,
                       "AWS_EC2_METADATA_DISABLED": None})
        return placement

    def move_client(self, address: str) -> int:
        """The client changes networks: the endpoint answers ``address`` from now on,
        and (with ``firewall=True``) every connection through a gate drops.

        Returns:
            How many connections dropped.
        """
        return self._network.move(address)

    def ssh_rules(self, region: Optional[str] = None) -> list[str]:
        """What tcp/22 of the fleets' security groups admits now (CIDRs and group ids),
        in ``region`` (every polled region when None), sorted."""
        return self._network.ssh_rules([region] if region else self.regions)

    # What the client's network knows and counts (``ClientNetwork``), read through.
    client_address = _read_through("_network", "client_address",
                                   "The client's public address as the cloud sees it.")
    client_placement = _read_through("_network", "client_placement",
                                     "Where ``place_client`` put the client (None: outside).")
    index_url = _read_through("_network", "index_url", "The machines' PEP 503 index.")
    find_links = _read_through("_network", "find_links", "The machines' flat wheel page.")
    checkip_url = _read_through("_network", "checkip_url",
                                'The emulated "what is my IP" endpoint.')
    imds_url = _read_through("_network", "imds_url",
                             "The emulated metadata service (after ``place_client``).")
    checkip_requests = _read_through("_network", "checkip_requests",
                                     'Requests the "what is my IP" endpoint answered.')
    wheel_requests = _read_through("_network", "wheel_requests",
                                   "Wheels the machines downloaded from the index.")
    firewall_refusals = _read_through("_network", "firewall_refusals",
                                      "Connections a gate refused (``firewall=True``).")

    # --- looking at machines -----------------------------------------------------------

    @property
    def vms(self) -> dict[str, FakeVM]:
        """The fake VMs started so far, by instance id (stopped ones included)."""
        return self._machines.vms

    def vm(self, instance_id: str, timeout: float = 30.0) -> FakeVM:
        """The fake VM of ``instance_id``, waiting up to ``timeout`` for the watcher.

        Raises:
            LookupError: no such instance appeared in time.
        """
        return self._machines.vm(instance_id, timeout)

    def poweroff_due(self, instance_id: str) -> Optional[float]:
        """Seconds until a power-off the machine scheduled (``shutdown -h +M``), or None."""
        return self._machines.poweroff_due(instance_id)

    poll_interval = _read_through("_machines", "poll_interval",
                                  "Seconds between looks at moto when nothing asked for one.")
    max_concurrent_boots = _read_through("_machines", "max_concurrent_boots",
                                         "Boot scripts that run at once.")

    def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0,
                 what: Union[str, Callable[[], str]] = "") -> None:
        """Poll ``predicate`` until true.

        Args:
            predicate: the condition.
            timeout: seconds.
            what: what is waited for, for the error (a callable is called then).

        Raises:
            TimeoutError: it stayed false for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                described = what() if callable(what) else what
                raise TimeoutError(f"local cloud: timed out after {timeout:g}s waiting for "
                                   f"{described or predicate}")
            # A short, bounded pause between polls; nothing here can be waited on.
            self._machines.closing.wait(0.02)

    def client(self, region: Optional[str] = None, service: str = "ec2") -> Any:
        """A harness client (no faults injected, guarded) for inspecting moto."""
        region = region or self._default_region
        with self._lock:
            key = f"{service}:{region}"
            if key not in self._internal:
                self._internal[key] = self._harness_session.client(
                    service, region_name=region, endpoint_url=self.endpoint_url,
                    config=botocore.config.Config(retries={"max_attempts": 1}))
            return self._internal[key]

    @property
    def regions(self) -> list[str]:
        """Regions polled: those given and those any client of ``session`` called."""
        with self._lock:
            return sorted(self._regions)

    def instances(self, region: Optional[str] = None) -> list[dict[str, Any]]:
        """Every instance moto knows in ``region`` (all polled regions when None)."""
        found = []
        for name in [region] if region else self.regions:
            pages = self.client(name).get_paginator("describe_instances").paginate()
            for page in pages:
                for reservation in page["Reservations"]:
                    for instance in reservation["Instances"]:
                        self._fill_public_address(instance)
                        found.append({**instance, "Region": name})
        return found

    def tagged_resources(self, tag_key: str = TAG_FLEET) -> list[tuple[str, str, str]]:
        """Every resource carrying ``tag_key`` that still exists, in every polled region.

        Instances that are terminated do not count (EC2 lists them for an hour).

        Returns:
            ``(region, kind, id)`` for each, sorted.
        """
        has_tag = [{"Name": "tag-key", "Values": [tag_key]}]
        left: list[tuple[str, str, str]] = []
        for region in self.regions:
            ec2 = self.client(region)
            for inst in self.instances(region):
                if inst["State"]["Name"] != "terminated" and _has_tag(inst, tag_key):
                    left.append((region, "instance", inst["InstanceId"]))
            for sg in ec2.describe_security_groups(Filters=has_tag)["SecurityGroups"]:
                left.append((region, "security-group", sg["GroupId"]))
            for kp in ec2.describe_key_pairs(Filters=has_tag)["KeyPairs"]:
                left.append((region, "key-pair", kp.get("KeyPairId") or kp["KeyName"]))
            for lt in ec2.describe_launch_templates(Filters=has_tag)["LaunchTemplates"]:
                left.append((region, "launch-template", lt["LaunchTemplateId"]))
            for vol in ec2.describe_volumes(Filters=has_tag)["Volumes"]:
                left.append((region, "volume", vol["VolumeId"]))
        s3 = self.client(self._default_region, "s3")
        for bucket in s3.list_buckets().get("Buckets", []):
            try:
                tags = s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"]
            except botocore.exceptions.ClientError:
                continue  # NoSuchTagSet: an untagged bucket is not ours
            if any(t["Key"] == tag_key for t in tags):
                left.append(("global", "s3-bucket", bucket["Name"]))
        return sorted(left)

    # --- faults --------------------------------------------------------------------------

    def capacity_error(self, **match: Any) -> Fault:
        """Launches without capacity: ``FaultInjector.capacity_error`` on ``session``."""
        return self.faults.capacity_error(**match)

    def api_error(self, code: str, **match: Any) -> Fault:
        """Calls that fail with ``code``: ``FaultInjector.api_error`` on ``session``."""
        return self.faults.api_error(code, **match)

    def throttle(self, count: int, **match: Any) -> Fault:
        """A throttling burst: ``FaultInjector.throttle`` on ``session``."""
        return self.faults.throttle(count, **match)

    def clear_faults(self) -> None:
        """Remove every API fault."""
        self.faults.clear()

    def interrupt(self, instance_id: str, terminate_after: Optional[float] = None) -> Path:
        """A spot interruption notice, then (``terminate_after`` seconds later) the
        instance is reclaimed: ``MachineWatcher.interrupt``. Returns the notice file."""
        return self._machines.interrupt(instance_id, terminate_after)

    def kill_vm(self, instance_id: str, silent: bool = False) -> int:
        """The machine dies mid-work (``silent``: freezes with its connections open):
        ``MachineWatcher.kill_vm``. Returns how many processes were killed or frozen."""
        return self._machines.kill_vm(instance_id, silent)

    def blackhole(self, instance_id: Optional[str] = None, *, count: int = 1) -> None:
        """An sshd that accepts and never answers, on that machine or the next ``count``
        to boot: ``MachineWatcher.blackhole``."""
        self._machines.blackhole(instance_id, count=count)

    def fail_boot(self, instance_id: Optional[str] = None, *, count: int = 1) -> None:
        """Boot scripts that fail (the machine's Python is broken), of that instance or
        the next ``count`` to boot: ``MachineWatcher.fail_boot``.

        Raises:
            FakeVMError: the instance's machine has already booted.
        """
        self._machines.fail_boot(instance_id, count=count)

    # --- botocore handlers of the cloud itself ------------------------------------------

    def _guard(self, request: Any, **_: Any) -> None:
        """``before-send``: refuse any request that is not for the moto server."""
        url = str(request.url)
        if self.endpoint_url and for_endpoint(url, self.endpoint_url):
            return
        self.offmachine_requests.append(url)
        raise refused(url, self.endpoint_url)

    def _count_call(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        """``before-call`` (registered before the faults'): count it, note its region."""
        region = str(context.get("client_region") or self._default_region)
        with self._lock:
            self.api_calls[(region, model.name)] += 1
            if model.service_model.service_name == "ec2" and region not in self._regions:
                self._regions.add(region)
                new_region = True
            else:
                new_region = False
        if new_region:
            self._machines.request_poll()

    def _public_addresses(self, parsed: dict[str, Any], **_: Any) -> None:
        """``after-call``: moto gives no public address to an instance launched into a
        subnet (every CreateFleet override names one); EC2's default subnets do. Each
        running instance without one gets a stable one of 198.18.0.0/15 (RFC 2544)."""
        for reservation in parsed.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                self._fill_public_address(inst)

    def _fill_public_address(self, inst: dict[str, Any]) -> None:
        if inst.get("PublicIpAddress") or \
                inst.get("State", {}).get("Name") not in ("pending", "running"):
            return
        digest = hashlib.sha256(inst["InstanceId"].encode()).digest()
        inst["PublicIpAddress"] = str(ipaddress.IPv4Address("198.18.0.0") +
                                      int.from_bytes(digest[:4], "big") % (1 << 17))

    def _after_launch(self, model: Any, **_: Any) -> None:
        """``after-call``: launches and terminations make the watcher look at once."""
        if model.name in POLL_OPERATIONS:
            self._machines.request_poll()


    # --- requests from inside machines and from remote clients --------------------------

    def _on_machine_request(self, marker: str, root: str, command: str,
                            args: list[str]) -> str:
        if command in CLIENT_REQUESTS:
            return self._on_client_request(command, args)
        return self._machines.on_machine_request(marker, root, command, args)

    def _on_client_request(self, command: str, args: list[str]) -> str:
        """What a client in another process asks (``remote_executor_options``): what
        ``address_for``, the guard and the after-call hook do for ``session``'s clients."""
        if len(args) != 1:
            raise FakeVMError(f"{command} takes one argument, not {args!r}")
        if command == "address":
            host, port = self.address_for(args[0])
            return f"{host} {port}"
        if command == "refused":
            with self._lock:
                self.offmachine_requests.append(args[0])
            return "recorded"
        # "launched": a launch or termination in a region, which this cloud may not poll
        # yet: look at moto there now, as after the session's own calls.
        with self._lock:
            self._regions.add(args[0])
        self._machines.request_poll()
        return "polling"


    # --- internals -----------------------------------------------------------------------

    def _isolate_environment(self) -> None:
        """Fake credentials and the moto endpoint for every client made while open."""
        values = {
            "AWS_ACCESS_KEY_ID": FAKE_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": FAKE_CREDENTIALS["aws_secret_access_key"],
            "AWS_SESSION_TOKEN": FAKE_CREDENTIALS["aws_session_token"],
            "AWS_DEFAULT_REGION": self._default_region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": None,
            "VMEXEC_CHECKIP_URL": self.checkip_url,
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "AWS_PROFILE": None,
        }
        self._set_env(values)

    def _set_env(self, values: dict[str, Optional[str]]) -> None:
        """Set (None: unset) variables until ``close()`` restores them."""
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def _restore_environment(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()


    def _tool_dirs(self) -> list[str]:
        if not self._vm_tools:
            return []
        tools = self.workdir / "tools"
        tools.mkdir(exist_ok=True)
        for name in self._vm_tools:
            found = real_tool(name)
            if found is None:
                raise FakeVMError(f"vm_tools: no {name!r} on this computer")
            link = tools / name
            if not link.exists():
                link.symlink_to(found)
        return [str(tools)]



def _has_tag(resource: dict[str, Any], key: str) -> bool:
    return any(t.get("Key") == key for t in resource.get("Tags", []))
