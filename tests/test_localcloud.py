"""The local cloud: the harness itself, then vmexec's EC2 provider end to end on it.

Part 1 checks ``vmexec.testing.localcloud`` with boot scripts written here: an instance
launched in moto boots as a fake VM that runs its user-data, answers SSH with the pinned
host key, stops when terminated or when it powers itself off, and every fault behaves.

Part 2 runs ``VMExecutor(provider="ec2")`` against it: plan → launch → user-data → SSH →
agent → tasks → teardown, fully offline, including a machine killed mid-task, and checks
that nothing tagged is left in any region.

One ``LocalCloud`` serves the whole module (starting one costs about a second, building
and repacking wheels once per process). Nothing here reaches a real endpoint: the cloud
refuses any request whose URL is not its moto server, and the module checks at the end
that none was attempted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import boto3
import psutil
import botocore.config
import botocore.exceptions
import pytest

from vmexec.errors import TransportError
from vmexec.testing.fakevm import INTERRUPTION_NOTICE, FakeVM, find_processes
from vmexec.testing.faults import FaultInjector
from vmexec.testing.localcloud import LocalCloud, OffMachineRequestError
from vmexec.transports.ssh import SSHTransport, open_ssh_transport

from helpers import local_cloud

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180)]

REGION = "us-east-1"
OTHER_REGION = "us-west-2"


class Keys:
    """A host key the boot scripts install (pinned by the client) and a client key."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(directory / name)], check=True, timeout=60)
        self.host_private = (directory / "host").read_text()
        self.host_public = (directory / "host.pub").read_text().strip()
        self.client_key = str(directory / "client")
        self.client_public = (directory / "client.pub").read_text().strip()
        self.known_hosts = str(directory / "known_hosts")
        # Any address: every fake VM of these tests gets the same pinned key.
        Path(self.known_hosts).write_text("* " + " ".join(self.host_public.split()[:2]) + "\n")


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    yield from local_cloud(REGION)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def launched(cloud: LocalCloud) -> Iterator[list[tuple[str, str]]]:
    """(region, instance id) of what a test launched; terminated after the test."""
    ids: list[tuple[str, str]] = []
    yield ids
    by_region: dict[str, list[str]] = {}
    for region, instance_id in ids:
        by_region.setdefault(region, []).append(instance_id)
    for region, chunk in by_region.items():
        cloud.client(region).terminate_instances(InstanceIds=chunk)
    for _region, instance_id in ids:
        # An instance terminated before the watcher saw it running never gets a VM.
        vm = cloud.vms.get(instance_id)
        assert vm is None or vm.stopped.wait(30), f"{instance_id} did not stop"
    alive = [i["InstanceId"] for i in cloud.instances()
             if i["State"]["Name"] in ("pending", "running")]
    assert alive == [], f"the test left instances running: {alive}"


_AMIS: dict[str, str] = {}


def ami(cloud: LocalCloud, region: str) -> str:
    if region not in _AMIS:
        images = cloud.client(region).describe_images(Owners=["amazon"])["Images"]
        _AMIS[region] = images[0]["ImageId"]
    return _AMIS[region]


def user_data(keys: Keys, *, before_keys: str = "", after_reload: str = "") -> str:
    """A small boot script in the shape of vmexec's: logs, keys, sshd restart, ready."""
    return f"""#!/bin/bash
set -u
R="${{VMEXEC_ROOT:-}}"
mkdir -p "$R/etc/ssh" "$R/root/.ssh" "$R/var/lib/vmexec" "$R/var/log"
exec >>"$R/var/log/vmexec-boot.log" 2>&1
fail() {{ echo "FAILED: $*"; echo "$*" >"$R/var/lib/vmexec/failed"; exit 1; }}
echo "boot started"
{before_keys}
printf '%s\\n' '{keys.host_private.strip()}' >"$R/etc/ssh/ssh_host_ed25519_key"
chmod 600 "$R/etc/ssh/ssh_host_ed25519_key"
echo '{keys.host_public}' >"$R/etc/ssh/ssh_host_ed25519_key.pub"
echo '{keys.client_public}' >>"$R/root/.ssh/authorized_keys"
eval "${{VMEXEC_SSHD_RELOAD:-systemctl restart sshd}}" || fail "sshd reload failed"
{after_reload}
python3 -c 'import sys; print("python", sys.version_info[:2])' || fail "no usable python3"
touch "$R/var/lib/vmexec/ready"
echo "boot done"
"""


def launch(cloud: LocalCloud, launched: list[tuple[str, str]], script: str,
           count: int = 1, region: str = REGION, **kwargs: Any) -> list[str]:
    ec2 = cloud.session.client("ec2", region_name=region, endpoint_url=cloud.endpoint_url)
    answer = ec2.run_instances(ImageId=ami(cloud, region), MinCount=count, MaxCount=count,
                               InstanceType=kwargs.pop("InstanceType", "c7i.large"),
                               UserData=script, **kwargs)
    ids = [i["InstanceId"] for i in answer["Instances"]]
    launched.extend((region, i) for i in ids)
    return ids


def booted(cloud: LocalCloud, instance_id: str, timeout: float = 60.0) -> FakeVM:
    vm = cloud.vm(instance_id)
    cloud.wait_for(lambda: vm.ready or vm.failed, timeout, f"{instance_id} to boot")
    assert vm.ready, vm.boot_log()
    return vm


def ssh(cloud: LocalCloud, keys: Keys, instance_id: str, command: str,
        timeout: float = 10.0) -> SSHTransport:
    host, port = cloud.address_for(instance_id)
    return open_ssh_transport(host, port, "root", key_filename=keys.client_key,
                              known_hosts=keys.known_hosts, command=command, timeout=timeout)


def run(cloud: LocalCloud, keys: Keys, instance_id: str, command: str) -> str:
    transport = ssh(cloud, keys, instance_id, command)
    try:
        return read_all(transport, 20.0).decode()
    finally:
        transport.close()


def read_all(transport: SSHTransport, timeout: float) -> bytes:
    """Everything the command prints until it ends.

    Raises:
        TimeoutError: it did not end within ``timeout`` (the transport is closed then,
            so a hanging command fails the test instead of hanging it).
    """
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        transport.close()

    timer = threading.Timer(timeout, expire)
    timer.start()
    out = b""
    try:
        while True:
            try:
                chunk = transport.read(65536)
            except TransportError:
                if expired.is_set():
                    raise TimeoutError(f"the command did not end within {timeout:g}s")
                raise
            if not chunk:
                return out
            out += chunk
    finally:
        timer.cancel()


def proc_info(vm: FakeVM, attribute: str) -> set[str]:
    """``name`` or ``status`` of the machine's processes (those that exit while we look
    are skipped)."""
    found = set()
    for proc in vm.processes():
        try:
            found.add(getattr(proc, attribute)())
        except psutil.NoSuchProcess:
            continue
    return found


def ended(transport: SSHTransport) -> bool:
    """Whether the session ends within 10 s: EOF, or a connection that broke (as good as
    EOF for a machine that went away)."""
    try:
        read_all(transport, 10.0)
    except TimeoutError:
        return False
    except TransportError:
        pass
    finally:
        transport.close()
    return True


def instance_state(cloud: LocalCloud, instance_id: str, region: str = REGION) -> str:
    answer = cloud.client(region).describe_instances(InstanceIds=[instance_id])
    return str(answer["Reservations"][0]["Instances"][0]["State"]["Name"])


def refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# --- part 1: the harness --------------------------------------------------------------

def test_instance_boots_runs_user_data_and_answers_ssh_with_pinned_key(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys))
    vm = booted(cloud, instance_id)
    cloud.wait_for(lambda: vm.poll() is not None, 10, "the boot script to end")
    assert vm.boot_exit == 0 and "boot done" in vm.boot_log()
    host, port = cloud.address_for(instance_id)
    assert host.startswith("127.") and host != "127.0.0.1"
    out = run(cloud, keys, instance_id,
              'echo "$VMEXEC_ROOT"; command -v shutdown; command -v python3; echo "$HOME"')
    root, shutdown_path, python_path, home = out.split()
    assert root == str(vm.root)
    # The machine's power-off commands are the harness's shims, never this computer's.
    assert shutdown_path.startswith(str(cloud.workdir))
    assert python_path.startswith(str(cloud.workdir))
    assert home == str(vm.root / "root")
    # No AWS credential reaches a machine.
    assert "AWS_" not in run(cloud, keys, instance_id, "env")


def test_each_machine_has_its_own_address(cloud: LocalCloud, keys: Keys,
                                          launched: list[tuple[str, str]]) -> None:
    ids = launch(cloud, launched, user_data(keys), count=3)
    addresses = {cloud.address_for(i) for i in ids}
    assert len(addresses) == 3
    for instance_id in ids:
        booted(cloud, instance_id)
        assert run(cloud, keys, instance_id, 'echo "$VMEXEC_ROOT"').strip().endswith(
            f"{instance_id}/root")


def test_sshd_shows_another_key_until_the_boot_script_installs_the_pinned_one(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    # The script waits for a gate file before it installs the keys: meanwhile the
    # image's own sshd answers with its own key, as on a real machine.
    gate = 'for i in $(seq 600); do [ -e "$R/gate" ] && break; sleep 0.05; done'
    [instance_id] = launch(cloud, launched, user_data(keys, before_keys=gate))
    vm = cloud.vm(instance_id)
    address = cloud.address_for(instance_id)
    cloud.wait_for(lambda: not refused(address), 20, "the image's sshd")
    with pytest.raises(TransportError) as caught:
        ssh(cloud, keys, instance_id, "true")
    assert "host key" in str(caught.value).lower()
    (vm.root / "gate").touch()
    booted(cloud, instance_id)
    assert run(cloud, keys, instance_id, "echo pinned").strip() == "pinned"


def test_terminate_stops_the_machine_and_all_its_processes(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    # A daemonised process (its own session, parent gone) must be found and stopped too.
    daemon = 'setsid nohup sleep 600 >/dev/null 2>&1 < /dev/null &'
    [instance_id] = launch(cloud, launched, user_data(keys, after_reload=daemon))
    vm = booted(cloud, instance_id)
    session = ssh(cloud, keys, instance_id, "echo up; exec sleep 600")
    assert session.read(3) == b"up\n"
    assert {"sshd", "sleep"} <= proc_info(vm, "name")
    cloud.session.client("ec2", endpoint_url=cloud.endpoint_url).terminate_instances(
        InstanceIds=[instance_id])
    assert vm.stopped.wait(15)
    assert vm.processes() == []
    assert find_processes({vm.marker})[vm.marker] == []
    assert refused(vm.address)
    assert ended(session)


@pytest.mark.parametrize("behaviour, command, final", [
    # What the agent's watchdog runs when it is not root, on an instance that terminates.
    ("terminate", "sudo -n shutdown -h now", "terminated"),
    ("stop", "poweroff", "stopped"),
])
def test_poweroff_from_inside_ends_the_instance_as_its_shutdown_behaviour_says(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]], behaviour: str,
        command: str, final: str) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys),
                           InstanceInitiatedShutdownBehavior=behaviour)
    vm = booted(cloud, instance_id)
    # The machine may go down before the command's answer arrives, as a real one does.
    assert ended(ssh(cloud, keys, instance_id, command))
    assert vm.stopped.wait(15)
    assert instance_state(cloud, instance_id) == final


def test_scheduled_poweroff_can_be_cancelled_and_runs_when_due(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys))
    vm = booted(cloud, instance_id)
    run(cloud, keys, instance_id, "shutdown -h +1")
    due = cloud.poweroff_due(instance_id)
    assert due is not None and 50 < due <= 60
    run(cloud, keys, instance_id, "shutdown -c")
    assert cloud.poweroff_due(instance_id) is None
    # The boot script's dead-man switch: ${VMEXEC_POWEROFF} with a delay in seconds.
    assert ended(ssh(cloud, keys, instance_id,
                     '"$(dirname "$(command -v shutdown)")/fakevm-ctl" poweroff 0.3'))
    assert vm.stopped.wait(15)


def test_the_host_is_protected_from_the_machines(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys))
    booted(cloud, instance_id)
    out = run(cloud, keys, instance_id,
              "systemctl enable foo; echo rc=$?; apt-get install -y x; echo rc=$?; "
              "reboot; echo rc=$?; "
              "python3 -c 'import urllib.request as u; u.urlopen(\"http://example.com\", "
              "timeout=5)' 2>/dev/null; echo rc=$?")
    assert out.count("rc=1") == 4, out


def busy_machine(cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]
                 ) -> tuple[str, FakeVM, SSHTransport]:
    """A booted machine with a session running a long command (a task in progress)."""
    [instance_id] = launch(cloud, launched, user_data(keys))
    vm = booted(cloud, instance_id)
    session = ssh(cloud, keys, instance_id, "echo working; exec sleep 600")
    assert session.read(8) == b"working\n"
    return instance_id, vm, session


def test_kill_vm_kills_its_processes_mid_task(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    instance_id, vm, session = busy_machine(cloud, keys, launched)
    assert cloud.kill_vm(instance_id) >= 2
    assert ended(session)
    assert vm.state == "dead"
    assert vm.processes() == []
    assert refused(vm.address)
    # The cloud has not noticed: the instance runs until somebody terminates it.
    assert instance_state(cloud, instance_id) == "running"


def test_kill_vm_silent_freezes_the_machine(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    instance_id, vm, session = busy_machine(cloud, keys, launched)
    assert cloud.kill_vm(instance_id, silent=True) >= 2
    # SIGSTOP takes effect asynchronously.
    cloud.wait_for(lambda: proc_info(vm, "status") <= {"stopped", "zombie"}, 10,
                   "frozen processes")
    session.close()
    cloud.client().terminate_instances(InstanceIds=[instance_id])
    assert vm.stopped.wait(15)
    assert vm.processes() == []


def test_blackhole_running_machine(cloud: LocalCloud, keys: Keys,
                                   launched: list[tuple[str, str]]) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys))
    booted(cloud, instance_id)
    echo = ssh(cloud, keys, instance_id, "exec cat")
    cloud.blackhole(instance_id)
    started = time.monotonic()
    with pytest.raises(TransportError):
        ssh(cloud, keys, instance_id, "true", timeout=1.5)
    assert time.monotonic() - started < 10
    # The session opened before keeps working: only new connections hang.
    echo.write(b"still here\n")
    assert echo.read(11) == b"still here\n"
    echo.close()


def test_blackhole_next_machine_never_sends_a_banner(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    cloud.blackhole(count=1)
    [instance_id] = launch(cloud, launched, user_data(keys))
    booted(cloud, instance_id)  # the script's sshd restart "succeeds"
    with socket.create_connection(cloud.address_for(instance_id), timeout=5) as s:
        s.settimeout(1.0)
        with pytest.raises(socket.timeout):
            s.recv(64)


def test_fail_boot_makes_the_boot_script_fail(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    cloud.fail_boot(count=1)
    first, second = launch(cloud, launched, user_data(keys), count=2)
    vms = [cloud.vm(first), cloud.vm(second)]
    cloud.wait_for(lambda: all(v.ready or v.failed for v in vms), 60, "both boots")
    failed = [v for v in vms if v.failed]
    assert len(failed) == 1, [v.boot_log() for v in vms]
    assert "fail_boot" in failed[0].boot_log()
    assert "no usable python3" in (failed[0].root / "var/lib/vmexec/failed").read_text()
    cloud.wait_for(lambda: failed[0].poll() is not None, 10, "the boot script to end")
    assert failed[0].boot_exit == 1
    with pytest.raises(Exception, match="booted already"):
        cloud.fail_boot(first)


def test_spot_interruption_notice_then_reclaim(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys))
    vm = booted(cloud, instance_id)
    path = cloud.interrupt(instance_id, terminate_after=0.5)
    assert path == vm.root / INTERRUPTION_NOTICE
    notice = json.loads(run(cloud, keys, instance_id,
                            f'cat "$VMEXEC_ROOT/{INTERRUPTION_NOTICE}"'))
    assert notice["action"] == "terminate" and notice["time"].endswith("Z")
    assert vm.stopped.wait(15)
    assert instance_state(cloud, instance_id) == "terminated"


def test_instances_in_another_region_boot_too(
        cloud: LocalCloud, keys: Keys, launched: list[tuple[str, str]]) -> None:
    [instance_id] = launch(cloud, launched, user_data(keys), region=OTHER_REGION)
    assert OTHER_REGION in cloud.regions
    vm = booted(cloud, instance_id)
    assert vm.spec.region == OTHER_REGION


# --- part 1b: API faults and the guard ---------------------------------------------------

def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def test_capacity_error_for_a_type_in_a_zone(cloud: LocalCloud,
                                             launched: list[tuple[str, str]]) -> None:
    fault = cloud.capacity_error(instance_type="c7g.large", zone="us-east-1a")
    ec2 = cloud.session.client("ec2", endpoint_url=cloud.endpoint_url)
    subnets = {s["AvailabilityZone"]: s["SubnetId"]
               for s in ec2.describe_subnets()["Subnets"]}
    try:
        for placement in ({"Placement": {"AvailabilityZone": "us-east-1a"}},
                          {"SubnetId": subnets["us-east-1a"]}):
            with pytest.raises(botocore.exceptions.ClientError) as caught:
                launch(cloud, launched, "", InstanceType="c7g.large", **placement)
            assert _code(caught.value) == "InsufficientInstanceCapacity"
        launch(cloud, launched, "", InstanceType="c7g.large",
               Placement={"AvailabilityZone": "us-east-1b"})
        launch(cloud, launched, "", InstanceType="c7i.large",
               Placement={"AvailabilityZone": "us-east-1a"})
        assert fault.hits == 2
    finally:
        fault.remove()


def test_capacity_error_for_spot_only(cloud: LocalCloud,
                                      launched: list[tuple[str, str]]) -> None:
    fault = cloud.capacity_error(spot=True, times=1)
    with pytest.raises(botocore.exceptions.ClientError):
        launch(cloud, launched, "", InstanceMarketOptions={"MarketType": "spot"})
    launch(cloud, launched, "", InstanceMarketOptions={"MarketType": "spot"})  # used up
    assert fault.hits == 1


def _fleet_request(cloud: LocalCloud, ec2: Any, types_zones: list[tuple[str, str]],
                   capacity: int = 2) -> dict[str, Any]:
    template = ec2.create_launch_template(
        LaunchTemplateName=f"lt-{time.monotonic_ns()}",
        LaunchTemplateData={"ImageId": ami(cloud, REGION)})["LaunchTemplate"]
    subnets = {s["AvailabilityZone"]: s["SubnetId"]
               for s in ec2.describe_subnets()["Subnets"]}
    overrides = [{"InstanceType": t, "SubnetId": subnets[z]} for t, z in types_zones]
    request = {
        "Type": "instant",
        "TargetCapacitySpecification": {"TotalTargetCapacity": capacity,
                                        "DefaultTargetCapacityType": "on-demand"},
        "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template["LaunchTemplateId"], "Version": "$Latest"},
            "Overrides": overrides}],
    }
    return request


def test_create_fleet_reports_short_pools_and_launches_from_the_others(
        cloud: LocalCloud, launched: list[tuple[str, str]]) -> None:
    ec2 = cloud.session.client("ec2", endpoint_url=cloud.endpoint_url)
    fault = cloud.capacity_error(instance_type="c7g.large")
    try:
        request = _fleet_request(cloud, ec2, [("c7g.large", "us-east-1a"),
                                              ("c7i.large", "us-east-1b")])
        original = json.dumps(request, sort_keys=True)
        answer = ec2.create_fleet(**request)
        # The caller's request is not modified under it.
        assert json.dumps(request, sort_keys=True) == original
        ids = [i for group in answer["Instances"] for i in group["InstanceIds"]]
        launched.extend((REGION, i) for i in ids)
        assert {g["InstanceType"] for g in answer["Instances"]} == {"c7i.large"}
        assert len(ids) == 2
        [error] = answer["Errors"]
        assert error["ErrorCode"] == "InsufficientInstanceCapacity"
        assert error["LaunchTemplateAndOverrides"]["Overrides"]["InstanceType"] == "c7g.large"
        # Every pool short: no instance, one error per pool.
        fault2 = cloud.capacity_error(instance_type="c7i.large", code="Unsupported")
        answer = ec2.create_fleet(**request)
        assert answer["Instances"] == []
        assert sorted(e["ErrorCode"] for e in answer["Errors"]) == [
            "InsufficientInstanceCapacity", "Unsupported"]
        fault2.remove()
    finally:
        fault.remove()


def test_throttling_burst_then_success(cloud: LocalCloud) -> None:
    # Even a client that retries by itself sees every refusal: the error is returned
    # before botocore's retry loop, so the caller's own policy is what is tested.
    ec2 = cloud.session.client("ec2", endpoint_url=cloud.endpoint_url,
                               config=botocore.config.Config(retries={"max_attempts": 5}))
    fault = cloud.throttle(2, operations=["DescribeInstances"])
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            ec2.describe_instances()
        assert _code(caught.value) == "RequestLimitExceeded"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    ec2.describe_instances()
    ec2.describe_regions()
    assert fault.hits == 2


def test_one_injector_counts_fleet_pools_or_calls(session: boto3.Session) -> None:
    # The unit tests' add() counts each CreateFleet pool it hits; LocalCloud's
    # capacity_error() counts each call (in-process moto: no cloud needed).
    faults = FaultInjector(session)
    ec2 = session.client("ec2", region_name=REGION)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    template = ec2.create_launch_template(
        LaunchTemplateName="counting", LaunchTemplateData={"ImageId": image})
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:2]
    request = {
        "Type": "instant",
        "TargetCapacitySpecification": {"TotalTargetCapacity": 1,
                                        "DefaultTargetCapacityType": "on-demand"},
        "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"]},
            "Overrides": [{"InstanceType": "c7i.large", "SubnetId": s} for s in subnets]}],
    }
    per_pool = faults.add("InsufficientInstanceCapacity", times=1)
    answer = ec2.create_fleet(**request)
    assert len(answer["Errors"]) == 1 and len(answer["Instances"]) == 1
    assert per_pool.hits == 1 and faults.faults == []
    per_call = faults.capacity_error(times=1)
    answer = ec2.create_fleet(**request)
    assert len(answer["Errors"]) == 2 and answer["Instances"] == []
    assert per_call.hits == 1 and faults.faults == []
    assert [f[4] for f in faults.fired] == ["InsufficientInstanceCapacity"] * 2


def test_quota_error(cloud: LocalCloud, launched: list[tuple[str, str]]) -> None:
    cloud.api_error("VcpuLimitExceeded", operations=["RunInstances"], times=1,
                    message="You have requested more vCPU capacity than your current "
                            "vCPU limit of 32 allows")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        launch(cloud, launched, "")
    assert _code(caught.value) == "VcpuLimitExceeded"
    assert "vCPU limit" in str(caught.value)


def test_nothing_reaches_a_real_endpoint(cloud: LocalCloud) -> None:
    real = cloud.session.client("ec2", endpoint_url="https://ec2.us-east-1.amazonaws.com")
    with pytest.raises(OffMachineRequestError):
        real.describe_regions()
    assert cloud.offmachine_requests == ["https://ec2.us-east-1.amazonaws.com/"]
    cloud.offmachine_requests.clear()
    # A client made anywhere else in the process also goes to moto, with fake keys.
    stray = boto3.client("ec2", region_name=REGION)
    assert stray.meta.endpoint_url == cloud.endpoint_url
    assert stray._request_signer._credentials.access_key == "testing"


def test_tagged_resources_are_found_in_every_region(cloud: LocalCloud) -> None:
    ec2 = cloud.client(OTHER_REGION)
    group = ec2.create_security_group(
        GroupName=f"t-{time.monotonic_ns()}", Description="x",
        TagSpecifications=[{"ResourceType": "security-group",
                            "Tags": [{"Key": "vmexec:fleet", "Value": "f-test"}]}])
    assert (OTHER_REGION, "security-group", group["GroupId"]) in cloud.tagged_resources()
    ec2.delete_security_group(GroupId=group["GroupId"])
    assert (OTHER_REGION, "security-group", group["GroupId"]) not in cloud.tagged_resources()


def test_index_serves_the_agent_requirements(cloud: LocalCloud) -> None:
    names = {w.name.split("-")[0].lower() for w in cloud.wheels}
    assert {"vmexec", "cloudpickle", "psutil"} <= names
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(cloud.index_url + "cloudpickle/", timeout=10) as page:
        html = page.read().decode()
    assert "cloudpickle-" in html and "#sha256=" in html


_CLOSE_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from test_localcloud import Keys, booted, launch, user_data
from pathlib import Path
from vmexec.testing.localcloud import LocalCloud
keys = Keys(Path({keydir!r}))
before = os.environ.get("AWS_ENDPOINT_URL")
with LocalCloud() as cloud:
    [instance_id] = launch(cloud, [], user_data(
        keys, after_reload="setsid nohup sleep 600 >/dev/null 2>&1 < /dev/null &"))
    vm = booted(cloud, instance_id)
    inside = os.environ["AWS_ENDPOINT_URL"] == cloud.endpoint_url
    workdir = cloud.workdir
print(json.dumps(dict(marker=vm.marker, stopped=vm.stopped.is_set(), inside=inside,
                      restored=os.environ.get("AWS_ENDPOINT_URL") == before,
                      workdir_left=workdir.exists())))
"""


def test_close_stops_every_machine_and_restores_the_environment(tmp_path: Path) -> None:
    # In a process of its own: moto's state is process-wide, and a second cloud in this
    # process would reset the module's cloud under it.
    script = _CLOSE_SCRIPT.format(tests=str(Path(__file__).parent), keydir=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == dict(marker=report["marker"], stopped=True, inside=True, restored=True,
                          workdir_left=False)
    # The daemonised process the boot script left behind is gone too.
    assert find_processes({report["marker"]})[report["marker"]] == []


# --- part 1c: the harness runs vmexec's real boot script --------------------------------

class BootedWithVmexecScript:
    """A machine booted by vmexec's own boot script, and a way to SSH into it."""

    def __init__(self, cloud: LocalCloud, launched: list[tuple[str, str]],
                 userdata: Any, keys: Any) -> None:
        self.userdata = userdata
        self.keys = keys
        self.spec = userdata.BootSpec(
            fleet_id="lc-test", client_public_key=keys.client_public,
            host_private_key=keys.host_private, host_public_key=keys.host_public,
            login_user=cloud.executor_options()["ssh_user"], index_url=cloud.index_url,
            env=cloud.boot_env())
        [self.id] = launch(cloud, launched, userdata.render_userdata(self.spec),
                           InstanceInitiatedShutdownBehavior="terminate")
        self.vm = booted(cloud, self.id, timeout=120)
        self.address = cloud.address_for(self.id)

    def connect(self, command: str) -> SSHTransport:
        return open_ssh_transport(*self.address, self.spec.login_user,
                                  key_filename=self.keys.client_key,
                                  known_hosts=self.keys.known_hosts, command=command,
                                  timeout=10)


@pytest.fixture
def vmexec_booted(cloud: LocalCloud,
                  launched: list[tuple[str, str]]) -> Iterator[BootedWithVmexecScript]:
    userdata = pytest.importorskip("vmexec.providers.ec2.userdata")
    keys = userdata.FleetKeys("lc-test")
    try:
        yield BootedWithVmexecScript(cloud, launched, userdata, keys)
    finally:
        keys.remove()


def test_vmexec_boot_script_boots_and_the_agent_answers(
        cloud: LocalCloud, vmexec_booted: BootedWithVmexecScript) -> None:
    machine = vmexec_booted
    probe = machine.connect(machine.userdata.probe_command(5))
    assert read_all(probe, 20).startswith(machine.userdata.READY.encode())
    probe.close()
    agent = machine.connect(machine.userdata.agent_command())
    try:
        assert agent.read(12) == b"VMEXEC-AGENT"
    finally:
        agent.close()
    assert cloud.wheel_requests >= 3
    # Its dead-man loop runs in the machine and goes away with it.
    assert "deadman.sh" in proc_info(machine.vm, "name")


def test_agent_watchdog_poweroff_terminates_the_instance(
        cloud: LocalCloud, vmexec_booted: BootedWithVmexecScript) -> None:
    """The client goes silent: the agent's watchdog powers the machine off, and EC2
    (InstanceInitiatedShutdownBehavior=terminate) terminates the instance."""
    from vmexec import protocol

    machine = vmexec_booted
    agent = machine.connect(machine.userdata.agent_command())
    reader = protocol.FrameReader()
    assert agent.read(len(protocol.MAGIC)) == protocol.MAGIC
    while not reader.feed(agent.read(65536)):
        continue
    agent.write(protocol.encode_handshake({
        **protocol.local_info(), "slots": 1, "initializer": None,
        "max_tasks_per_child": None, "log_level": 30, "heartbeat_interval": 0.2,
        "watchdog_timeout": 1.0, "poweroff": True}))
    # ... and then the client says nothing more.
    assert machine.vm.stopped.wait(30), machine.vm.boot_log()
    assert instance_state(cloud, machine.id) == "terminated"
    agent.close()


# --- part 2: vmexec's EC2 provider end to end ------------------------------------------

E2E_TIMING = dict(heartbeat_interval=0.5, heartbeat_timeout=20.0, watchdog_timeout=60.0,
                  boot_timeout=120.0)


def _require_ec2_provider() -> None:
    from vmexec.errors import ProviderNotAvailable
    from vmexec.providers import get_provider_class

    try:
        get_provider_class("ec2")
    except ProviderNotAvailable as exc:  # vmexec ships it: its absence is a failure
        pytest.fail(f"the EC2 provider is not available: {exc}")


def _square(x: int) -> int:
    return x * x


def _where(x: int) -> tuple[int, str]:
    time.sleep(0.05)  # long enough that every machine of the fleet gets some
    return x, os.environ.get("VMEXEC_ROOT", "")


def _slow_root(seconds: float) -> str:
    time.sleep(seconds)
    return os.environ.get("VMEXEC_ROOT", "")


def e2e_options(cloud: LocalCloud, **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = dict(provider="ec2", instance_type=["c7g.large", "c7i.large"],
                                   regions=[REGION, OTHER_REGION], **E2E_TIMING)
    options.update(cloud.executor_options())
    options.update(extra)
    return options


def wait_machines(cloud: LocalCloud, ex: Any, count: int, timeout: float = 120) -> None:
    """Keep a little work flowing (the fleet grows with demand) until ``count`` machines
    have joined."""
    def enough() -> bool:
        assert list(ex.map(_square, range(4 * count))) == [i * i for i in range(4 * count)]
        return len(ex.fleet) >= count

    cloud.wait_for(enough, timeout, f"{count} machines to join")


def running(cloud: LocalCloud) -> list[str]:
    return [f"{vm!r} instance={cloud.client(vm.spec.region).describe_instances(InstanceIds=[i])}"
            for i, vm in cloud.vms.items() if vm.state not in ("stopped", "dead")]


def assert_clean(cloud: LocalCloud) -> None:
    """Nothing tagged is left in any region, and every fake VM is off."""
    assert cloud.tagged_resources() == []
    cloud.wait_for(lambda: all(vm.state in ("stopped", "dead") for vm in cloud.vms.values()),
                   30, lambda: f"every machine to stop: {running(cloud)}")
    assert cloud.offmachine_requests == []


def test_e2e_map_on_mixed_architectures_in_two_regions(cloud: LocalCloud) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor

    # The planner puts c7g.large (arm64) in both regions; us-west-2 has none of it, so
    # that region falls back to c7i.large (x86_64): a mixed fleet, through a fallback.
    short = cloud.capacity_error(instance_type="c7g.large", region=OTHER_REGION)
    calls_before = sum(n for (_, op), n in cloud.api_calls.items() if op == "CreateFleet")
    try:
        with VMExecutor(max_workers=4, **e2e_options(cloud)) as ex:
            wait_machines(cloud, ex, 2)
            results = list(ex.map(_where, range(60)))
            fleet = list(ex.fleet)
    finally:
        short.remove()
    assert [r[0] for r in results] == list(range(60))
    roots = {r[1] for r in results}
    assert len(roots) == 2 and all(r.startswith(str(cloud.workdir)) for r in roots)
    assert {(m.region, m.instance_type) for m in fleet} == {
        (REGION, "c7g.large"), (OTHER_REGION, "c7i.large")}
    assert short.hits >= 1
    # Batched: a handful of CreateFleet calls for the whole fleet, not one per machine.
    calls = sum(n for (_, op), n in cloud.api_calls.items() if op == "CreateFleet")
    assert calls - calls_before <= 4
    assert_clean(cloud)


def test_e2e_machine_killed_mid_task_its_tasks_run_elsewhere(
        cloud: LocalCloud, caplog: pytest.LogCaptureFixture) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor

    with VMExecutor(max_workers=4, max_retries=2, **e2e_options(cloud)) as ex:
        wait_machines(cloud, ex, 2)
        futures = [ex.submit(_slow_root, 1.0) for _ in range(16)]
        victim = ex.fleet[0]
        cloud.wait_for(lambda: any(f.running() for f in futures), 30, "tasks to start")
        cloud.kill_vm(victim.id)
        roots = [f.result(timeout=120) for f in futures]
        assert len(roots) == 16
        assert victim.id not in {m.id for m in ex.fleet}
    assert any("lost" in r.getMessage() and victim.id in r.getMessage()
               for r in caplog.records), "the scheduler never noticed the dead machine"
    assert_clean(cloud)


def test_e2e_failed_boot_is_reported_and_replaced(
        cloud: LocalCloud, caplog: pytest.LogCaptureFixture) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor

    cloud.fail_boot(count=1)
    with VMExecutor(max_workers=2, **e2e_options(cloud, instance_type="c7i.large",
                                                 regions=[REGION])) as ex:
        assert ex.submit(_square, 7).result(timeout=150) == 49
    messages = "\n".join(r.getMessage() for r in caplog.records)
    # The client says why, with the machine's own log.
    assert "boot script failed" in messages and "fail_boot" in messages, messages[-3000:]
    assert_clean(cloud)


def test_e2e_sshd_that_never_answers_is_given_up_and_replaced(
        cloud: LocalCloud, caplog: pytest.LogCaptureFixture) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor

    cloud.blackhole(count=1)
    started = time.monotonic()
    # boot_timeout bounds the replacement's boot too: 25 s leaves a busy CI machine
    # room to boot it (at 10 s it was given up as well, now and then).
    with VMExecutor(max_workers=2, **e2e_options(cloud, instance_type="c7i.large",
                                                 regions=[REGION], boot_timeout=25.0)) as ex:
        assert ex.submit(_square, 5).result(timeout=150) == 25
    assert time.monotonic() - started < 120
    assert any("not ready within" in r.getMessage() for r in caplog.records)
    assert_clean(cloud)


def test_e2e_throttling_and_an_exception_in_the_block(cloud: LocalCloud) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor

    throttled = cloud.throttle(2, operations=["CreateFleet"])
    with pytest.raises(ZeroDivisionError):
        with VMExecutor(max_workers=2, **e2e_options(cloud, instance_type="c7i.large",
                                                     regions=[REGION])) as ex:
            assert ex.submit(_square, 3).result(timeout=120) == 9
            raise ZeroDivisionError
    assert throttled.hits == 2
    assert_clean(cloud)


def test_e2e_spot_interruption_moves_work_and_replaces_the_machine(
        cloud: LocalCloud, caplog: pytest.LogCaptureFixture) -> None:
    _require_ec2_provider()
    from vmexec import VMExecutor
    with VMExecutor(max_workers=2, spot=True,
                    **e2e_options(cloud, instance_type="c7i.large", regions=[REGION])) as ex:
        wait_machines(cloud, ex, 1)
        first = ex.fleet[0]
        # More work than the machine can finish before EC2 reclaims it 5 s after the
        # notice: what it had not started moves to a replacement, what it was running
        # when it died is re-queued.
        futures = [ex.submit(_slow_root, 1.5) for _ in range(12)]
        cloud.wait_for(lambda: any(f.running() for f in futures), 30, "tasks to start")
        cloud.interrupt(first.id, terminate_after=5.0)
        roots = [f.result(timeout=150) for f in futures]
    assert len(roots) == 12
    assert set(roots) - {str(cloud.vms[first.id].root)}, "no task ran on a replacement"
    assert any("going away" in r.getMessage() and first.id in r.getMessage()
               for r in caplog.records)
    assert cloud.vms[first.id].stopped.is_set()
    assert_clean(cloud)
