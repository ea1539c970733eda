"""The local cloud: moto's EC2 whose instances boot for real on this machine.

Owns, for one test module or benchmark (``LocalCloud``, a context manager):

* moto's ``ThreadedMotoServer`` on a free port of 127.0.0.1. moto's state is
  process-wide: a cloud resets it when it starts and when it closes, so one cloud at a
  time may be open per process (a second one refuses to start);
* a ``boto3.Session`` with fake credentials whose every request is checked to go to that
  server (a ``before-send`` guard), plus ``AWS_ENDPOINT_URL`` and fake credentials in
  the environment while the cloud is open, so that nothing can reach a real endpoint;
* a package index for the machines, which have no internet: the vmexec wheel built from
  this checkout, and its requirements and the agent's (cloudpickle, psutil) with their
  dependency closure, repacked from the wheels installed in this interpreter (offline,
  the client's exact versions), served by an HTTP server on 127.0.0.1 as a PEP 503
  ``/simple/`` index and a flat ``/files/`` find-links page;
* a watcher thread that polls ``DescribeInstances`` in every region the cloud is used in
  (at once after the session's own launch and terminate calls, else every second) and
  gives every new instance a fake VM (``vmexec.testing.fakevm``) that runs its user-data
  for real — at most ``max_concurrent_boots`` boot scripts at a time, since the machines
  share this computer's CPUs — and stops the VM when the instance is terminated or
  stopped;
* power-off from inside a machine (the agent's watchdog, the boot script's dead-man
  switch): the instance is terminated in moto (or stopped, per its
  ``InstanceInitiatedShutdownBehavior``, read from the launch template version it came
  from where moto ignores the template's) and its fake VM stops;
* clients in other processes (``remote_options`` here, ``remote_executor_options``
  there): they reach the cloud through its control socket, so that killing one (even
  with SIGKILL) leaves the cloud and the machines to themselves;
* the client's network as EC2 would see it, on the index's HTTP server: AWS's "what is
  my IP" endpoint (``checkip_url``, answering ``client_address``; ``$VMEXEC_CHECKIP_URL``
  points every client at it while the cloud is open), the instance metadata service of
  a client placed inside a VPC (``place_client``), and with ``firewall=True`` each
  machine's security group enforced on its SSH port (a gate per machine admits a
  connection only when a tcp/22 rule admits the client as it dials: its public address,
  or, over a private address, its security group or private address), and a client
  that moves to another network (``move_client``: connections through the gates drop);
* faults: API errors (``vmexec.testing.faults.FaultInjector``: capacity per type / zone / region / spot, quotas,
  throttling bursts, as botocore handlers on the session, so they reach every client the
  provider makes from it), spot interruption notices, machines that die, sshds that never
  answer, boot scripts that fail.

Usage::

    with LocalCloud() as cloud:
        with VMExecutor(4, provider="ec2", instance_type="c7i.large",
                        regions=["us-east-1"], **cloud.executor_options()) as ex:
            print(list(ex.map(abs, range(-3, 3))))
        assert cloud.tagged_resources() == []

boto3 and moto are imported here for the harness, the one place outside
``vmexec.providers.ec2`` that may (tests only; ``vmexec.testing`` imports nothing on its
own). Must not import: paramiko, the scheduler, the executor or any provider: the
harness plays the cloud, it does not drive the client.
"""

from __future__ import annotations

import atexit
import base64
import collections
import dataclasses
import datetime
import getpass
import hashlib
import http.server
import importlib.metadata
import importlib.util
import ipaddress
import logging
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import boto3
import botocore.awsrequest
import botocore.config
import botocore.exceptions
from moto.server import ThreadedMotoServer

from vmexec.testing.faults import Fault, FaultInjector, LaunchTemplates
from vmexec.testing.proxy import TCPProxy
from vmexec.testing.fakevm import (
    BOOT_SLOT_SECONDS,
    ControlServer,
    FakeVM,
    FakeVMError,
    FakeVMHost,
    VMSpec,
    control_request,
    stop_machines,
)

__all__ = ["LocalCloud", "FaultInjector", "ApiFaults", "Fault", "OffMachineRequestError",
           "build_wheelhouse", "requirement_closure", "repack_installed",
           "remote_executor_options", "FAKE_CREDENTIALS"]

log = logging.getLogger(__name__)

#: The fault injector's former name here (one injector serves every test now).
ApiFaults = FaultInjector

#: The credentials every local cloud uses (moto accepts any).
FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                    "aws_session_token": "testing"}

#: The distributions the agent needs on a machine besides vmexec itself.
AGENT_REQUIREMENTS = ("cloudpickle", "psutil")

#: The tag key that marks everything vmexec creates.
FLEET_TAG = "vmexec:fleet"

_LAUNCH_OPERATIONS = frozenset({"RunInstances", "CreateFleet", "TerminateInstances",
                                "StopInstances", "StartInstances", "RequestSpotInstances"})
_GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
# The cloud open in this process (at most one: moto's backends are process-wide).
_OPEN: list["LocalCloud"] = []
_OPEN_LOCK = threading.Lock()
# What a call to moto may fail with while it is busy or going away.
_MOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)


class OffMachineRequestError(RuntimeError):
    """A request was about to leave the local cloud (its URL is not the moto server)."""


@dataclasses.dataclass
class _Machine:
    """The harness's record of one instance and its fake VM."""

    vm: FakeVM
    region: str
    poweroff_at: Optional[float] = None
    reclaim_at: Optional[float] = None
    gone: bool = False


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
        self.poll_interval = poll_interval
        self._distro_sshd = distro_sshd
        self._extra_distributions = tuple(extra_distributions)
        self._vm_tools = tuple(vm_tools)
        self._machine_env = dict(machine_env or {})
        self._wheel_architectures = tuple(wheel_architectures)
        self._lock = threading.RLock()
        self.firewall = firewall
        self.client_address = str(ipaddress.ip_address(client_address))
        self.checkip_url = ""
        self.imds_url = ""
        self.checkip_requests = 0
        self.firewall_refusals = 0
        self.client_placement: Optional[dict[str, Any]] = None
        self._gates: dict[str, _Gate] = {}
        self._dialled: dict[str, str] = {}  # instance id -> "public" | "private"
        region_list = list(regions)
        self._regions: set[str] = set(region_list)
        self._default_region = region_list[0] if region_list else "us-east-1"
        self._machines: dict[str, _Machine] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._next_address = 0
        self._net = random.randrange(32, 250)  # 127.<net>.x.y: unlikely to meet another cloud
        self.max_concurrent_boots = max(1, max_concurrent_boots or os.cpu_count() or 1)
        self._boot_queue: collections.deque[FakeVM] = collections.deque()
        self._boot_waiters: list[threading.Thread] = []
        self._poll_requested = True
        self._pending_blackholes = 0
        self._pending_broken = 0
        self._broken_ids: set[str] = set()
        self._wake = threading.Event()
        self._adopted = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._server: Optional[ThreadedMotoServer] = None
        self._http: Optional[http.server.ThreadingHTTPServer] = None
        self._http_thread: Optional[threading.Thread] = None
        self._control: Optional[ControlServer] = None
        self._host: Optional[FakeVMHost] = None
        self._saved_env: dict[str, Optional[str]] = {}
        self._internal: dict[str, Any] = {}
        self._templates = LaunchTemplates(self.client)
        # Instance id -> the launch template version CreateFleet launched it from.
        self._fleet_launches: dict[str, dict[str, str]] = {}
        self.api_calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.offmachine_requests: list[str] = []
        self.wheel_requests = 0
        self.endpoint_url = ""
        self.index_url = ""
        self.find_links = ""
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
        server = _QuietMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        self._server = server
        host, port = server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._start_index(self.workdir / "wheelhouse")
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
        _reset_moto(self.endpoint_url)
        self.wheels = build_wheelhouse(self.workdir / "wheelhouse", self._extra_distributions,
                                       self._wheel_architectures)
        control_path = str(self.workdir / "ctl.sock")
        self._control = ControlServer(control_path, self._on_machine_request)
        marker_prefix = f"lc{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._host = FakeVMHost(self.workdir, control_path, marker_prefix,
                                distro_sshd=self._distro_sshd, extra_path=self._tool_dirs(),
                                machine_env=self._machine_env)
        self._watcher = threading.Thread(target=self._watch, name="localcloud-watcher",
                                         daemon=True)
        self._watcher.start()
        log.info("local cloud up: moto at %s, index at %s, machines in %s", self.endpoint_url,
                 self.index_url, self.workdir)

    def close(self) -> None:
        """Stop every machine, the watcher, the index, moto; restore the environment.

        Idempotent. Machines still running are killed without terminating their
        instances (moto goes away with them).
        """
        self._closing.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join(30)
            if self._watcher.is_alive():
                log.error("local cloud watcher did not stop within 30 s")
            self._watcher = None
        with self._lock:
            machines = list(self._machines.values())
        if machines:
            self._stop_machines([m.vm for m in machines])
        with self._lock:
            waiters, self._boot_waiters = self._boot_waiters, []
        for waiter in waiters:
            waiter.join(10)  # their boot scripts were killed with the machines
        with self._lock:
            gates, self._gates = list(self._gates.values()), {}
        for gate in gates:
            gate.close()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(10)
            self._http = None
        if self._server is not None:
            # moto's state is process-wide: leave none of this cloud's behind.
            try:
                _reset_moto(self.endpoint_url)
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
        host = self._require_host()
        return {"VMEXEC_SSHD_RELOAD": f"{host.ctl} sshd-reload",
                "VMEXEC_POWEROFF": f"{host.ctl} poweroff"}

    def address_for(self, record: Any) -> tuple[str, int]:
        """The ``(host, port)`` where instance ``record.id`` (or an id string) answers SSH.

        The address is fixed the first time an instance is asked about or seen, so the
        client may ask before the machine has booted (it then gets "connection refused",
        as from a booting machine).
        """
        instance_id = record if isinstance(record, str) else record.id
        with self._lock:
            if instance_id not in self._addresses:
                self._addresses[instance_id] = self._allocate_address()
            address = self._addresses[instance_id]
        if not self.firewall or isinstance(record, str):
            return address
        # The client dials through the machine's gate, which applies its security group
        # to the address it dialled (record.address: public or private).
        self._dialled[instance_id] = self._route_of(instance_id,
                                                    getattr(record, "address", None))
        with self._lock:
            gate = self._gates.get(instance_id)
            if gate is None:
                gate = _Gate(address[0], address[1], admit=lambda: self._admits(instance_id))
                self._gates[instance_id] = gate
            return gate.host, gate.port

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
        ec2 = self.client(region)
        vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
        group = ec2.create_security_group(GroupName=f"notebook-{uuid.uuid4().hex[:6]}",
                                          Description="the client's own instance",
                                          VpcId=vpc["VpcId"])["GroupId"]
        network = ipaddress.ip_network(vpc["CidrBlock"])
        placement = {"region": region, "vpc_id": vpc["VpcId"], "vpc_cidr": str(network),
                     "security_group": group, "private_ip": str(network[4242 % network.num_addresses]),
                     "instance_id": f"i-{uuid.uuid4().hex[:17]}",
                     "mac": "0e:00:00:00:42:01"}
        with self._lock:
            self.client_placement = placement
        self._set_env({"AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_url,
                       "AWS_EC2_METADATA_DISABLED": None})
        log.info("client placed in %s %s (%s, group %s)", region, vpc["VpcId"],
                 placement["private_ip"], group)
        return dict(placement)

    def move_client(self, address: str) -> int:
        """The client changes networks: the endpoint answers ``address`` from now on,
        and (with ``firewall=True``) every connection through a gate drops.

        Returns:
            How many connections dropped.
        """
        with self._lock:
            self.client_address = str(ipaddress.ip_address(address))
            gates = list(self._gates.values())
        dropped = sum(gate.cut() for gate in gates)
        log.info("client moved to %s: %d connection(s) dropped", address, dropped)
        return dropped

    def ssh_rules(self, region: Optional[str] = None) -> list[str]:
        """What tcp/22 of the fleets' security groups admits now (CIDRs and group ids),
        in ``region`` (every polled region when None), sorted."""
        found: set[str] = set()
        has_tag = [{"Name": "tag-key", "Values": [FLEET_TAG]}]
        for name in [region] if region else self.regions:
            groups = self.client(name).describe_security_groups(Filters=has_tag)
            for group in groups["SecurityGroups"]:
                found.update(_port22_sources(group))
        return sorted(found)

    def _route_of(self, instance_id: str, address: Optional[str]) -> str:
        if address is None:
            return "public"
        for inst in self.instances():
            if inst["InstanceId"] == instance_id:
                return "private" if address == inst.get("PrivateIpAddress") else "public"
        return "public"

    def _admits(self, instance_id: str) -> bool:
        """Whether the instance's security groups let the client in on tcp/22 now."""
        inst = next((i for i in self.instances() if i["InstanceId"] == instance_id), None)
        if inst is None:
            return False
        region = inst["Region"]
        group_ids = [g["GroupId"] for g in inst.get("SecurityGroups", [])]
        if not group_ids:  # moto leaves a launch template's groups off the instance
            template = self._launch_template_of(region, inst)
            data = self._templates.data(region, template) if template else {}
            group_ids = list(data.get("SecurityGroupIds") or [])
        if not group_ids:
            return False
        groups = self.client(region).describe_security_groups(GroupIds=group_ids)
        sources: set[str] = set()
        for group in groups["SecurityGroups"]:
            sources.update(_port22_sources(group))
        with self._lock:
            placement = self.client_placement
            public = self.client_address
        if self._dialled.get(instance_id) == "private":
            if placement is None or placement["vpc_id"] != inst.get("VpcId") \
                    or placement["region"] != region:
                admitted = False  # a private address is not routable from elsewhere
            else:
                admitted = placement["security_group"] in sources or \
                    _in_any(placement["private_ip"], sources)
        else:
            admitted = _in_any(public, sources)
        if not admitted:
            with self._lock:
                self.firewall_refusals += 1
            log.info("firewall: %s refuses the client (%s; tcp/22 admits %s)", instance_id,
                     self._dialled.get(instance_id, "public"), sorted(sources) or "nobody")
        return admitted

    # --- looking at machines -----------------------------------------------------------

    @property
    def vms(self) -> dict[str, FakeVM]:
        """The fake VMs started so far, by instance id (stopped ones included)."""
        with self._lock:
            return {i: m.vm for i, m in self._machines.items()}

    def vm(self, instance_id: str, timeout: float = 30.0) -> FakeVM:
        """The fake VM of ``instance_id``, waiting up to ``timeout`` for the watcher.

        Raises:
            LookupError: no such instance appeared in time.
        """
        self._request_poll()
        deadline = time.monotonic() + timeout
        with self._adopted:
            while instance_id not in self._machines:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LookupError(f"no fake VM for instance {instance_id} after "
                                      f"{timeout:g}s (regions polled: {sorted(self._regions)})")
                self._adopted.wait(left)
            return self._machines[instance_id].vm

    def poweroff_due(self, instance_id: str) -> Optional[float]:
        """Seconds until a power-off the machine scheduled (``shutdown -h +M``), or None."""
        with self._lock:
            machine = self._machines.get(instance_id)
            if machine is None or machine.poweroff_at is None:
                return None
            return max(0.0, machine.poweroff_at - time.monotonic())

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
            self._closing.wait(0.02)

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

    def tagged_resources(self, tag_key: str = FLEET_TAG) -> list[tuple[str, str, str]]:
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
        """Give a spot instance its two-minute interruption notice.

        Writes ``$VMEXEC_ROOT/var/lib/vmexec/spot-interruption`` in the machine (the JSON
        EC2's metadata service serves at ``spot/instance-action``).

        Args:
            instance_id: the instance.
            terminate_after: seconds after which the instance is reclaimed (terminated
                in moto, its VM stopped); None leaves it running.

        Returns:
            The notice file.
        """
        vm = self.vm(instance_id)
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=terminate_after if terminate_after is not None else 120)
        path = vm.interrupt({"action": "terminate",
                             "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        if terminate_after is not None:
            with self._lock:
                self._machines[instance_id].reclaim_at = time.monotonic() + terminate_after
            self._request_poll()
        log.info("spot interruption notice for %s", instance_id)
        return path

    def kill_vm(self, instance_id: str, silent: bool = False) -> int:
        """The machine dies mid-work: all its processes and its sshd are killed at once.

        The instance stays "running" in moto, as EC2 shows a dead machine until someone
        terminates it.

        Args:
            instance_id: the instance.
            silent: freeze everything instead (SIGSTOP): connections stay open and go
                quiet, so only heartbeats can tell.

        Returns:
            How many processes were killed or frozen.
        """
        return self.vm(instance_id).kill(silent=silent)

    def blackhole(self, instance_id: Optional[str] = None, *, count: int = 1) -> None:
        """An sshd that never answers: connections are accepted, no banner ever comes.

        Args:
            instance_id: that machine, now (sessions already open stay up).
            count: without an id, the next ``count`` machines to boot.
        """
        if instance_id is not None:
            self.vm(instance_id).blackhole()
            return
        with self._lock:
            self._pending_blackholes += count

    def fail_boot(self, instance_id: Optional[str] = None, *, count: int = 1) -> None:
        """Boot scripts that fail: the machine's Python is broken, so the script's own
        error path runs (it should write ``failed`` and log why).

        Args:
            instance_id: that instance, which must not have booted yet.
            count: without an id, the next ``count`` machines to boot.

        Raises:
            FakeVMError: the instance's machine has already booted.
        """
        with self._lock:
            if instance_id is None:
                self._pending_broken += count
                return
            if instance_id in self._machines:
                raise FakeVMError(f"{instance_id} has booted already; call fail_boot(count=N)"
                                  " before launching instead")
            self._broken_ids.add(instance_id)

    # --- botocore handlers of the cloud itself ------------------------------------------

    def _guard(self, request: Any, **_: Any) -> None:
        """``before-send``: refuse any request that is not for the moto server."""
        url = str(request.url)
        if self.endpoint_url and _for_endpoint(url, self.endpoint_url):
            return
        self.offmachine_requests.append(url)
        raise _refused(url, self.endpoint_url)

    def _count_call(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        """``before-call`` (registered before the faults'): count it, note its region."""
        region = str(context.get("client_region") or self._default_region)
        with self._lock:
            self.api_calls[(region, model.name)] += 1
            if model.service_model.service_name == "ec2" and region not in self._regions:
                self._regions.add(region)
                self._poll_requested = True
                self._wake.set()

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
        if model.name in _LAUNCH_OPERATIONS:
            self._request_poll()

    # --- the watcher ---------------------------------------------------------------------

    def _watch(self) -> None:
        next_poll = 0.0
        while not self._closing.is_set():
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            if self._closing.is_set():
                return
            with self._lock:
                requested, self._poll_requested = self._poll_requested, False
            polling = requested or time.monotonic() >= next_poll
            if polling:
                next_poll = time.monotonic() + self.poll_interval
            try:
                # A finished boot script frees a boot slot: that needs no look at moto.
                self._start_boots()
                due = self._poll_once() if polling else None
            except _MOTO_ERRORS as exc:
                # moto busy or restarting: try again on the next poll.
                log.warning("local cloud watcher: polling moto failed: %s", exc)
                continue
            except Exception:  # noqa: BLE001 - logged with its traceback, not swallowed
                # Anything else would end this thread without a word, and with it every
                # later boot and power-off of the cloud's machines.
                log.exception("local cloud watcher: a poll failed (watching on)")
                continue
            if due is not None:
                # Come back when the next scheduled power-off is due, not a poll later.
                next_poll = min(next_poll, due)

    def _request_poll(self) -> None:
        """Make the watcher look at moto now (after a launch, a terminate, a power-off)."""
        with self._lock:
            self._poll_requested = True
        self._wake.set()

    def _poll_once(self) -> Optional[float]:
        """One look at moto: adopt new instances, stop gone ones, run due power-offs.

        Returns:
            When the next scheduled power-off or reclaim is due (monotonic), or None.
        """
        seen: dict[str, tuple[str, dict[str, Any]]] = {}
        for region in self.regions:
            for inst in self.instances(region):
                seen[inst["InstanceId"]] = (region, inst)
        to_stop: list[_Machine] = []
        with self._lock:
            known = dict(self._machines)
        try:
            for instance_id, (region, inst) in seen.items():
                state = inst["State"]["Name"]
                machine = known.get(instance_id)
                if machine is None:
                    if state in ("pending", "running"):
                        self._try(instance_id, self._adopt, region, inst)
                    continue
                if state in _GONE_STATES and not machine.gone:
                    machine.gone = True
                    to_stop.append(machine)
            now = time.monotonic()
            for instance_id, machine in known.items():
                if machine.gone:
                    continue
                machine.vm.poll()
                if instance_id not in seen:  # moto was reset under us
                    machine.gone = True
                elif machine.poweroff_at is not None and now >= machine.poweroff_at:
                    self._try(instance_id, self._power_off, machine)
                elif machine.reclaim_at is not None and now >= machine.reclaim_at:
                    self._try(instance_id, self._reclaim, machine)
                if machine.gone:
                    to_stop.append(machine)
        finally:
            # Nothing looks at a machine marked gone again: stop it whatever failed after.
            if to_stop:
                self._stop_machines([m.vm for m in to_stop])
        deadlines = [t for m in known.values() if not m.gone
                     for t in (m.poweroff_at, m.reclaim_at) if t is not None]
        return min(deadlines) if deadlines else None

    def _try(self, instance_id: str, step: Callable[..., None], *args: Any) -> None:
        """Run one instance's step of a poll; an API error is logged, not raised: it must
        not hold up the other instances' steps (their power-offs among them). The step
        runs again on the next poll."""
        try:
            step(*args)
        except _MOTO_ERRORS as exc:
            log.warning("local cloud watcher: %s of %s failed, trying again on the next "
                        "poll: %s", step.__name__.strip("_"), instance_id, exc)

    def _adopt(self, region: str, inst: dict[str, Any]) -> None:
        instance_id = inst["InstanceId"]
        ec2 = self.client(region)
        user_data = ec2.describe_instance_attribute(InstanceId=instance_id,
                                                    Attribute="userData")
        raw = user_data.get("UserData", {}).get("Value")
        host, port = self.address_for(instance_id)
        spec = VMSpec(
            instance_id=instance_id,
            user_data=base64.b64decode(raw) if raw else b"",
            host=host, port=port, region=region,
            zone=inst.get("Placement", {}).get("AvailabilityZone", ""),
            instance_type=inst.get("InstanceType", ""),
            shutdown_behavior=self._shutdown_behavior(region, inst))
        with self._lock:
            broken = instance_id in self._broken_ids or self._pending_broken > 0
            if instance_id not in self._broken_ids and self._pending_broken > 0:
                self._pending_broken -= 1
            self._broken_ids.discard(instance_id)
            blackholed = self._pending_blackholes > 0
            if blackholed:
                self._pending_blackholes -= 1
            vm = FakeVM(self._require_host(), spec, broken=broken, blackholed=blackholed)
            self._machines[instance_id] = _Machine(vm=vm, region=region)
            self._adopted.notify_all()
        log.info("instance %s (%s, %s) boots as a fake VM at %s:%d%s%s", instance_id,
                 spec.instance_type, spec.zone, host, port,
                 " [boot will fail]" if broken else "", " [blackholed]" if blackholed else "")
        with self._lock:
            self._boot_queue.append(vm)
        self._start_boots()

    def _shutdown_behavior(self, region: str, inst: dict[str, Any]) -> str:
        """What a power-off from inside does to ``inst``: ``"terminate"`` or ``"stop"``.

        moto keeps ``InstanceInitiatedShutdownBehavior`` only when the launch call names
        it: it ignores the launch template's (RunInstances from a template, and every
        instance of a CreateFleet, which launches from templates only) and reports its
        default, "stop". EC2 applies the template's value unless the launch call
        overrides it, so a "stop" from moto defers to the template version the instance
        was launched with. (A RunInstances that sets "stop" over a template's
        "terminate" is then read as "terminate": moto cannot tell the two apart.)
        """
        instance_id = inst["InstanceId"]
        answer = self.client(region).describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")
        reported = answer.get("InstanceInitiatedShutdownBehavior", {}).get("Value")
        if reported == "terminate":
            return reported
        template = self._launch_template_of(region, inst)
        data = self._templates.data(region, template) if template else {}
        return str(data.get("InstanceInitiatedShutdownBehavior") or reported or "stop")

    def _launch_template_of(self, region: str, inst: dict[str, Any]
                            ) -> Optional[dict[str, str]]:
        """The launch template version ``inst`` was launched from, or None.

        EC2 (and moto, for RunInstances) tags such an instance with
        ``aws:ec2launchtemplate:id`` and ``:version``; moto leaves CreateFleet's
        instances untagged, but DescribeFleets lists each fleet's instances with the
        template version they came from (read once per batch of new instances).
        """
        tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags", [])}
        if tags.get("aws:ec2launchtemplate:id"):
            return {"LaunchTemplateId": str(tags["aws:ec2launchtemplate:id"]),
                    "Version": str(tags.get("aws:ec2launchtemplate:version") or "$Default")}
        instance_id = inst["InstanceId"]
        with self._lock:
            known = self._fleet_launches.get(instance_id)
        if known is not None:
            return known
        found: dict[str, dict[str, str]] = {}
        pages = self.client(region).get_paginator("describe_fleets").paginate()
        for page in pages:
            for fleet in page.get("Fleets", []):
                for group in fleet.get("Instances", []):
                    spec = group.get("LaunchTemplateAndOverrides", {}).get(
                        "LaunchTemplateSpecification", {})
                    for launched in group.get("InstanceIds", []):
                        found[launched] = {k: str(v) for k, v in spec.items()}
        with self._lock:
            self._fleet_launches.update(found)
        return found.get(instance_id)

    def _start_boots(self) -> bool:
        """Power on queued machines while fewer than ``max_concurrent_boots`` boot.

        Returns:
            Whether machines are still waiting for their turn.
        """
        with self._lock:
            booting = sum(1 for m in self._machines.values() if m.vm.boot_running)
            chosen: list[FakeVM] = []
            while self._boot_queue and booting + len(chosen) < self.max_concurrent_boots:
                vm = self._boot_queue.popleft()
                if vm.state == "created":  # not terminated while it waited
                    chosen.append(vm)
            waiting = bool(self._boot_queue)
        for vm in chosen:
            try:
                vm.boot()
            except (OSError, FakeVMError) as exc:
                log.error("fake VM %s could not power on: %s", vm.id, exc)
                continue
            # One waiter per running boot script (at most max_concurrent_boots): its end
            # frees a boot slot at once, without polling.
            waiter = threading.Thread(target=self._wait_boot, args=(vm,),
                                      name=f"localcloud-boot-{vm.id}", daemon=True)
            with self._lock:
                self._boot_waiters = [t for t in self._boot_waiters if t.is_alive()]
                self._boot_waiters.append(waiter)
            waiter.start()
        return waiting

    def _wait_boot(self, vm: FakeVM) -> None:
        # Ends when the script ends (or the machine is stopped), or when it has held its
        # boot slot for long enough.
        vm.wait_boot(BOOT_SLOT_SECONDS)
        self._wake.set()

    def _power_off(self, machine: _Machine) -> None:
        """A machine turned itself off: EC2 terminates (or stops) its instance."""
        ec2 = self.client(machine.region)
        instance_id = machine.vm.id
        log.info("instance %s powered itself off (%s)", instance_id,
                 machine.vm.spec.shutdown_behavior)
        if machine.vm.spec.shutdown_behavior == "terminate":
            ec2.terminate_instances(InstanceIds=[instance_id])
        else:
            ec2.stop_instances(InstanceIds=[instance_id])
        machine.gone = True

    def _reclaim(self, machine: _Machine) -> None:
        """EC2 takes a spot instance back at the end of its interruption notice."""
        log.info("reclaiming spot instance %s", machine.vm.id)
        self.client(machine.region).terminate_instances(InstanceIds=[machine.vm.id])
        machine.gone = True

    def _stop_machines(self, vms: list[FakeVM]) -> None:
        stop_machines(vms)

    # --- requests from inside machines --------------------------------------------------

    def _on_machine_request(self, marker: str, root: str, command: str,
                            args: list[str]) -> str:
        if command in _CLIENT_REQUESTS:
            return self._on_client_request(command, args)
        with self._lock:
            machine = next((m for m in self._machines.values()
                            if m.vm.marker == marker or (root and str(m.vm.root) == root)),
                           None)
        if machine is None:
            raise FakeVMError(f"no machine {marker or root!r} in this cloud")
        if command == "sshd-reload":
            return machine.vm.reload_sshd()
        if command == "poweroff":
            delay = float(args[0]) if args else 0.0
            with self._lock:
                machine.poweroff_at = time.monotonic() + delay
            self._request_poll()
            return f"powering off in {delay:g}s" if delay else "powering off"
        if command == "cancel-poweroff":
            with self._lock:
                machine.poweroff_at = None
            return "power-off cancelled"
        if command == "reboot":
            raise FakeVMError("a fake VM cannot reboot")
        raise FakeVMError(f"unknown request {command!r}")

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
        self._request_poll()
        return "polling"

    # --- internals -----------------------------------------------------------------------

    def _require_host(self) -> FakeVMHost:
        if self._host is None:
            raise FakeVMError("the local cloud is not started: use it as a context manager")
        return self._host

    def _allocate_address(self) -> tuple[str, int]:
        """A fresh loopback address whose port 22 is free (else a free port on it)."""
        for _ in range(256):
            index = self._next_address
            self._next_address += 1
            host = str(ipaddress.IPv4Address(f"127.{self._net}.0.0") + 256 * (index // 250)
                       + index % 250 + 1)
            if _bindable(host, 22):
                return host, 22
        # Port 22 is not ours to use (not root, or another server owns it everywhere).
        with socket.socket() as s:
            s.bind((host, 0))
            return host, int(s.getsockname()[1])

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

    def _start_index(self, root: Path) -> None:
        cloud = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/checkip":
                    with cloud._lock:
                        cloud.checkip_requests += 1
                        answer = cloud.client_address
                    self._answer(200, answer + "\n")
                    return
                if self.path.startswith("/latest/"):
                    self._metadata()
                    return
                if self.path.endswith(".whl"):
                    with cloud._lock:
                        cloud.wheel_requests += 1
                super().do_GET()

            def do_PUT(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/latest/api/token" and cloud.client_placement is not None:
                    self._answer(200, "local-cloud-imds-token")
                else:
                    self._answer(404, "not found")

            def _metadata(self) -> None:
                placement = cloud.client_placement
                if placement is None or \
                        self.headers.get("X-aws-ec2-metadata-token") != "local-cloud-imds-token":
                    self._answer(401 if placement is not None else 404, "")
                    return
                interface = f"/latest/meta-data/network/interfaces/macs/{placement['mac']}/"
                answers = {
                    "/latest/meta-data/instance-id": placement["instance_id"],
                    "/latest/meta-data/placement/region": placement["region"],
                    "/latest/meta-data/mac": placement["mac"],
                    "/latest/meta-data/local-ipv4": placement["private_ip"],
                    interface + "vpc-id": placement["vpc_id"],
                    interface + "vpc-ipv4-cidr-blocks": placement["vpc_cidr"],
                    interface + "security-group-ids": placement["security_group"],
                }
                if self.path in answers:
                    self._answer(200, answers[self.path])
                else:
                    self._answer(404, "")

            def _answer(self, status: int, text: str) -> None:
                body = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("index: " + format, *args)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A machine stopped mid-download (its fleet was torn down): not an error.
                log.debug("index: a download to %s ended early", client_address,
                          exc_info=True)

        server = Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._http = server
        self._http_thread = threading.Thread(target=server.serve_forever,
                                             name="localcloud-index", daemon=True)
        self._http_thread.start()
        port = server.server_address[1]
        self.index_url = f"http://127.0.0.1:{port}/simple/"
        self.find_links = f"http://127.0.0.1:{port}/files/"
        self.checkip_url = f"http://127.0.0.1:{port}/checkip"
        self.imds_url = f"http://127.0.0.1:{port}"

    def _tool_dirs(self) -> list[str]:
        if not self._vm_tools:
            return []
        tools = self.workdir / "tools"
        tools.mkdir(exist_ok=True)
        for name in self._vm_tools:
            found = _real_tool(name)
            if found is None:
                raise FakeVMError(f"vm_tools: no {name!r} on this computer")
            link = tools / name
            if not link.exists():
                link.symlink_to(found)
        return [str(tools)]


class _Gate(TCPProxy):
    """A machine's SSH port as the client reaches it: each new connection is admitted
    only when ``admit()`` says its security group lets the client in (else reset)."""

    def __init__(self, host: str, port: int, admit: Callable[[], bool]) -> None:
        self._admit = admit
        super().__init__(host, port)

    def _start_pair(self, client: socket.socket) -> None:
        try:
            admitted = self._admit()
        except _MOTO_ERRORS as exc:
            log.warning("firewall: could not read the security group: %s", exc)
            admitted = False
        if not admitted:
            # Zero linger: the client gets a reset, as from a port nobody may reach.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        super()._start_pair(client)


def _port22_sources(group: dict[str, Any]) -> set[str]:
    """CIDRs and group ids that ``group`` admits on tcp/22."""
    found: set[str] = set()
    for rule in group.get("IpPermissions", []):
        if rule.get("IpProtocol") not in ("tcp", "-1") or \
                not rule.get("FromPort", 0) <= 22 <= rule.get("ToPort", 65535):
            continue
        found.update(r["CidrIp"] for r in rule.get("IpRanges", []))
        found.update(r["CidrIpv6"] for r in rule.get("Ipv6Ranges", []))
        found.update(p["GroupId"] for p in rule.get("UserIdGroupPairs", []))
    return found


def _in_any(address: str, sources: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    for source in sources:
        try:
            if ip in ipaddress.ip_network(source, strict=False):
                return True
        except ValueError:
            continue  # a group id
    return False


class _QuietMotoServer(ThreadedMotoServer):
    """moto's threaded server without a log line per request (they drown test logs)."""

    def _server_entry(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                return

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self._ip_address, self._port, app, True,
                                   request_handler=Quiet)
        self._server_ready_event.set()
        self._server.serve_forever()


# --- a client in another process ------------------------------------------------------

# What such a client asks the cloud over its control socket (LocalCloud._on_client_request).
_CLIENT_REQUESTS = frozenset({"address", "refused", "launched"})


def remote_executor_options(remote: dict[str, Any]) -> dict[str, Any]:
    """In a client process: the executor options ``LocalCloud.remote_options()`` gave.

    The session has the cloud's fake credentials; its guard refuses any request not for
    the moto server and reports it to the cloud (``offmachine_requests``), and its
    launch and terminate calls make the cloud look at moto at once, in their region.
    ``address_for`` asks the cloud, which fixes addresses as for a client in its own
    process. Killing this process (even with SIGKILL) leaves the cloud untouched.

    Args:
        remote: what ``remote_options()`` returned.

    Returns:
        Options for ``VMExecutor(provider="ec2", ...)``.
    """
    control = str(remote["control"])
    options = dict(remote["options"])
    endpoint_url = str(options["endpoint_url"])
    session = boto3.Session(region_name=remote["region"], **FAKE_CREDENTIALS)

    def guard(request: Any, **_: Any) -> None:
        url = str(request.url)
        if not _for_endpoint(url, endpoint_url):
            # Reported before refusing: the cloud's list must show it even when this
            # process dies before anyone reads its error.
            control_request(control, "refused", url)
            raise _refused(url, endpoint_url)

    def launched(model: Any, context: dict[str, Any], **_: Any) -> None:
        if model.name in _LAUNCH_OPERATIONS:
            control_request(control, "launched", _region_of(context))

    def address_for(record: Any) -> tuple[str, int]:
        instance_id = record if isinstance(record, str) else record.id
        host, port = control_request(control, "address", instance_id).split()
        return host, int(port)

    session.events.register("before-send", guard)
    session.events.register("after-call.ec2", launched)
    options.update(session=session, address_for=address_for)
    return options


# --- the machines' package index -------------------------------------------------------

# Built vmexec wheels by source digest: every cloud of one test run shares one build.
_BUILT: dict[str, Path] = {}
_BUILD_LOCK = threading.Lock()


def build_wheelhouse(dest: Path, extra: Iterable[str] = (),
                     architectures: Iterable[str] = ()) -> list[Path]:
    """Fill ``dest`` with the wheels a machine needs and a PEP 503 index of them.

    vmexec is built from this checkout (``uv build``, else ``pip wheel``; about a second,
    once per process and source state). Its runtime requirements, the agent's
    (cloudpickle, psutil) and ``extra`` are served with their whole dependency closure,
    repacked from the distributions installed in this interpreter: offline, the client's
    exact versions, once per process (about 2 s, mostly cryptography's 14 MB; a boot
    script that installs vmexec with ``--no-deps`` needs only the agent's two).

    Layout: ``dest/files/*.whl`` (a flat find-links page) and ``dest/simple/<name>/``.

    Args:
        dest: the directory (created).
        extra: more installed distributions to serve.
        architectures: serve these architectures' wheels too (``"aarch64"``,
            ``"x86_64"``): for each served wheel built for a platform, the same version's
            wheel for each other architecture is downloaded from the package index
            (``pip download``, cached per user), so that preflight resolves a mixed
            fleet against this index.

    Returns:
        The wheel files.

    Raises:
        FakeVMError: vmexec cannot be built, or a distribution is not installed.
    """
    files = dest / "files"
    files.mkdir(parents=True, exist_ok=True)
    vmexec_wheel = _build_vmexec(files)
    with zipfile.ZipFile(vmexec_wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip()
                    for line in zf.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    wheels = [vmexec_wheel]
    for name in requirement_closure([*requires, *AGENT_REQUIREMENTS, *extra]):
        cached = _repacked(name)
        target = files / cached.name
        shutil.copyfile(cached, target)
        wheels.append(target)
    for arch in dict.fromkeys(architectures):
        for cached in other_architecture_wheels(wheels, arch):
            target = files / cached.name
            if not target.exists():
                shutil.copyfile(cached, target)
                wheels.append(target)
    simple = dest / "simple"
    simple.mkdir(exist_ok=True)
    projects = collections.defaultdict(list)
    for wheel in wheels:
        projects[_normalize(wheel.name.split("-")[0])].append(wheel)
    links = []
    for project, project_wheels in sorted(projects.items()):
        (simple / project).mkdir(exist_ok=True)
        anchors = "".join(
            f'<a href="../../files/{w.name}#sha256={_sha256(w)}">{w.name}</a><br>\n'
            for w in project_wheels)
        (simple / project / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{anchors}</body></html>\n")
        links.append(f'<a href="{project}/">{project}</a><br>\n')
    (simple / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n" + "".join(links) + "</body></html>\n")
    return wheels


def other_architecture_wheels(wheels: Iterable[Path], arch: str) -> list[Path]:
    """The ``arch`` wheels of the same versions as ``wheels``' platform wheels.

    Downloaded from the package index this computer's pip uses (``pip download
    --no-deps --only-binary :all:`` for this Python, manylinux 2.17 to 2.39), or, in an
    environment without pip (a uv venv), from PyPI's JSON API (``$VMEXEC_PYPI_URL``
    to use a mirror), once per user: they are cached in
    ``~/.cache/vmexec-localcloud/foreign/<arch>``.

    Raises:
        FakeVMError: a wheel could not be downloaded (the message names it).
    """
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)
    wanted: list[str] = []
    for wheel in wheels:
        parts = wheel.name[:-len(".whl")].split("-")
        name, version, platform_tag = parts[0], parts[1], parts[-1]
        if platform_tag == "any" or all(p.endswith(arch) for p in platform_tag.split(".")):
            continue
        wanted.append(f"{name}=={version}")
    if not wanted:
        return []
    cache = _cache_dir() / "foreign" / arch
    cache.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(17, 40)]
    platforms.append(f"manylinux2014_{arch}")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{sys.version_info.major}{sys.version_info.minor}",
           *[word for platform in platforms for word in ("--platform", platform)],
           "--dest", str(cache), "--progress-bar", "off", "--quiet", *wanted]
    pip = _pip_interpreter()
    with _BUILD_LOCK:
        if pip is None:
            for requirement in wanted:
                _download_from_pypi(requirement, arch, platforms, cache)
            result = subprocess.CompletedProcess(cmd, 0, "", "")
        else:
            cmd[0] = pip
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise FakeVMError(f"the local cloud could not fetch the {arch} wheels of "
                          f"{', '.join(wanted)} ({' '.join(cmd[:4])} ...):\n"
                          f"{result.stderr[-2000:]}")
    found = []
    for requirement in wanted:
        name, version = requirement.split("==")
        matches = sorted(w for w in cache.glob("*.whl")
                         if _normalize(w.name.split("-")[0]) == _normalize(name)
                         and w.name.split("-")[1] == version
                         and w.name[:-len(".whl")].split("-")[-1].endswith(arch))
        if not matches:
            raise FakeVMError(f"the local cloud found no {arch} wheel of {requirement} "
                              f"(in {cache})")
        found.append(matches[0])
    log.info("serving %d %s wheel(s) of the same versions too", len(found), arch)
    return found


def _pip_interpreter() -> Optional[str]:
    """An interpreter with pip: this one, else the one a venv without pip (uv's) was
    made from (``pip download`` with explicit tags does not depend on which)."""
    if importlib.util.find_spec("pip") is not None:
        return sys.executable
    base = getattr(sys, "_base_executable", None)
    # (A venv's python is often a symlink to the base one: compare the paths themselves.)
    if base and base != sys.executable:
        probe = subprocess.run([base, "-c", "import pip"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return str(base)
    return None


def _download_from_pypi(requirement: str, arch: str, platforms: list[str],
                        cache: Path) -> None:
    """Fetch ``name==version``'s wheel for ``platforms`` and this Python from PyPI's JSON
    API into ``cache`` (checked against the sha256 PyPI lists)."""
    import json
    import urllib.request

    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    name, version = requirement.split("==")
    if any(_normalize(w.name.split("-")[0]) == _normalize(name) and
           w.name.split("-")[1] == version and arch in w.name for w in cache.glob("*.whl")):
        return
    python = sys.version_info[:2]
    supported = list(cpython_tags(python, platforms=platforms)) + \
        list(compatible_tags(python, platforms=platforms))
    rank = {tag: i for i, tag in enumerate(supported)}
    base = os.environ.get("VMEXEC_PYPI_URL", "https://pypi.org/pypi").rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/{name}/json", timeout=60) as answer:
            files = json.load(answer)["releases"].get(version, [])
    except OSError as exc:
        raise FakeVMError(f"the local cloud could not fetch the {arch} wheel of "
                          f"{requirement} from {base} ({exc}); install pip here (it "
                          "honours your index settings) or set VMEXEC_PYPI_URL") from None
    best: Optional[tuple[int, dict[str, Any]]] = None
    for entry in files:
        if not entry["filename"].endswith(".whl"):
            continue
        tags = parse_wheel_filename(entry["filename"])[3]
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, entry)
    if best is None:
        raise FakeVMError(f"PyPI has no {arch} wheel of {requirement} for Python "
                          f"{python[0]}.{python[1]}")
    entry = best[1]
    with urllib.request.urlopen(entry["url"], timeout=300) as answer:
        data = answer.read()
    if hashlib.sha256(data).hexdigest() != entry["digests"]["sha256"]:
        raise FakeVMError(f"{entry['filename']} from PyPI does not match its sha256")
    (cache / entry["filename"]).write_bytes(data)


def requirement_closure(requirements: Iterable[str]) -> list[str]:
    """Installed distributions needed to satisfy ``requirements`` here, dependencies
    included (markers evaluated for this interpreter, extras not followed).

    Raises:
        FakeVMError: a needed distribution is not installed.
    """
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _normalize(req.name)
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise FakeVMError(f"{req.name} (needed by the machines) is not installed here: "
                              "the local cloud serves the client's own versions") from None
        seen[key] = dist.metadata["Name"]
        todo.extend(dist.requires or [])
    return sorted(seen.values(), key=_normalize)


# Repacked wheels by (name, version), for the whole process.
_REPACKED: dict[tuple[str, str], Path] = {}
# The process's wheel cache directory (made on first use, removed at exit).
_CACHE_DIR: list[Path] = []


def _cache_dir() -> Path:
    """The directory where this process keeps built and repacked wheels. Lock held."""
    if not _CACHE_DIR or not _CACHE_DIR[0].exists():
        path = Path(tempfile.mkdtemp(prefix="vmexec-localcloud-wheels-"))
        # Caches outlive clouds (one build per test run), not the process.
        atexit.register(shutil.rmtree, path, True)
        _CACHE_DIR[:] = [path]
    return _CACHE_DIR[0]


def _repacked(name: str) -> Path:
    version = importlib.metadata.version(name)
    with _BUILD_LOCK:
        cached = _REPACKED.get((name, version))
        if cached is not None and cached.exists():
            return cached
        repacked = _cache_dir() / "repacked"
        repacked.mkdir(exist_ok=True)
        wheel = repack_installed(name, repacked)
        _REPACKED[(name, version)] = wheel
        return wheel


def _build_vmexec(dest: Path) -> Path:
    """The vmexec wheel the machines install: built from the source checkout this module
    lives in, else (``pip install vmexec[testing]``) repacked from the installed
    distribution, as the other distributions are."""
    source = Path(__file__).resolve().parents[2]
    if not (source / "pyproject.toml").exists():
        try:
            installed = importlib.metadata.distribution("vmexec")
        except importlib.metadata.PackageNotFoundError:
            raise FakeVMError(f"cannot serve vmexec to the machines: {source} is neither "
                              "a source checkout (no pyproject.toml) nor an installed "
                              "distribution; pip install 'vmexec[testing]'") from None
        here = Path(__file__).resolve()
        files = [Path(str(installed.locate_file(f))).resolve() for f in installed.files or ()]
        if here not in files:
            raise FakeVMError(f"cannot serve vmexec to the machines: the installed "
                              f"vmexec {installed.version} is not the one imported from "
                              f"{source}; reinstall it (pip install 'vmexec[testing]')")
        cached = _repacked("vmexec")
        target = dest / cached.name
        shutil.copyfile(cached, target)
        return target
    digest = _tree_digest(source)
    with _BUILD_LOCK:
        built = _BUILT.get(digest)
        if built is None or not built.exists():
            built = _build_from_copy(source)
            _BUILT[digest] = built
    target = dest / built.name
    shutil.copyfile(built, target)
    return target


def _build_from_copy(source: Path) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree it
    # builds, and other people and processes use this checkout at the same time.
    out = Path(tempfile.mkdtemp(prefix="build-", dir=_cache_dir()))
    tree = out / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py"):
        if (source / name).exists():
            shutil.copy2(source / name, tree / name)
    shutil.copytree(source / "vmexec", tree / "vmexec",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    uv = _real_tool("uv")
    if uv is not None:
        cmd = [uv, "build", "--wheel", "--out-dir", str(out), str(tree)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(tree)]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    shutil.rmtree(tree, ignore_errors=True)
    wheels = list(out.glob("vmexec-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FakeVMError(f"building the vmexec wheel failed ({' '.join(cmd)}):\n"
                          f"{result.stderr[-3000:]}")
    log.info("built %s in %.1fs", wheels[0].name, time.monotonic() - started)
    return wheels[0]


def repack_installed(name: str, dest: Path) -> Path:
    """Rebuild the wheel of installed distribution ``name`` from its installed files.

    Args:
        name: the distribution.
        dest: the directory to write the wheel in.

    Returns:
        The wheel file (its tags are those recorded in the installed ``WHEEL`` file).

    Raises:
        FakeVMError: it is not installed, was not installed from a wheel, or is an
            editable install.
    """
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise FakeVMError(f"{name} is not installed here: the local cloud serves the "
                          "client's own versions (pip install it)") from None
    wheel_meta = dist.read_text("WHEEL")
    if not wheel_meta or dist.read_text("direct_url.json") and '"editable": true' in \
            (dist.read_text("direct_url.json") or ""):
        raise FakeVMError(f"{name} was not installed from a wheel; cannot serve it")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines()
            if line.startswith("Tag:")]
    pythons, abis, platforms = (".".join(dict.fromkeys(t.split("-")[i] for t in tags))
                                for i in range(3))
    dist_name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    info_dir = f"{dist_name}-{dist.version}.dist-info"
    wheel_path = dest / f"{dist_name}-{dist.version}-{pythons}-{abis}-{platforms}.whl"
    console = {ep.name for ep in dist.entry_points if ep.group in ("console_scripts",
                                                                   "gui_scripts")}
    record: list[str] = []
    installed_info = None
    with zipfile.ZipFile(wheel_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in dist.files or []:
            rel = str(file)
            parts = Path(rel).parts
            if "__pycache__" in parts or rel.endswith(".pyc"):
                continue
            if parts[0].endswith(".dist-info"):
                installed_info = parts[0]
                if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
                arcname = "/".join((info_dir, *parts[1:]))
            elif parts[0] == "..":
                # Installed scripts (e.g. uv's binary): console scripts are regenerated by
                # the installer from entry_points.txt; real files travel as data.
                if Path(rel).name in console or "bin" not in parts:
                    continue
                arcname = f"{dist_name}-{dist.version}.data/scripts/{Path(rel).name}"
            else:
                arcname = rel
            path = Path(str(file.locate()))
            if not path.is_file():
                continue
            data = path.read_bytes()
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            record.append(f"{arcname},sha256={_urlsafe_digest(data)},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    if installed_info is None:
        raise FakeVMError(f"{name}: its installed files list no .dist-info; cannot serve it")
    return wheel_path


# --- small helpers ---------------------------------------------------------------------

def _region_of(context: dict[str, Any]) -> str:
    return str(context.get("client_region") or "")


def _reset_moto(endpoint_url: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST")
    # The moto server is on 127.0.0.1: never through a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        response.read()


def _for_endpoint(url: str, endpoint_url: str) -> bool:
    return url == endpoint_url or url.startswith(endpoint_url + "/")


def _refused(url: str, endpoint_url: str) -> OffMachineRequestError:
    return OffMachineRequestError(
        f"refusing a request to {url}: in the local cloud every AWS call must go to "
        f"{endpoint_url} (pass endpoint_url= and session= to every client)")


def _has_tag(resource: dict[str, Any], key: str) -> bool:
    return any(t.get("Key") == key for t in resource.get("Tags", []))


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _real_tool(name: str) -> Optional[str]:
    """The real binary of ``name`` (not a pyenv/asdf shim script that needs its env)."""
    if name == "uv":
        try:
            import uv as uv_module  # the uv distribution ships its binary

            found = uv_module.find_uv_bin()
            return os.path.realpath(found)
        except (ImportError, FileNotFoundError):
            pass
    on_path = shutil.which(name)
    return os.path.realpath(on_path) if on_path else None


def _tree_digest(source: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((source / "vmexec").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(source)).encode())
            h.update(path.read_bytes())
    h.update((source / "pyproject.toml").read_bytes())
    return h.hexdigest()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
