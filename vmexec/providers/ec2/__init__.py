"""The ``ec2`` provider: fleets of EC2 instances, mixed architectures, several regions.

``EC2Provider`` ties the modules of this package together::

    __init__   options.py: validate every option once (EC2Options, no AWS call)
               discovery.py: DescribeRegions -> per region (at once): instance types,
               zones, default subnets, images -> Plan, priced by ``self.prices`` (a
               guardrails PriceBook); a named fleet's machines to reuse; the environment
               built per architecture (ConfigError/EnvSyncError before any resource
               exists; nothing is created here)
    launch     setup.py: per region, once: security group + launch template
               -> fleet.py: batched CreateFleet calls with capacity fallback
    connect    connect.py: wait for "running" (watch.py) -> pinned SSH, retried while
               the machine boots -> probe the boot outcome -> environment over SSH
               -> the agent
    terminate  teardown.py: terminate + wait + delete SG/launch templates + verify by
               tag, every region; also from atexit and SIGINT/SIGTERM (lifecycle.py). A
               named fleet (named.py) keeps its ready machines warm instead, for a later
               run to adopt

    clients.py   one client factory (one config; throttling retried by every client)
                 and ``in_every_region``; errors.py what AWS error codes mean;
                 userdata.py + scripts/ the boot script; network.py this computer's
                 address; resources.py tags and finding by tag; images.py, plan.py

Every resource is tagged ``vmexec:fleet``/``vmexec:owner``/``vmexec:created`` so that
``vmexec cleanup`` (``teardown.sweep``) finds whatever a killed client left behind, and
the machines power themselves off (``InstanceInitiatedShutdownBehavior=terminate``) when
no agent runs on them (the boot script's dead-man loop) or the client goes silent (the
agent's watchdog).

Testing seams (for tests and the local-cloud harness):

* ``session=`` / ``endpoint_url=``: a boto3 session (register
  ``vmexec.testing.faults.FaultInjector`` / ``ApiCallCounter`` on it first) and e.g. a
  moto server's URL, used for every client (EC2, SSM and STS).
* ``address_for=``: ``record -> (host, port)`` to SSH to (default: the public IP, else
  the private IP, port 22), and ``ssh_user=`` the login user.
* ``boot_env=``: extra ``export`` lines at the top of the boot script (e.g.
  ``VMEXEC_SSHD_RELOAD``, ``VMEXEC_POWEROFF``, ``VMEXEC_DEADMAN_INTERVAL``); the
  harness sets ``VMEXEC_ROOT`` per machine when it runs the script and in the sshd
  session environment, which ``userdata.agent_command()`` expands.
* ``handle_signals=False`` leaves SIGINT/SIGTERM alone (atexit cleanup stays).

boto3 is imported in the modules of this package only.
Must not import: the scheduler, the executor, paramiko (SSH goes through
``vmexec.transports.ssh``).
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

from botocore.exceptions import ClientError

from vmexec.environment import PreparedEnvironment
from vmexec.environment.stage import delete_staging
from vmexec.errors import CapacityError, EnvSyncError, QuotaError, TransportError
from vmexec.guardrails.budget import CostPlan, TeardownReport
from vmexec.guardrails.pricing import PriceBook
from vmexec.providers.base import MachineRecord, MachineState, Provider
from vmexec.providers.ec2 import lifecycle, resources, teardown
from vmexec.providers.ec2.clients import ClientFactory
from vmexec.providers.ec2.connect import Connector
from vmexec.providers.ec2.discovery import discover
from vmexec.providers.ec2.fleet import Launcher
from vmexec.providers.ec2.named import fleet_id_for
from vmexec.providers.ec2.network import ClientNetwork, detect_ssh_cidr
from vmexec.providers.ec2.options import EC2Options
from vmexec.providers.ec2.plan import allocate
from vmexec.providers.ec2.setup import Reach, RegionSetups, template_data
from vmexec.providers.ec2.watch import InstanceWatcher
from vmexec.providers.ec2.userdata import (
    DEFAULT_MAX_LIFETIME,
    BootSpec,
    FleetKeys,
    agent_command,
    named_fleet_directory,
    render_userdata,
    script_text,
)
from vmexec.transports.base import Transport

__all__ = ["EC2Provider", "EC2Options", "agent_command", "detect_ssh_cidr"]

log = logging.getLogger(__name__)

# A machine lost this long after this computer's address changed is reconnected to,
# not replaced (its connection broke with the old network; the machine still runs).
_RECONNECT_WINDOW = 120.0
# After a launch found no capacity (or hit a quota), launch() adds nothing for this
# long, so that the scheduler does not hammer EC2 with the same failing request.
_LAUNCH_COOLDOWN = 60.0


class EC2Provider(Provider):
    """Machines on EC2, planned across instance types (any mix of arm64 and x86_64) and
    regions, launched in batches as demand grows, reached over pinned SSH.

    Args:
        max_workers: task slots wanted in total (required).
        instance_type: one type or a list (``"c7g.large"``, ``["c7g.large", "c7i.large"]``);
            slots are split evenly across the listed types within each region.
        regions: one region or a list; slots are split evenly across them. Default: the
            session's region, else us-east-1.
        arm: True keeps only arm64 types, False only x86_64, None uses all listed.
        spot: launch spot instances first, on-demand where spot is short.
        ami: image override: one id, or ``{(region, arch): id}`` (default: latest Amazon
            Linux 2023 per arch and region; GPU types get the Deep Learning Base AMI).
        ssh_cidr: who may reach port 22. Default: this computer's public address as AWS
            sees it (a /32 or /128, asked of AWS's "what is my IP" endpoint before the
            first launch, never for a plan or ``dry_run``); a client inside EC2 admits
            its own security groups in its own region and VPC and dials the machines
            there at their private addresses (``vmexec.providers.ec2.network``).
        address_lookup: True (default): find the public address as above
            (``$VMEXEC_CHECKIP_URL`` names another endpoint); a URL: ask that endpoint;
            False: send no request (the route's own address must then be public, else
            pass ``ssh_cidr=``).
        iam_instance_profile: instance profile name or ARN for the machines' own role (the
            client's credentials never leave it).
        root_volume_gb: root volume size (default: the image's).
        tags: extra tags on every resource.
        name: a name makes the fleet findable and reusable: its id is ``vmx-<name>``
            (the ``Name`` tag too; ``vmexec ls`` shows it), its SSH keys are kept in
            ``~/.cache/vmexec/fleets/``, and a normal shutdown leaves its ready machines
            running for ``keepalive`` seconds (their own dead-man switch then turns them
            off). A later executor with the same name reuses them: no launch, no boot,
            and no install when the environment is unchanged (only the user's code when
            only that changed). SIGINT/SIGTERM still remove everything.
        environment: what the machines install (``vmexec.environment``): ``"auto"``
            (default: this interpreter's distributions, local packages and modules,
            resolved per architecture before launch), ``"conda-pack"``, a requirements
            file, a list of requirements, or None (the image's Python, plus
            ``packages``/``wheel_urls`` with pip).
        exclude: distributions or modules left out of ``environment``.
        env: environment variables for the workers (sent over SSH, not in user-data).
        forward_env: names of this process's environment variables to forward.
        packages: with ``environment=None``: extra pip requirements for the machines.
        index_url: a package index for the machines (a mirror).
        find_links: wheel folders or URLs; alone (without ``index_url``) the install is
            offline.
        wheel_urls: wheels to install instead of ``vmexec==<this version>`` from the index
            (vmexec built from this copy, staged where the machines can fetch it).
        session: the ``boto3.Session`` to use (default: a new one from the environment).
        endpoint_url: AWS endpoint for every client (e.g. a moto server).
        slots_per_machine: slots per machine (default: its vCPU count).
        boot_timeout: seconds a machine may take to boot and answer SSH.
        max_lifetime: seconds after which machines power themselves off anyway
            (default 12 hours, ``userdata.DEFAULT_MAX_LIFETIME``).
        keepalive: for a named fleet, seconds its machines stay on after the client has
            gone (default 600; the executor passes its own ``keepalive``).
        ssh_user: the login user of the image (``ec2-user`` on Amazon Linux).
        address_for: ``record -> (host, port)`` to SSH to (testing seam).
        boot_env: extra environment exported at the top of the boot script (testing seam;
            readable on the machine: no secrets).
        handle_signals: install SIGINT/SIGTERM/SIGHUP handlers that tear the fleet down.

    Raises:
        ConfigError: any option is wrong, a region/type/image is unknown or unavailable, or
            AWS credentials are missing — before any resource is created.
        ProviderNotAvailable: boto3 is not installed (``pip install 'vmexec[aws]'``).
    """

    name = "ec2"
    poweroff_on_watchdog = True

    def __init__(  # the keywords are EC2Options' fields (options.py)
        self,
        max_workers: Optional[int] = None,
        *,
        instance_type: Any = None,
        regions: Any = None,
        arm: Optional[bool] = None,
        spot: bool = False,
        ami: Any = None,
        ssh_cidr: Optional[str] = None,
        address_lookup: Any = True,
        iam_instance_profile: Optional[str] = None,
        root_volume_gb: Optional[int] = None,
        tags: Optional[Mapping[str, str]] = None,
        name: Optional[str] = None,
        packages: Sequence[str] = (),
        index_url: Optional[str] = None,
        find_links: Any = None,
        wheel_urls: Sequence[str] = (),
        environment: Any = "auto",
        exclude: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        forward_env: Sequence[str] = (),
        session: Any = None,
        endpoint_url: Optional[str] = None,
        slots_per_machine: Optional[int] = None,
        boot_timeout: float = 900.0,
        max_lifetime: Optional[float] = None,
        keepalive: Optional[float] = None,
        ssh_user: str = "ec2-user",
        address_for: Optional[Callable[[MachineRecord], tuple[str, int]]] = None,
        boot_env: Optional[Mapping[str, str]] = None,
        handle_signals: bool = True,
        **unknown: Any,
    ) -> None:
        options = EC2Options.parse(
            max_workers, unknown=unknown, instance_type=instance_type, regions=regions,
            arm=arm, spot=spot, ami=ami, ssh_cidr=ssh_cidr, address_lookup=address_lookup,
            iam_instance_profile=iam_instance_profile, root_volume_gb=root_volume_gb,
            tags=tags, name=name, packages=packages, index_url=index_url,
            find_links=find_links, wheel_urls=wheel_urls, environment=environment,
            exclude=exclude, env=env, forward_env=forward_env, session=session,
            endpoint_url=endpoint_url, slots_per_machine=slots_per_machine,
            boot_timeout=boot_timeout, max_lifetime=max_lifetime, keepalive=keepalive,
            ssh_user=ssh_user, address_for=address_for, boot_env=boot_env,
            handle_signals=handle_signals)
        self.options = options
        # The options the rest of vmexec (and tests) read from the provider.
        self.max_workers = options.max_workers
        self.instance_types = list(options.instance_type)
        self.regions = list(options.regions)
        self.spot = options.spot
        self.root_volume_gb = options.root_volume_gb
        self.boot_timeout = options.boot_timeout
        self.keepalive = options.keepalive
        self.fleet_name = options.name
        self.ssh_cidr = options.ssh_cidr
        self.session = options.session
        self.endpoint_url = options.endpoint_url
        # Who may reach port 22 is found when the first machine is launched, not here:
        # a plan, its price and dry_run need no network (see network.ClientNetwork).
        self.network = ClientNetwork(options.ssh_cidr, options.address_lookup)
        #: Prices for the plan's $/h and the cost receipt (live where the account
        #: allows, else the bundled table; see ``vmexec.guardrails.pricing``).
        # A custom endpoint (a mirror of EC2, or moto in tests) has no AWS Price List
        # behind it: use the bundled, dated table rather than asking it.
        self.prices = PriceBook(session=self.session, endpoint_url=self.endpoint_url,
                                live=self.endpoint_url is None)
        self.fleet_id = fleet_id_for(name) if name else f"vmx-{secrets.token_hex(4)}"
        self.created = resources.utc_now()
        # The process that owns the fleet. A child forked from it (a ProcessPoolExecutor
        # in the same program) inherits this object, the atexit hooks and the signal
        # handlers: it must never tear the parent's fleet down.
        self._owner_pid = os.getpid()
        self.tags = resources.fleet_tags(self.fleet_id, name=name, user_tags=options.tags,
                                         created=self.created)
        if name:
            # Marks this client's machines of a named fleet as in use (see named.adopt).
            self.client_tag = {"Key": resources.TAG_CLIENT,
                               "Value": f"{os.getpid()}@{socket.gethostname()} "
                                        f"{resources.utc_now().isoformat(timespec='seconds')}"}
            self.tags[resources.TAG_CLIENT] = self.client_tag["Value"]

        # -- what AWS offers: validation and the plan (no resource is created) ---------
        self.aws = ClientFactory(self.session, self.endpoint_url)
        found = discover(options, self.aws, self.prices, self.fleet_id, self.name)
        self.clients = found.clients
        self.owner = found.owner
        self.tags[resources.TAG_OWNER] = self.owner
        self.facts = found.facts
        self.plan = found.plan
        self.type_infos = found.type_infos
        self.images = found.images
        self.environment: Optional[PreparedEnvironment] = found.environment
        self._named = found.named
        self._adoptable = found.adoptable
        self._unwanted = found.unwanted
        self._ledger = found.ledger

        # -- state -----------------------------------------------------------------------
        self._lock = threading.Lock()  # records, keys, reconnections
        self._launch_lock = threading.Lock()  # one launch at a time; teardown waits for it
        self._teardown_lock = threading.Lock()
        self._records: dict[str, MachineRecord] = {}
        # Machines lost because this computer changed networks (their SSH connections
        # broke): kept, and handed back by the next launch() to be reconnected.
        self._reconnect: list[MachineRecord] = []
        self._reconnects: dict[str, int] = {}  # instance id -> times kept so
        self._really_lost: set[str] = set()  # lost, and the address had not changed
        # Kept by launch() before the scheduler's terminate() of them arrived: skip that.
        self._skip_terminate: set[str] = set()
        self._keys: Optional[FleetKeys] = None
        self._userdata: Optional[str] = None
        self._closed = False
        self._destroy = False  # set by signals: a named fleet is removed, not kept warm
        # Set with _closed: wakes connect threads pausing between SSH attempts.
        self._closing = threading.Event()
        self._blocked_until = 0.0
        self._background: Optional[threading.Thread] = None
        # Reentrant: a signal handler may run while the main thread is inside this lock.
        self._background_lock = threading.RLock()
        self._current_launch: Optional[list[MachineRecord]] = None
        self.teardown_summary: Optional[teardown.TeardownSummary] = None
        self._watchers = {r: InstanceWatcher(self.clients[r].ec2, r) for r in self.regions}
        self._reach = Reach(self.network, self.facts, self.clients)
        self._setups = RegionSetups(
            fleet_id=self.fleet_id, tags=self.tags, reach=self._reach, clients=self.clients,
            facts=self.facts, images=self.images, named=self._named, ledger=self._ledger,
            template_data=lambda region, group_id, images: template_data(
                region=region, group_id=group_id, images=images, userdata=self.userdata(),
                tags=self.tags, root_volume_gb=self.root_volume_gb,
                iam_instance_profile=options.iam_instance_profile))
        self._connector = Connector(
            options=options, fleet_id=self.fleet_id, tags=self.tags, clients=self.clients,
            watchers=self._watchers, reach=self._reach, keys=self._ensure_keys,
            environment=self.environment, closing=self._closing)
        # The keys exist from here on (a harness may pin a test sshd to them before the
        # first launch); the temporary directory goes at teardown or with the object.
        # Rendering the boot script now checks ssh_user, boot_env and its 16 KB limit.
        self.userdata()
        self._launcher = Launcher(self.plan, self.type_infos, self.clients,
                                  self._setups.get, spot=self.spot,
                                  on_created=self._remember, provider_name=self.name)
        lifecycle.register(self, options.handle_signals)

    # -- introspection ---------------------------------------------------------------------
    @property
    def keys(self) -> FleetKeys:
        """The fleet's SSH keys: client key, host key, known_hosts (temporary files)."""
        return self._ensure_keys()

    def boot_spec(self) -> BootSpec:
        """What the boot script of this fleet installs."""
        keys = self._ensure_keys()
        return BootSpec(
            fleet_id=self.fleet_id, client_public_key=keys.client_public,
            host_private_key=keys.host_private, host_public_key=keys.host_public,
            login_user=self.ssh_user, wheel_urls=self.options.wheel_urls,
            packages=self.options.packages, index_url=self.options.index_url,
            find_links=self.options.find_links,
            heartbeat_grace=int(self.boot_timeout + 600),
            agent_grace=int(self.keepalive) if self.fleet_name else 300,
            max_lifetime=int(self.options.max_lifetime or DEFAULT_MAX_LIFETIME),
            env=self.options.boot_env,
            # With environment sync the boot script only prepares; the install
            # comes over SSH (connect).
            environment_script=script_text("prepare-ssh-install.sh") if self.environment
            else "",
        )

    def userdata(self) -> str:
        """The boot script (the same for every machine of the fleet)."""
        with self._lock:
            if self._userdata is None:
                spec = self.boot_spec()
                self._userdata = render_userdata(spec)
                log.info("fleet %s: machines power themselves off %.1f hours after boot "
                         "(max_lifetime=%d s; pass max_lifetime= to change it), or when "
                         "no frame from this client has arrived for a while",
                         self.fleet_id, spec.max_lifetime / 3600, spec.max_lifetime)
            return self._userdata

    def _ensure_keys(self) -> FleetKeys:
        if self._keys is None:
            self._keys = FleetKeys(self.fleet_id, named_fleet_directory(self.fleet_id)
                                   if self.fleet_name else None)
            # Keys left on disk if the provider is collected without terminate().
            weakref.finalize(self, self._keys.remove)
        return self._keys

    # -- launch ------------------------------------------------------------------------------
    def launch(self, slots_wanted: int) -> list[MachineRecord]:
        """Start machines adding about ``slots_wanted`` slots, up to the plan's total.

        Returns:
            The new machines (booting); ``[]`` when the plan is complete, the fleet is shut
            down, or a recent launch found no capacity/quota (for a minute).

        Raises:
            CapacityError: nothing could be launched anywhere.
            QuotaError: an account quota stopped the launch (names the quota).
            ConfigError, VMExecError: anything else (translated AWS error).
            Whatever this call had started is terminated before it raises.
        """
        with self._launch_lock:
            if self._closed:
                return []
            # A machine the scheduler just lost may have lost only its connection (this
            # computer changed networks): decide before launching a replacement.
            with self._lock:
                lost = [r for r in self._records.values() if r.state == MachineState.LOST]
            if lost:
                self._keep_if_moved(lost, before_terminate=True)
            with self._lock:
                again, self._reconnect = self._reconnect, []
            if again:
                # Running machines whose connections broke when this computer changed
                # networks: reconnect to them rather than launch and boot new ones.
                log.info("fleet %s: reconnecting to %d machine(s) from the new address",
                         self.fleet_id, len(again))
                return again
            if time.monotonic() < self._blocked_until:
                log.info("not launching for %.0fs more: the last launch found no capacity "
                         "or hit a quota", self._blocked_until - time.monotonic())
                return []
            live: dict[tuple[str, str], int] = {}
            live_slots = 0
            with self._lock:
                for record in self._records.values():
                    # A machine that is lost, or draining before an interruption, no
                    # longer counts: its replacement may be launched.
                    if record.state not in (MachineState.TERMINATED, MachineState.LOST,
                                            MachineState.DRAINING):
                        key = (record.region or "", record.instance_type or "")
                        live[key] = live.get(key, 0) + 1
                        live_slots += record.slots
            room = self.plan.total_slots - live_slots
            if slots_wanted <= 0 or room <= 0:
                return []
            adopted = self._adopt(min(slots_wanted, room))
            if adopted:
                # Reused machines first; more are launched when the scheduler asks again.
                return adopted
            wants = allocate(self.plan, live, min(slots_wanted, room))
            if not wants:
                return []
            # Who may reach port 22, before anything is created (ConfigError naming
            # ssh_cidr= if this computer's address cannot be found).
            for region in sorted({region for region, _ in wants}):
                self._reach.access(region)
            started_here: list[MachineRecord] = []
            regions_before = self._setups.regions()
            self._current_launch = started_here
            try:
                report = self._launcher.launch(wants)
            except BaseException as exc:
                self._undo_launch(started_here, self._setups.regions() - regions_before, exc)
                if isinstance(exc, (CapacityError, QuotaError)):
                    self._blocked_until = time.monotonic() + _LAUNCH_COOLDOWN
                raise
            finally:
                self._current_launch = None
            records = report.records
            if self._ledger is not None:
                for region in sorted({r.region or "" for r in records}):
                    self._ledger.add(region, instances=[r.id for r in records
                                                        if r.region == region])
            wanted = sum(wants.values())
            if report.shortfall:
                # Capacity ran out everywhere: asking again at once would fail the same way.
                self._blocked_until = time.monotonic() + _LAUNCH_COOLDOWN
            log.info("fleet %s: launched %d machine(s) (%d slots) in %d call(s)%s",
                     self.fleet_id, len(records), sum(r.slots for r in records),
                     report.calls,
                     f"; {report.shortfall} of {wanted} had no capacity anywhere"
                     if report.shortfall else "")
            return records

    def _adopt(self, slots_wanted: int) -> list[MachineRecord]:
        """Take a named fleet's running machines, up to ``slots_wanted`` slots (no API
        call); the first time, terminate its machines the plan has no use for."""
        unwanted, self._unwanted = self._unwanted, {}
        for region, ids in unwanted.items():
            self._terminate_ids(region, ids)
        taken: list[MachineRecord] = []
        slots = 0
        while self._adoptable and slots < slots_wanted:
            record = self._adoptable.pop(0)
            taken.append(record)
            slots += record.slots
        for region in sorted({r.region or "" for r in taken}):
            ids = [r.id for r in taken if r.region == region]
            resources.tag_resources(self.clients[region].ec2, region, ids, self.client_tag)
            # The kept group admits this client, and no longer earlier runs' addresses.
            self._setups.get(region)
        if taken:
            self._remember(taken)
            log.info("fleet %s: reusing %d running machine(s) (%d slots)", self.fleet_id,
                     len(taken), slots)
        return taken

    def _remember(self, records: list[MachineRecord]) -> None:
        with self._lock:
            for record in records:
                self._records[record.id] = record
            if self._current_launch is not None:
                self._current_launch.extend(records)

    def _undo_launch(self, records: list[MachineRecord], new_regions: set[str],
                     cause: BaseException) -> None:
        """Destroy what a failed launch created: its instances, and the security groups
        and launch templates it set up in regions launched in for the first time."""
        if not records and not new_regions:
            return
        log.warning("launch failed (%s): removing the %d machine(s) it started%s", cause,
                    len(records), f" and its resources in {', '.join(sorted(new_regions))}"
                    if new_regions else "")
        by_region: dict[str, list[str]] = {}
        with self._lock:
            for record in records:
                by_region.setdefault(record.region or "", []).append(record.id)
                record.state = MachineState.TERMINATED
        if new_regions:
            # A region set up by this launch holds nothing older: remove all of the
            # fleet there, by tag, and verify.
            summary = teardown.teardown(
                {r: self.clients[r].ec2 for r in new_regions}, self.fleet_id,
                instance_ids={r: by_region.get(r, []) for r in new_regions})
            if not summary.clean:
                log.error("undoing the failed launch left resources: %s", summary.text())
            for region in new_regions:
                self._setups.forget(region)
        for region, ids in by_region.items():
            if region not in new_regions:
                self._terminate_ids(region, ids)

    # -- reaching the machines again after this computer moved (setup.Reach) -------------
    def _keep_if_moved(self, records: list[MachineRecord], before_terminate: bool = False
                       ) -> list[MachineRecord]:
        """Of machines the scheduler gives up as lost, keep (for ``launch`` to hand back)
        those lost because this computer's address changed: they still run; only the
        connection broke. Returns the records still to terminate.

        ``before_terminate``: called from ``launch``, before the scheduler's
        ``terminate`` of these records, which is then skipped for those kept.
        """
        with self._lock:
            lost = [r for r in records if r.state == MachineState.LOST and r.id not in self._really_lost
                    and self._reconnects.get(r.id, 0) < 3]
        if not lost or not self._reach.automatic or self._closed:
            return records
        self._reach.follow(force=time.monotonic() - self._reach.moved_at > _RECONNECT_WINDOW)
        if time.monotonic() - self._reach.moved_at > _RECONNECT_WINDOW:
            with self._lock:  # the address did not change: the machines are really lost
                self._really_lost.update(r.id for r in lost)
            return records
        with self._lock:
            for record in lost:
                record.state = MachineState.PENDING
                self._reconnects[record.id] = self._reconnects.get(record.id, 0) + 1
                self._reconnect.append(record)
                if before_terminate:
                    self._skip_terminate.add(record.id)
        log.info("fleet %s: kept %s for reconnection (this computer's address changed)",
                 self.fleet_id, ", ".join(r.label for r in lost))
        return [r for r in records if r not in lost]

    # -- connect (connect.py) ----------------------------------------------------------------
    @property
    def address_for(self) -> Callable[[MachineRecord], tuple[str, int]]:
        """``record -> (host, port)`` to SSH to; settable (a harness's sshd)."""
        return self._connector.address_for

    @address_for.setter
    def address_for(self, value: Callable[[MachineRecord], tuple[str, int]]) -> None:
        self._connector.address_for = value

    @property
    def ssh_user(self) -> str:
        """The login user of the machines; settable (a harness's sshd)."""
        return self._connector.ssh_user

    @ssh_user.setter
    def ssh_user(self, value: str) -> None:
        self._connector.ssh_user = value

    def connect(self, record: MachineRecord, timeout: float) -> Transport:
        """Wait for ``record``'s instance to run and boot, then open the agent's channel.

        Args:
            record: a record from ``launch``.
            timeout: seconds for all of it (also bounded by ``boot_timeout``).

        Returns:
            An SSH transport running ``userdata.agent_command()``.

        Raises:
            TransportError: the instance died, the boot script failed (with the reason
                and the end of the machine's boot log), or it was not reachable in time
                (with the last SSH error and the end of the console output).
        """
        if self._closed:
            raise TransportError(f"{record.label}: the fleet is shutting down")
        return self._connector.connect(record, timeout)

    def agent_options(self, record: MachineRecord) -> dict[str, object]:
        """The notice file and power-off command for the agent (``Connector``)."""
        return self._connector.agent_options(record)

    # -- describe / terminate ----------------------------------------------------------------
    def describe(self) -> list[MachineRecord]:
        """The machines launched and not terminated."""
        with self._lock:
            return [r for r in self._records.values() if r.state != MachineState.TERMINATED]

    def terminate(self, records: Optional[list[MachineRecord]] = None) -> None:
        """Terminate ``records``; with None, tear the whole fleet down and verify it.

        ``terminate(None)`` terminates every instance of the fleet in every region, waits,
        deletes its security groups and launch templates, checks by tag that nothing is
        left, removes the fleet's keys, and stores the ``TeardownSummary`` in
        ``teardown_summary``. It is idempotent and thread-safe; the provider launches
        nothing afterwards. Errors are logged (with the ``vmexec cleanup`` command), not
        raised: this runs from shutdown paths. In a process forked from the one that made
        the fleet it does nothing: the fleet is the parent's.
        """
        if os.getpid() != self._owner_pid:
            log.debug("fleet %s belongs to process %d: not torn down from child %d",
                      self.fleet_id, self._owner_pid, os.getpid())
            return
        if records is None:
            self._teardown()
            return
        with self._lock:
            kept = {r.id for r in records if r.id in self._skip_terminate}
            self._skip_terminate -= kept
        records = self._keep_if_moved([r for r in records if r.id not in kept])
        by_region: dict[str, list[str]] = {}
        with self._lock:
            for record in records:
                known = self._records.get(record.id)
                if known is None or known.state == MachineState.TERMINATED:
                    continue
                known.state = record.state = MachineState.TERMINATED
                by_region.setdefault(known.region or "", []).append(known.id)
        if self._closed:
            return  # the fleet's teardown terminates everything, by tag, in one call a region
        for region, ids in by_region.items():
            self._terminate_ids(region, ids)

    def _terminate_ids(self, region: str, ids: list[str]) -> None:
        try:
            self.clients[region].ec2.terminate_instances(InstanceIds=ids)
            log.info("%s: terminated %s", region, ", ".join(ids))
        except ClientError as exc:
            log.error("terminating %s in %s failed: %s; the fleet's teardown (or `vmexec "
                      "cleanup --fleet %s`) will retry", ", ".join(ids), region, exc,
                      self.fleet_id)

    def _close(self) -> None:
        """Refuse new launches and wake every connect thread that waits or retries."""
        self._closed = True
        self._closing.set()
        for watcher in self._watchers.values():
            watcher.close()
        self._connector.close()

    def _teardown(self) -> None:
        with self._teardown_lock:
            if self.teardown_summary is not None:
                return
            self._close()
            # A launch in flight finishes first, so that what it starts is torn down too.
            with self._launch_lock:
                keep = self.fleet_name is not None and not self._destroy
                with self._lock:
                    by_region: dict[str, list[str]] = {}
                    for record in self._records.values():
                        # Kept warm: a named fleet's machines that were ready to work.
                        if not (keep and record.state == MachineState.READY):
                            by_region.setdefault(record.region or "", []).append(record.id)
                    touched = bool(self._setups.regions() or self._records)
                    left_before = any(state.instances or state.security_group
                                      or state.launch_templates
                                      for state in self._named.values())
                clients = {r: c.ec2 for r, c in self.clients.items()}
                if keep and touched:
                    summary = teardown.keep_warm(clients, self.fleet_id,
                                                  instance_ids=by_region,
                                                  keepalive=self.keepalive)
                elif touched or (left_before and not keep):
                    summary = teardown.teardown(clients, self.fleet_id,
                                                 instance_ids=by_region)
                else:  # nothing was ever launched: nothing to delete or verify
                    summary = teardown.TeardownSummary(fleet=self.fleet_id,
                                                        regions=list(self.regions))
                kept = {r.id for r in summary.kept}
                with self._lock:
                    for record in self._records.values():
                        if record.id not in kept:
                            record.state = MachineState.TERMINATED
                    # Kept machines have their environment: its staged copy may serve
                    # them again (the bucket's lifecycle rule expires it otherwise).
                    staged_regions = [] if kept else self._connector.staged_regions()
                if staged_regions:
                    try:
                        delete_staging(self.session, staged_regions, self.fleet_id,
                                       endpoint_url=self.endpoint_url)
                        summary.deleted["staged artifact set"] = len(staged_regions)
                    except EnvSyncError as exc:
                        # The bucket's lifecycle rule removes them within a day.
                        log.warning("fleet %s: staged artifacts not deleted: %s",
                                    self.fleet_id, exc)
                self.teardown_summary = summary
            if self._keys is not None:
                if self.fleet_name and not summary.kept and not keep:
                    self._keys.destroy()  # nothing of the named fleet is left to log in to
                else:
                    self._keys.remove()
            lifecycle.unregister(self)

    def sweep(self) -> list[str]:
        """Remove what earlier runs *of this user on this computer* left in this fleet's
        regions: other fleets with the same ``vmexec:owner``, older than two hours.

        Other owners' fleets may be alive and are never touched here; ``vmexec cleanup``
        is the tool for those.
        """
        me = self.owner
        summary = teardown.sweep(
            {r: c.ec2 for r, c in self.clients.items()},
            older_than=datetime.timedelta(hours=2),
            select=lambda r: r.owner == me and r.fleet != self.fleet_id)
        return [f"{kind}: {count}" for kind, count in sorted(summary.deleted.items())]

    def can_replace(self) -> bool:
        """A lost machine can be replaced while the fleet is not shutting down."""
        return not self._closed

    # -- the cost guard's hooks ------------------------------------------------------------
    def cost_plan(self) -> CostPlan:
        """The plan at full scale, priced by ``self.prices``; storage is the root volume
        (``root_volume_gb``, else the largest of the plan's images)."""
        if self.root_volume_gb:
            storage = float(self.root_volume_gb)
        else:
            sizes = [image.root_size_gb for per_region in self.images.values()
                     for image in per_region.values() if image.root_size_gb]
            storage = float(max(sizes)) if sizes else 0.0
        return CostPlan(plan=self.plan, prices=self.prices, spot=self.spot,
                        storage_gb_per_machine=storage)

    def leftovers(self) -> list[resources.Resource]:
        """vmexec resources of other fleets in this fleet's regions, found by tag.

        Raises:
            VMExecError: a region's describe calls failed.
        """
        found = resources.find_all({r: c.ec2 for r, c in self.clients.items()})
        return [r for r in found if r.fleet != self.fleet_id]

    def teardown_report(self) -> Optional[TeardownReport]:
        summary = self.teardown_summary
        if summary is None:
            return None
        return TeardownReport(deleted=summary.deleted, left=len(summary.remaining),
                              kept=[r.id for r in summary.kept], keepalive=summary.keepalive)

    def start_background_teardown(self) -> threading.Thread:
        """Start ``terminate(None)`` in a non-daemon thread (signal handlers use this).

        The interpreter waits for the thread before it exits, so the cloud is cleaned even
        when the main thread unwinds on KeyboardInterrupt.
        """
        if os.getpid() != self._owner_pid:  # a forked child: the fleet is the parent's
            thread = threading.Thread(target=lambda: None)
            thread.start()
            return thread
        # Stop launching and connecting at once, before the thread runs. (No lock: this
        # runs in signal handlers.) An interrupted named fleet is removed too.
        self._destroy = True
        self._closed = True
        self._closing.set()
        with self._background_lock:
            if self._background is None:
                self._background = threading.Thread(target=self._teardown,
                                                    name=f"vmexec-ec2-teardown-{self.fleet_id}")
                self._background.start()
            return self._background

    def __repr__(self) -> str:
        return (f"<EC2Provider {self.fleet_id} {len(self.describe())} machine(s) in "
                f"{', '.join(self.regions)}>")
