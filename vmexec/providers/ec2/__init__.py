"""The ``ec2`` provider: fleets of EC2 instances, mixed architectures, several regions.

``EC2Provider`` ties the pieces of this package together::

    __init__   validate options -> DescribeRegions -> per region (parallel): instance
               types, zones, default subnets, images -> Plan, priced by ``self.prices``
               (a guardrails PriceBook)  (ConfigError before any resource exists;
               nothing is created here)
    launch     per region, once: security group + launch template (resources.py)
               -> Launcher: batched CreateFleet calls with capacity fallback (fleet.py)
    connect    wait for "running" (one batched poll per region) -> SSH with the fleet's
               pinned host key and ephemeral client key (userdata.py), retried while the
               machine boots -> probe the boot outcome -> the agent's SSH channel
    terminate  terminate + wait + delete SG/launch templates + verify by tag, every
               region (resources.py); also from atexit and SIGINT/SIGTERM. A named
               fleet (named.py) keeps its ready machines warm instead, for a later run
               to adopt

Every resource is tagged ``vmexec:fleet``/``vmexec:owner``/``vmexec:created`` so that
``vmexec cleanup`` (``resources.sweep``) finds whatever a killed client left behind, and
the machines power themselves off (``InstanceInitiatedShutdownBehavior=terminate``) when
no agent runs on them (the boot script's dead-man loop) or the client goes silent (the
agent's watchdog).

Testing seams (for tests and the local-cloud harness):

* ``session=`` / ``endpoint_url=``: a boto3 session (register
  ``errors.FaultInjector`` / ``errors.ApiCallCounter`` on it first) and e.g. a moto
  server's URL, used for every client (EC2 and SSM).
* ``address_for=``: ``record -> (host, port)`` to SSH to (default: the public IP, else
  the private IP, port 22), and ``ssh_user=`` the login user.
* ``boot_env=``: extra ``export`` lines at the top of the boot script (e.g.
  ``VMEXEC_SSHD_RELOAD``, ``VMEXEC_POWEROFF``, ``VMEXEC_DEADMAN_INTERVAL``); the
  harness sets ``VMEXEC_ROOT`` per machine when it runs the script and in the sshd
  session environment, which ``userdata.agent_command()`` expands.
* ``handle_signals=False`` leaves SIGINT/SIGTERM alone (atexit cleanup stays).

boto3 is imported here and in the modules of this package only.
Must not import: the scheduler, the executor, paramiko (SSH goes through
``vmexec.transports.ssh``).
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import datetime
import ipaddress
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

import boto3
from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.environment import PreparedEnvironment, prepare_environment
from vmexec.environment.install import built_builds, redact_urls, stdin_command
from vmexec.environment.stage import delete_staging, stage_artifacts
from vmexec.environment.preflight import manylinux_for_images
from vmexec.errors import CapacityError, ConfigError, EnvSyncError, QuotaError, TransportError
from vmexec.guardrails.budget import CostPlan, TeardownReport
from vmexec.guardrails.pricing import PriceBook
from vmexec.providers.base import MachineRecord, MachineState, Provider
from vmexec.providers.ec2 import resources
from vmexec.providers.ec2.clients import ClientFactory, in_every_region
from vmexec.providers.ec2.fleet import (
    InstanceWatcher,
    Launcher,
    RegionClients,
    RegionLaunchSetup,
    describe_region,
    describe_regions,
)
from vmexec.providers.ec2.network import ClientNetwork, RegionAccess, detect_ssh_cidr, \
    validate_lookup
from vmexec.providers.ec2 import network as client_network
from vmexec.providers.ec2.named import Ledger, NamedFleetState, adopt, check_owner, \
    find_named, fleet_id_for, trust_recorded
from vmexec.providers.ec2.images import (
    ImageInfo,
    check_root_volume,
    resolve_images,
    validate_ami_option,
)
from vmexec.providers.ec2.plan import (
    Plan,
    RegionFacts,
    allocate,
    as_name_list,
    check_regions,
    make_plan,
)
from vmexec.providers.ec2.userdata import (
    DEFAULT_MAX_LIFETIME,
    FAILED,
    NOTICE_FILE,
    READY,
    BootSpec,
    FleetKeys,
    agent_command,
    keep_active_command,
    named_fleet_directory,
    probe_command,
    render_userdata,
    script_text,
)
from vmexec.transports.base import Transport
from vmexec.transports.ssh import open_ssh_transport

__all__ = ["EC2Provider", "agent_command", "detect_ssh_cidr"]

log = logging.getLogger(__name__)

_DEFAULT_REGION = "us-east-1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# A machine lost this long after this computer's address changed is reconnected to,
# not replaced (its connection broke with the old network; the machine still runs).
_RECONNECT_WINDOW = 120.0
# After a launch found no capacity (or hit a quota), launch() adds nothing for this
# long, so that the scheduler does not hammer EC2 with the same failing request.
_LAUNCH_COOLDOWN = 60.0
# Each SSH probe waits this long on the machine for the boot to finish before the
# client reconnects: few connections per machine, and a timely answer.
_PROBE_WAIT = 30
_CONSOLE_TAIL = 2000
# How long a named fleet's machines stay on without a client, unless keepalive= says.
_NAMED_KEEPALIVE = 600.0
# Every option, for the message about an unknown one.
_OPTIONS = ("instance_type", "regions", "arm", "spot", "ami", "ssh_cidr", "address_lookup",
            "iam_instance_profile", "root_volume_gb", "tags", "name", "packages",
            "index_url", "find_links", "wheel_urls", "session", "endpoint_url",
            "slots_per_machine", "boot_timeout", "max_lifetime", "keepalive", "ssh_user", "address_for",
            "boot_env", "handle_signals", "environment", "exclude", "env", "forward_env")


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

    def __init__(
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
        # -- options that need no AWS call ---------------------------------------------
        if unknown:
            raise ConfigError(
                f"provider 'ec2' does not take option(s) {', '.join(sorted(unknown))}; it "
                f"accepts {', '.join(_OPTIONS)} (and the executor's timing options)")
        if max_workers is None:
            raise ConfigError("provider='ec2' needs max_workers= (task slots across the "
                              "fleet): the fleet is sized from it")
        _positive("max_workers", max_workers, integer=True, allow_none=False)
        if instance_type is None:
            raise ConfigError("provider='ec2' needs instance_type=, e.g. 'c7g.large' or "
                              "['c7g.large', 'c7i.large']")
        self.instance_types = as_name_list(instance_type, "instance_type",
                                           "'c7g.large' or ['c7g.large', 'c7i.large']")
        if arm not in (None, True, False):
            raise ConfigError(f"arm must be True (arm64 only), False (x86_64 only) or None "
                              f"(types as listed), not {arm!r}")
        if not isinstance(spot, bool):
            raise ConfigError(f"spot must be True or False, not {spot!r}")
        self.ami = validate_ami_option(ami)
        self.root_volume_gb = _positive("root_volume_gb", root_volume_gb, integer=True)
        self.slots_per_machine = _positive("slots_per_machine", slots_per_machine,
                                           integer=True)
        self.boot_timeout = float(_positive("boot_timeout", boot_timeout, integer=False,
                                            allow_none=False))
        self.max_lifetime = _positive("max_lifetime", max_lifetime, integer=False)
        self.keepalive = float(_positive("keepalive", keepalive, integer=False) or
                               _NAMED_KEEPALIVE)
        if iam_instance_profile is not None and (not isinstance(iam_instance_profile, str)
                                                 or not iam_instance_profile.strip()):
            raise ConfigError(f"iam_instance_profile must be an instance profile name or "
                              f"ARN, not {iam_instance_profile!r}")
        self.iam_instance_profile = iam_instance_profile
        self.user_tags = resources.validate_user_tags(tags)
        if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
            raise ConfigError(f"name must be 1-63 letters, digits, '.', '_' or '-', "
                              f"not {name!r}")
        self.fleet_name = name
        self.packages = _strings("packages", packages, "['numpy==2.0', 'pandas']")
        self.find_links = (find_links,) if isinstance(find_links, str) else \
            _strings("find_links", find_links, "['https://mirror/wheels/']")
        self.wheel_urls = _strings("wheel_urls", wheel_urls, "['https://.../vmexec.whl']")
        if index_url is not None and (not isinstance(index_url, str) or not index_url):
            raise ConfigError(f"index_url must be a URL string, not {index_url!r}")
        self.index_url = index_url
        if environment is not None and (packages or wheel_urls):
            raise ConfigError(
                "packages=/wheel_urls= go with environment=None (the image's Python); with "
                f"environment={environment!r} install them here (they are captured) or "
                "list them: environment=['numpy==2.1', ...]")
        if address_for is not None and not callable(address_for):
            raise ConfigError("address_for must be a callable record -> (host, port)")
        self.address_for = address_for or _default_address
        self.boot_env = dict(boot_env or {})
        for key, value in self.boot_env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(f"boot_env must map str to str, got {key!r}: {value!r}")
        self.ssh_user = ssh_user
        # Who may reach port 22 is found when the first machine is launched, not here:
        # a plan, its price and dry_run need no network (see network.ClientNetwork).
        self.ssh_cidr: Optional[str] = None
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
            self.ssh_cidr = str(network)
        self.network = ClientNetwork(self.ssh_cidr, validate_lookup(address_lookup))
        self._access: dict[str, RegionAccess] = {}  # region -> how its machines are reached
        self._groups: dict[str, str] = {}  # region -> the fleet's security group
        # Machines lost because this computer changed networks (their SSH connections
        # broke): kept, and handed back by the next launch() to be reconnected.
        self._reconnect: list[MachineRecord] = []
        self._reconnects: dict[str, int] = {}  # instance id -> times kept so
        self._really_lost: set[str] = set()  # lost, and the address had not changed
        # Kept by launch() before the scheduler's terminate() of them arrived: skip that.
        self._skip_terminate: set[str] = set()
        self._moved_at = -math.inf  # when the security groups last followed the address
        if endpoint_url is not None and not isinstance(endpoint_url, str):
            raise ConfigError(f"endpoint_url must be a URL string, not {endpoint_url!r}")
        self.endpoint_url = endpoint_url
        if session is None:
            session = boto3.Session()
        elif not hasattr(session, "client"):
            raise ConfigError(f"session must be a boto3.Session, not {session!r}")
        self.session = session
        #: Prices for the plan's $/h and the cost receipt (live where the account
        #: allows, else the bundled table; see ``vmexec.guardrails.pricing``).
        # A custom endpoint (a mirror of EC2, or moto in tests) has no AWS Price List
        # behind it: use the bundled, dated table rather than asking it.
        self.prices = PriceBook(session=session, endpoint_url=endpoint_url,
                                live=endpoint_url is None)
        if session.get_credentials() is None:
            raise ConfigError(
                "no AWS credentials found: configure them (`aws configure`, AWS_PROFILE, "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or pass session=boto3."
                "Session(profile_name=...). Or try provider='local' first")
        home = session.region_name or _DEFAULT_REGION
        self.regions = as_name_list(regions if regions is not None else home, "regions",
                                    "'us-east-1' or ['us-east-1', 'us-west-2']")
        self.spot = spot
        self.max_workers = max_workers
        self.fleet_id = fleet_id_for(name) if name else f"vmx-{secrets.token_hex(4)}"
        self.created = resources.utc_now()
        # The process that owns the fleet. A child forked from it (a ProcessPoolExecutor
        # in the same program) inherits this object, the atexit hooks and the signal
        # handlers: it must never tear the parent's fleet down.
        self._owner_pid = os.getpid()
        self.tags = resources.fleet_tags(self.fleet_id, name=name, user_tags=self.user_tags,
                                         created=self.created)
        if name:
            # Marks this client's machines of a named fleet as in use (see named.adopt).
            self.client_tag = {"Key": resources.TAG_CLIENT,
                               "Value": f"{os.getpid()}@{socket.gethostname()} "
                                        f"{resources.utc_now().isoformat(timespec='seconds')}"}
            self.tags[resources.TAG_CLIENT] = self.client_tag["Value"]

        # -- clients: one factory (one config; throttling retried by every client) -----
        self.aws = ClientFactory(session, endpoint_url)
        self.clients = {r: RegionClients(r, self.aws.ec2(r), self.aws.ssm(r))
                        for r in self.regions}
        home_ec2 = self.aws.ec2(home)
        # Who owns what this fleet creates: the AWS identity (STS), which nobody can
        # claim for another, so that `vmexec cleanup` deletes only the caller's own.
        self.owner = resources.caller_owner(self.aws.sts(home))
        self.tags[resources.TAG_OWNER] = self.owner

        # -- what AWS offers: validation and the plan (no resource is created) ---------
        check_regions(self.regions, describe_regions(home_ec2))
        facts = self._per_region(lambda r: describe_region(self.clients[r],
                                                           self.instance_types))
        self.facts: dict[str, RegionFacts] = facts
        self.plan: Plan = make_plan(facts, self.instance_types, self.regions,
                                    max_workers=max_workers, arm=arm, spot=spot,
                                    slots_per_machine=self.slots_per_machine)
        self.type_infos = {t: info for f in facts.values() for t, info in f.types.items()}
        self.images: dict[str, dict[tuple[str, bool], ImageInfo]] = self._per_region(
            self._images_for)
        for region, images in self.images.items():
            check_root_volume(images, self.root_volume_gb, region)
        self._price_plan()
        log.info("fleet %s plan:\n%s", self.fleet_id, self.plan.text())
        # A named fleet: what an earlier run left running, to reuse (describe calls only).
        self._named: dict[str, NamedFleetState] = {}
        self._adoptable: list[MachineRecord] = []
        self._unwanted: dict[str, list[str]] = {}
        # A named fleet's record of the ids this computer launched (with its keys):
        # only those are adopted, never what merely carries the fleet's tag.
        self._ledger: Optional[Ledger] = None
        if name:
            self._named = self._per_region(
                lambda r: find_named(self.clients[r].ec2, r, self.fleet_id))
            check_owner(self._named, name, self.owner)
            self._ledger = Ledger(named_fleet_directory(self.fleet_id))
            trust_recorded(self._named, self._ledger, self.owner)
            planned = {(line.region, line.instance_type): self.type_infos[line.instance_type]
                       for line in self.plan.lines}
            slots = {line.instance_type: line.slots_per_machine for line in self.plan.lines}
            self._adoptable, self._unwanted = adopt(self._named, planned, slots.__getitem__,
                                                    self.name)
        # Capture, resolve per architecture and build before anything exists: a package
        # without a build for an arch of the plan is an EnvSyncError now, not on
        # machine 1,731.
        self.environment: Optional[PreparedEnvironment] = prepare_environment(
            environment, sorted({line.arch for line in self.plan.lines}), exclude=exclude,
            env=env, forward_env=forward_env, index_url=index_url,
            find_links=self.find_links,
            # Wheels built for the images' own glibc (Amazon Linux 2023: 2.34) install there.
            manylinux=manylinux_for_images(
                f"{image.source} {image.name}" for per_region in self.images.values()
                for image in per_region.values()))
        self._install_scripts: dict[str, str] = {}  # region -> staged install script
        # region -> staged artifacts, and the sha256 of shared builds this fleet's
        # machines reported ("<sdist>/<arch>" -> sha256): only those are installed.
        self._staged: dict[str, list[Any]] = {}
        self._build_hashes: dict[str, dict[str, str]] = {}
        self._staging_lock = threading.Lock()

        # -- state -----------------------------------------------------------------------
        self._lock = threading.Lock()  # records, setups, keys
        self._launch_lock = threading.Lock()  # one launch at a time; teardown waits for it
        self._teardown_lock = threading.Lock()
        self._records: dict[str, MachineRecord] = {}
        self._setups: dict[str, RegionLaunchSetup] = {}
        self._setup_locks = {r: threading.Lock() for r in self.regions}
        self._keys: Optional[FleetKeys] = None
        self._userdata: Optional[str] = None
        self._closed = False
        self._destroy = False  # set by signals: a named fleet is removed, not kept warm
        # Set with _closed: wakes connect threads pausing between SSH attempts.
        self._closing = threading.Event()
        self._probes: set[Transport] = set()  # boot probes in flight, closed at teardown
        self._roots: dict[str, str] = {}  # instance id -> its $VMEXEC_ROOT ("" on EC2)
        self._blocked_until = 0.0
        self._background: Optional[threading.Thread] = None
        # Reentrant: a signal handler may run while the main thread is inside this lock.
        self._background_lock = threading.RLock()
        self._current_launch: Optional[list[MachineRecord]] = None
        self.teardown_summary: Optional[resources.TeardownSummary] = None
        self._watchers = {r: InstanceWatcher(self.clients[r].ec2, r) for r in self.regions}
        # The keys exist from here on (a harness may pin a test sshd to them before the
        # first launch); the temporary directory goes at teardown or with the object.
        # Rendering the boot script now checks ssh_user, boot_env and its 16 KB limit.
        self.userdata()
        self._launcher = Launcher(self.plan, self.type_infos, self.clients,
                                  self._region_setup, spot=spot, on_created=self._remember,
                                  provider_name=self.name)
        _register(self, handle_signals)

    # -- helpers for construction ---------------------------------------------------------
    def _per_region(self, fn: Callable[[str], Any]) -> dict[str, Any]:
        return in_every_region(fn, self.regions, name="vmexec-ec2-describe")

    def _price_plan(self) -> None:
        """Fill the plan's $/h from ``self.prices``: every line, regions in parallel."""
        def region_prices(region: str) -> dict[tuple[str, str], Any]:
            found: dict[tuple[str, str], Any] = {}
            for line in self.plan.lines:
                if line.region == region:
                    price = self.prices.hourly(line.instance_type, region, spot=self.spot)
                    found[line.key] = None if price is None else \
                        (price.usd_per_hour, price.source)
            return found

        prices: dict[tuple[str, str], Any] = {}
        for part in self._per_region(region_prices).values():
            prices.update(part)
        self.plan.set_prices(prices)

    def _images_for(self, region: str) -> dict[tuple[str, bool], ImageInfo]:
        wanted = {(line.arch, line.gpus > 0) for line in self.plan.lines
                  if line.region == region}
        return resolve_images(self.clients[region].ssm, self.clients[region].ec2, region,
                              wanted, self.ami)

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
            login_user=self.ssh_user, wheel_urls=self.wheel_urls, packages=self.packages,
            index_url=self.index_url, find_links=self.find_links,
            heartbeat_grace=int(self.boot_timeout + 600),
            agent_grace=int(self.keepalive) if self.fleet_name else 300,
            max_lifetime=int(self.max_lifetime or DEFAULT_MAX_LIFETIME), env=self.boot_env,
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
                self._region_access(region)
            started_here: list[MachineRecord] = []
            regions_before = set(self._setups)
            self._current_launch = started_here
            try:
                report = self._launcher.launch(wants)
            except BaseException as exc:
                self._undo_launch(started_here, set(self._setups) - regions_before, exc)
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
            self._region_setup(region)
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
            summary = resources.teardown(
                {r: self.clients[r].ec2 for r in new_regions}, self.fleet_id,
                instance_ids={r: by_region.get(r, []) for r in new_regions})
            if not summary.clean:
                log.error("undoing the failed launch left resources: %s", summary.text())
            with self._lock:
                for region in new_regions:
                    self._setups.pop(region, None)
        for region, ids in by_region.items():
            if region not in new_regions:
                self._terminate_ids(region, ids)

    # -- reaching the machines (network.py) ---------------------------------------------
    def _region_access(self, region: str) -> RegionAccess:
        """Who may reach port 22 in ``region`` and which address to dial (found once)."""
        with self._lock:
            known = self._access.get(region)
        if known is not None:
            return known
        access = self.network.access(region, self.facts[region].vpc_id)
        with self._lock:
            return self._access.setdefault(region, access)

    def _dial_address(self, region: str, entry: Mapping[str, Any]) -> Optional[str]:
        """The address of a running instance to SSH to: private in the client's own VPC,
        else public (private when it has none)."""
        access = self._access.get(region)
        if access is not None and access.private:
            return entry.get("PrivateIpAddress") or entry.get("PublicIpAddress")
        return entry.get("PublicIpAddress") or entry.get("PrivateIpAddress")

    def _follow_address(self, force: bool = False) -> None:
        """After an SSH failure: if this computer's public address changed (another
        network), admit the new one and revoke the old in every region dialled by it."""
        moved = self.network.moved(force=force)
        if moved is None:
            return
        self._moved_at = time.monotonic()
        old, new = moved
        with self._lock:
            regions = [r for r, a in self._access.items() if a.automatic]
            for region in regions:
                self._access[region] = dataclasses.replace(self._access[region], cidr=new)
            groups = {r: self._groups[r] for r in regions if r in self._groups}
        for region, group_id in groups.items():
            client_network.follow(self.clients[region].ec2, region, group_id, old, new)

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
            automatic = any(a.automatic for a in self._access.values())
        if not lost or not automatic or self._closed:
            return records
        self._follow_address(force=time.monotonic() - self._moved_at > _RECONNECT_WINDOW)
        if time.monotonic() - self._moved_at > _RECONNECT_WINDOW:
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

    def _region_setup(self, region: str) -> RegionLaunchSetup:
        """The region's security group and launch template, created on first use."""
        with self._setup_locks[region]:
            setup = self._setups.get(region)
            if setup is not None:
                return setup
            ec2 = self.clients[region].ec2
            facts = self.facts[region]
            images = self.images[region]
            named = self._named.get(region)
            if named is not None and named.security_group:
                # A named fleet's group, from an earlier run: its machines still use it.
                group_id = named.security_group
                access = self._region_access(region)
                resources.allow_ssh(ec2, region, group_id, access.cidr)
                if access.source_groups:
                    client_network.allow_groups(ec2, region, group_id, access.source_groups)
                # Earlier runs' addresses go: only this client's way in stays open.
                resources.restrict_ingress(ec2, region, group_id, access.cidr,
                                           access.source_groups or ())
                for template_id in named.launch_templates:
                    resources.delete_launch_template(ec2, region, template_id)
            else:
                access = self._region_access(region)
                group_id = resources.create_security_group(
                    ec2, region, vpc_id=facts.vpc_id, fleet_id=self.fleet_id,
                    ssh_cidr=access.cidr, tags=self.tags)
                if self._ledger is not None:
                    self._ledger.add(region, group=group_id)
                if access.source_groups:
                    try:
                        client_network.allow_groups(ec2, region, group_id,
                                                    access.source_groups)
                    except BaseException:
                        resources.teardown({region: ec2}, self.fleet_id)
                        raise
            with self._lock:
                self._groups[region] = group_id
            try:
                data, block_devices = self._template_data(region, group_id, images)
                template_id = resources.create_launch_template(
                    ec2, region, fleet_id=self.fleet_id, data=data, tags=self.tags)
            except BaseException:
                resources.teardown({region: ec2}, self.fleet_id)
                raise
            setup = RegionLaunchSetup(region=region, launch_template_id=template_id,
                                      images=images, subnets=facts.subnets,
                                      block_devices=block_devices)
            with self._lock:
                self._setups[region] = setup
            return setup

    def _template_data(self, region: str, group_id: str,
                       images: Mapping[tuple[str, bool], ImageInfo]
                       ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """Launch template data, and per-image root mappings when images differ."""
        def root(image: ImageInfo) -> list[dict[str, Any]]:
            ebs: dict[str, Any] = {"Encrypted": True, "DeleteOnTermination": True,
                                   "VolumeType": "gp3"}
            if self.root_volume_gb:
                ebs["VolumeSize"] = self.root_volume_gb
            return [{"DeviceName": image.root_device, "Ebs": ebs}]

        first = next(iter(images.values()))
        data: dict[str, Any] = {
            "ImageId": first.image_id,
            "SecurityGroupIds": [group_id],
            "UserData": base64.b64encode(self.userdata().encode("utf-8")).decode("ascii"),
            # IMDSv2 only: a server-side request forgery on the machine cannot read the
            # instance's role credentials with a plain GET.
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            # The agent's watchdog and the dead-man loop power off: that must end billing.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": resources.tag_specifications(["instance", "volume"],
                                                              self.tags),
        }
        if self.iam_instance_profile:
            key = "Arn" if self.iam_instance_profile.startswith("arn:") else "Name"
            data["IamInstanceProfile"] = {key: self.iam_instance_profile}
        block_devices: dict[str, list[dict[str, Any]]] = {}
        if len({image.root_device for image in images.values()}) == 1:
            data["BlockDeviceMappings"] = root(first)
        else:
            block_devices = {image.image_id: root(image) for image in images.values()}
        return data, block_devices

    # -- connect -----------------------------------------------------------------------------
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
        clock = retry.current_clock()
        deadline = clock.monotonic() + min(timeout, self.boot_timeout)
        entry = self._watchers[record.region or ""].wait_running(record.id, deadline)
        record.state = MachineState.RUNNING
        record.address = self._dial_address(record.region or "", entry)
        record.zone = entry.get("Placement", {}).get("AvailabilityZone", record.zone)
        host, port = self.address_for(record)
        keys = self._ensure_keys()

        def ssh(command: str, seconds: float) -> Transport:
            try:
                return open_ssh_transport(
                    host, port, self.ssh_user, key_filename=keys.client_key,
                    known_hosts=keys.known_hosts, host_key_policy="reject",
                    command=command,
                    timeout=max(0.5, min(seconds, deadline - clock.monotonic())),
                    label=record.label)
            except TransportError:
                # A laptop on another network is no longer admitted by the fleet's
                # security groups: follow it, and the next attempt gets through.
                self._follow_address()
                raise

        def probe() -> None:
            remaining = deadline - clock.monotonic()
            wait = int(max(1, min(_PROBE_WAIT, remaining)))
            transport = ssh(probe_command(wait), 30.0)
            with self._lock:
                self._probes.add(transport)
            try:
                output = _read_all(transport, wait + 30.0)
            finally:
                with self._lock:
                    self._probes.discard(transport)
            first, _, rest = output.partition("\n")
            status, _, root = first.strip().partition(" ")
            if status == READY:
                with self._lock:
                    self._roots[record.id] = root.strip()
                return
            if status == FAILED:
                raise _BootFailed(rest.strip())
            raise TransportError(f"{record.label} is still booting"
                                 + (f"; boot log ends:\n{rest[-800:]}" if rest else ""))

        policy = retry.booting(deadline, record.label, retry_on=(TransportError,),
                               abort=self._closing, clock=clock)
        try:
            policy(probe)
            if self.environment is not None:
                self._install_environment(record, ssh, deadline - clock.monotonic())
            transport = policy(ssh, agent_command(
                agent_grace=int(self.keepalive) if self.fleet_name else None,
                note_start=True), 30.0)
        except _BootFailed as failed:
            raise TransportError(f"{record.label}: the boot script failed: {failed}") from None
        except TransportError as exc:
            if self._closed:
                raise TransportError(f"{record.label}: the fleet is shutting down") from None
            console = self._console_tail(record)
            raise TransportError(
                f"{record.label} was not ready within {min(timeout, self.boot_timeout):.0f}s "
                f"(boot_timeout): last error: {exc}"
                + (f"\nconsole output ends:\n{console}" if console else "")) from exc
        return transport

    def _install_script(self, region: str) -> str:
        """The environment's install script for ``region``, staging its artifacts once.

        Artifacts go to the region's staging bucket once (content-addressed: unchanged
        ones are not uploaded again), whatever the number of machines.
        """
        assert self.environment is not None
        with self._staging_lock:
            script = self._install_scripts.get(region)
            if script is None:
                staged = stage_artifacts(self.session, [region], self.fleet_id,
                                         self.environment.artifacts,
                                         archs=self.environment.archs, tags=self.tags,
                                         endpoint_url=self.endpoint_url)[region]
                self._staged[region] = list(staged.artifacts)
                script = self._install_scripts[region] = self.environment.script(
                    staged.artifacts, build_sha256=self._build_hashes.get(region))
            return script

    def _learn_builds(self, region: str, output: str) -> None:
        """Record the shared builds a machine reported; later installs may use them."""
        learned = built_builds(output)
        if not learned or self.environment is None:
            return
        with self._staging_lock:
            known = self._build_hashes.setdefault(region, {})
            new = {k: v for k, v in learned.items() if k not in known}
            if new and region in self._staged:
                known.update(new)
                self._install_scripts[region] = self.environment.script(
                    self._staged[region], build_sha256=known)

    def _install_environment(self, record: MachineRecord,
                             ssh: Callable[[str, float], Transport], seconds: float) -> None:
        """Install the synced environment over SSH, after the boot script is done.

        Over SSH rather than in user-data: the install script carries presigned S3 URLs
        (which name the access key id, and a session token with temporary credentials);
        user-data is readable by every process on the machine for its whole life, the
        SSH channel is not. The machine pulls the artifacts itself: the client's upload
        does not grow with the number of machines.
        """
        script = self._install_script(record.region or "")
        # The script (presigned URLs) goes on stdin: a command line is world-readable
        # on the machine (ps) and appears in debug logs.
        runner, payload = stdin_command(script)
        command = keep_active_command(
            "PY=$(cat \"${VMEXEC_ROOT:-}/var/lib/vmexec/python\" 2>/dev/null); "
            f"export PY; {runner} 2>&1 && echo {_INSTALLED}")
        transport = ssh(command, 60.0)
        try:
            transport.write(payload)
        except TransportError:
            pass  # _read_all reports what the machine said
        output = _read_all(transport, max(60.0, seconds))
        self._learn_builds(record.region or "", output)
        if _INSTALLED not in output:
            raise _BootFailed("installing the environment failed:\n"
                              + redact_urls(output[-1500:]))

    def agent_options(self, record: MachineRecord) -> dict[str, object]:
        """Tell the agent where spot interruption notices appear, and how to power off.

        The notice file is the one the boot script's metadata poller writes, under the
        machine's ``$VMEXEC_ROOT`` as the boot probe reported it. Power-off honours
        ``$VMEXEC_POWEROFF`` in the machine's environment (as the boot script's dead-man
        loop does), else ``shutdown -h now`` (through ``sudo -n`` when not root).
        """
        with self._lock:
            root = self._roots.get(record.id, "")
        options: dict[str, object] = {"notice_file": f"{root.rstrip('/')}/{NOTICE_FILE}",
                                      "poweroff": _POWEROFF}
        if self.environment is not None:
            # The skew guard's expected value, and the workers' environment variables
            # (over SSH: never in user-data, which anyone on the machine can read).
            options["environment_hash"] = self.environment.token
            options["env"] = dict(self.environment.spec.env)
        return options

    def _console_tail(self, record: MachineRecord) -> str:
        try:
            answer = self.clients[record.region or ""].ec2.get_console_output(
                InstanceId=record.id, Latest=True)
        except ClientError as exc:
            log.debug("no console output for %s: %s", record.id, exc)
            return ""
        return str(answer.get("Output") or "")[-_CONSOLE_TAIL:]

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
        with self._lock:
            probes = list(self._probes)
        for transport in probes:
            transport.close()

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
                    touched = bool(self._setups or self._records)
                    left_before = any(state.instances or state.security_group
                                      or state.launch_templates
                                      for state in self._named.values())
                clients = {r: c.ec2 for r, c in self.clients.items()}
                if keep and touched:
                    summary = resources.keep_warm(clients, self.fleet_id,
                                                  instance_ids=by_region,
                                                  keepalive=self.keepalive)
                elif touched or (left_before and not keep):
                    summary = resources.teardown(clients, self.fleet_id,
                                                 instance_ids=by_region)
                else:  # nothing was ever launched: nothing to delete or verify
                    summary = resources.TeardownSummary(fleet=self.fleet_id,
                                                        regions=list(self.regions))
                kept = {r.id for r in summary.kept}
                with self._lock:
                    for record in self._records.values():
                        if record.id not in kept:
                            record.state = MachineState.TERMINATED
                    # Kept machines have their environment: its staged copy may serve
                    # them again (the bucket's lifecycle rule expires it otherwise).
                    staged_regions = [] if kept else list(self._install_scripts)
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
            _unregister(self)

    def sweep(self) -> list[str]:
        """Remove what earlier runs *of this user on this computer* left in this fleet's
        regions: other fleets with the same ``vmexec:owner``, older than two hours.

        Other owners' fleets may be alive and are never touched here; ``vmexec cleanup``
        is the tool for those.
        """
        me = self.owner
        summary = resources.sweep(
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


# The agent's power-off argv: the same override as the boot script's dead-man loop.
_POWEROFF = ["sh", "-c", 'cmd="${VMEXEC_POWEROFF:-}"; if [ -z "$cmd" ]; then '
                         'if [ "$(id -u)" = 0 ]; then cmd="shutdown -h now"; '
                         'else cmd="sudo -n shutdown -h now"; fi; fi; eval "$cmd"']


class _BootFailed(Exception):
    """The boot script wrote its ``failed`` marker: not worth retrying."""


def _default_address(record: MachineRecord) -> tuple[str, int]:
    if not record.address:
        raise TransportError(f"{record.label} has no IP address")
    return record.address, 22


_INSTALLED = "__VMEXEC_ENVIRONMENT_INSTALLED__"


def _read_all(transport: Transport, timeout: float) -> str:
    """Everything ``transport`` sends until EOF (closed after ``timeout`` seconds)."""
    timer = threading.Timer(timeout, transport.close)
    timer.daemon = True
    timer.start()
    chunks = []
    try:
        while True:
            data = transport.read(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        timer.cancel()
        transport.close()
    return b"".join(chunks).decode("utf-8", "replace")


# --- interpreter exit and signals -----------------------------------------------------------
#
# One process-wide set of handlers, installed with the first provider, tears down every
# live provider. (One handler per provider would chain ever deeper and could not be
# removed in any order.) The previous handlers are kept and called after ours.
#
# A handler never blocks: it starts the teardown in a non-daemon thread and lets the main
# thread unwind (KeyboardInterrupt for SIGINT, SystemExit for SIGTERM), so locks the main
# thread holds are released; the interpreter waits for the thread before exiting, and
# ``_at_exit`` tears down whatever is still live.

# Strong references: a provider must stay reachable until its resources are gone.
_live: set[EC2Provider] = set()
_live_lock = threading.Lock()
_previous: dict[int, Any] = {}
_installed = False


def _register(provider: EC2Provider, handle_signals: bool) -> None:
    global _installed
    with _live_lock:
        _live.add(provider)
        if _installed:
            return
        _installed = True
    atexit.register(_at_exit)
    if not handle_signals or threading.current_thread() is not threading.main_thread():
        log.debug("not installing signal handlers (handle_signals=%s, thread %s)",
                  handle_signals, threading.current_thread().name)
        return
    # SIGHUP too: a closed terminal or a dropped SSH session to the client's computer
    # must not leave the fleet running until the machines notice.
    hangup = getattr(signal, "SIGHUP", None)  # POSIX only
    for signum in (signal.SIGINT, signal.SIGTERM) + ((hangup,) if hangup else ()):
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN or previous is None:
            continue  # ignored on purpose, or owned by non-Python code: leave it
        _previous[signum] = previous
        signal.signal(signum, _on_signal)


def _unregister(provider: EC2Provider) -> None:
    with _live_lock:
        _live.discard(provider)


def _on_signal(signum: int, frame: Any) -> None:
    # No lock here: the main thread may be holding _live_lock when the signal arrives.
    providers = list(_live)
    for provider in providers:
        provider.start_background_teardown()
    if providers:
        print(f"vmexec: {signal.Signals(signum).name}: tearing down {len(providers)} EC2 "
              "fleet(s); a second Ctrl-C abandons it (then run `vmexec cleanup`)",
              file=sys.stderr, flush=True)
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        # For SIGINT usually signal.default_int_handler: KeyboardInterrupt, as expected.
        previous(signum, frame)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    # SIG_DFL would end the process at once; exit with the same status instead, after
    # the teardown thread (the interpreter joins it) and atexit have run.
    raise SystemExit(128 + signum)


def _at_exit() -> None:
    # terminate(None) waits for a teardown a signal started, or does it now.
    for provider in list(_live):
        provider.terminate(None)
