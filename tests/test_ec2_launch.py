"""Launching on EC2 (moto): batching, growth, capacity fallback, quotas, throttling,
the launch template's security settings, the boot script, and connecting over pinned SSH.

Faults are injected with ``FaultInjector`` (botocore events on the provider's session);
API calls are counted with ``ApiCallCounter``. Nothing is mocked in vmexec itself.
"""

from __future__ import annotations

import base64
import getpass
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest

from aws_fixtures import MIXED, REGIONS, TEST_CIDR, tagged
from vmexec import VMExecutor, retry
from vmexec.errors import CapacityError, ConfigError, QuotaError, TransportError, VMExecError
from vmexec.providers.ec2 import EC2Provider
from vmexec.providers.ec2.images import ssm_parameter
from vmexec.providers.ec2.userdata import (
    USERDATA_LIMIT,
    BootSpec,
    FleetKeys,
    agent_command,
    render_userdata,
)
from vmexec.testing.faults import ApiCallCounter, FaultInjector
from vmexec.testing.sshd import SSHServer, sshd_available

Make = Callable[..., EC2Provider]


def _instances(session: boto3.Session, region: str, ids: list[str]) -> dict[str, Any]:
    ec2 = session.client("ec2", region_name=region)
    answer = ec2.describe_instances(InstanceIds=ids)
    return {i["InstanceId"]: i for r in answer["Reservations"] for i in r["Instances"]}


def _by_key(records: list[Any]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for record in records:
        key = (record.region, record.instance_type)
        out[key] = out.get(key, 0) + 1
    return out


# --- launching --------------------------------------------------------------------------

def test_mixed_architectures_in_two_regions(make_provider: Make, session: boto3.Session
                                            ) -> None:
    provider = make_provider(16, iam_instance_profile="vmexec-workers", root_volume_gb=20,
                             tags={"project": "demo"}, name="demo-fleet")
    records = provider.launch(16)
    assert len(records) == 8 and sum(r.slots for r in records) == 16
    assert _by_key(records) == {(r, t): 2 for r in REGIONS for t in MIXED}
    for region in REGIONS:
        ssm = session.client("ssm", region_name=region)
        image = {arch: ssm.get_parameter(Name=ssm_parameter(arch, False))["Parameter"]["Value"]
                 for arch in ("arm64", "x86_64")}
        mine = [r for r in records if r.region == region]
        described = _instances(session, region, [r.id for r in mine])
        for record in mine:
            instance = described[record.id]
            expected_arch = "arm64" if record.instance_type == "c7g.large" else "x86_64"
            assert record.arch == expected_arch
            assert instance["ImageId"] == image[expected_arch]  # the AMI of its own arch
            assert instance["InstanceType"] == record.instance_type
            assert record.zone and record.zone.startswith(region)
            assert record.label == f"{record.id} ({record.zone} {record.instance_type})"
            assert record.provider == "ec2" and record.spot is False
            tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
            assert tags["vmexec:fleet"] == provider.fleet_id
            assert tags["Name"] == "demo-fleet" and tags["project"] == "demo"
            # The owner is the STS caller identity, not a self-asserted user@host.
            assert tags["vmexec:owner"] == provider.owner and provider.owner.startswith("arn:")
            assert tags["vmexec:created"].endswith("Z")
    assert {r.id for r in provider.describe()} == {r.id for r in records}


def test_launch_template_and_security_group(make_provider: Make, session: boto3.Session
                                            ) -> None:
    provider = make_provider(4, regions="us-east-1", iam_instance_profile="vmexec-workers",
                             root_volume_gb=20)
    provider.launch(4)
    ec2 = session.client("ec2", region_name="us-east-1")
    fleet = [{"Name": "tag:vmexec:fleet", "Values": [provider.fleet_id]}]
    template = ec2.describe_launch_templates(Filters=fleet)["LaunchTemplates"][0]
    data = ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["IamInstanceProfile"] == {"Name": "vmexec-workers"}
    [root] = data["BlockDeviceMappings"]
    assert root["DeviceName"] == "/dev/xvda"
    assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["DeleteOnTermination"] is True
    assert root["Ebs"]["VolumeSize"] == 20
    kinds = {spec["ResourceType"] for spec in data["TagSpecifications"]}
    assert {"instance", "volume"} <= kinds
    volumes = ec2.describe_volumes(Filters=fleet)["Volumes"]
    assert volumes, "root volumes carry the fleet's tags"
    [group] = ec2.describe_security_groups(Filters=fleet)["SecurityGroups"]
    assert group["GroupId"] in data["SecurityGroupIds"]
    [rule] = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == [TEST_CIDR]
    # The boot script carries no AWS credential of the client's session.
    script = base64.b64decode(data["UserData"]).decode()
    credentials = session.get_credentials().get_frozen_credentials()
    for secret in (credentials.access_key, credentials.secret_key, credentials.token):
        assert secret and secret not in script
    assert "AKIA" not in script and "aws_secret" not in script.lower()
    assert provider.keys.client_public in script and provider.keys.host_public in script


def test_grows_with_demand_up_to_the_plan(make_provider: Make) -> None:
    provider = make_provider(2000)
    assert provider.plan.total_machines == 1000
    first = provider.launch(3)
    assert sum(r.slots for r in first) == 4  # three tasks: two 2-slot machines
    second = provider.launch(10)
    assert sum(r.slots for r in second) == 10
    assert len(provider.describe()) == 7
    small = make_provider(40)
    small.launch(3)
    small.launch(10_000)
    assert len(small.describe()) == 20 and small.launch(10) == []
    # Lost machines can be replaced: capacity frees up when records are terminated.
    small.terminate(small.describe()[:5])
    assert len(small.describe()) == 15
    assert len(small.launch(10)) == 5


def test_calls_grow_with_groups_not_machines(make_provider: Make, calls: ApiCallCounter
                                             ) -> None:
    small = make_provider(8)
    small.launch(8)  # 4 machines, one per (region, type)
    small_calls = calls["CreateFleet"]
    calls.reset()
    big = make_provider(400)
    big.launch(400)  # 200 machines
    assert len(big.describe()) == 200
    assert calls["CreateFleet"] == small_calls == len(REGIONS) * len(MIXED)
    assert calls["RunInstances"] == 0


# --- capacity fallback ---------------------------------------------------------------------

def test_zone_fallback(make_provider: Make, faults: FaultInjector) -> None:
    provider = make_provider(8, instance_type="c7g.large", regions="us-east-1")
    faults.add("InsufficientInstanceCapacity", instance_type="c7g.large", zone="us-east-1a")
    records = provider.launch(8)
    assert len(records) == 4
    assert {r.instance_type for r in records} == {"c7g.large"}
    assert all(r.zone != "us-east-1a" for r in records)
    assert faults.fired[0][3] == "us-east-1a"


def test_type_fallback(make_provider: Make, faults: FaultInjector) -> None:
    provider = make_provider(8, regions="us-east-1")
    faults.add("InsufficientInstanceCapacity", instance_type="c7g.large")  # every zone
    records = provider.launch(8)
    assert _by_key(records) == {("us-east-1", "c7i.large"): 4}


def test_region_fallback(make_provider: Make, faults: FaultInjector) -> None:
    provider = make_provider(8)
    faults.add("Unsupported", region="us-east-1", instance_type="c7g.large")
    faults.add("InsufficientInstanceCapacity", region="us-east-1", instance_type="c7i.large",
               partial=False)  # raised, as RunInstances-style errors are
    records = provider.launch(8)
    assert len(records) == 4
    assert {r.region for r in records} == {"us-west-2"}


def test_spot_falls_back_to_on_demand(make_provider: Make, faults: FaultInjector) -> None:
    provider = make_provider(8, spot=True)
    faults.add("SpotMaxPriceTooLow", spot=True, region="us-east-1")
    faults.add("InsufficientInstanceCapacity", spot=True, region="us-west-2")
    records = provider.launch(8)
    assert len(records) == 4
    assert all(r.spot is False for r in records)
    assert _by_key(records) == {(r, t): 1 for r in REGIONS for t in MIXED}


def test_spot_when_available(make_provider: Make) -> None:
    provider = make_provider(8, spot=True)
    records = provider.launch(8)
    assert len(records) == 4 and all(r.spot for r in records)


def test_no_capacity_anywhere(make_provider: Make, faults: FaultInjector,
                              session: boto3.Session, calls: ApiCallCounter) -> None:
    provider = make_provider(8, spot=True)
    faults.add("InsufficientInstanceCapacity")
    with pytest.raises(CapacityError) as info:
        provider.launch(8)
    message = str(info.value)
    assert "c7g.large spot in us-east-1" in message and "c7i.large on-demand in us-west-2" \
        in message and "InsufficientInstanceCapacity" in message
    # Every (region, type, purchase) group was tried once, not once per machine.
    assert calls["CreateFleet"] == len(REGIONS) * len(MIXED) * 2
    assert tagged(session, REGIONS) == []  # the regions it set up were cleaned again
    assert provider.launch(8) == []  # cooling down: no hammering


def test_partial_capacity_is_not_an_error(make_provider: Make, faults: FaultInjector) -> None:
    provider = make_provider(8, instance_type="c7g.large", regions="us-east-1")
    faults.add("InsufficientInstanceCapacity", times=1)  # one zone, once
    assert len(provider.launch(8)) == 4


# --- quotas, throttling, other errors -------------------------------------------------------

def test_quota_error_names_the_quota(make_provider: Make, faults: FaultInjector,
                                     session: boto3.Session) -> None:
    provider = make_provider(8)
    faults.add("VcpuLimitExceeded", region="us-west-2",
               message="You have requested more vCPU capacity than your current vCPU "
                       "limit of 0 allows")
    with pytest.raises(QuotaError) as info:
        provider.launch(8)
    message = str(info.value)
    assert "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances" in message
    assert "L-1216C47A" in message and "us-west-2" in message
    assert "aws service-quotas request-service-quota-increase --service-code ec2 " \
           "--quota-code L-1216C47A" in message
    # us-east-1 launched before the quota stopped us-west-2: destroyed before raising.
    assert tagged(session, REGIONS) == []
    assert provider.describe() == []


def test_spot_quota(make_provider: Make, faults: FaultInjector) -> None:
    provider = make_provider(4, spot=True, regions="us-east-1", instance_type="c7g.large")
    faults.add("MaxSpotInstanceCountExceeded", partial=False)
    with pytest.raises(QuotaError, match=r"All Standard .* Spot Instance Requests.*L-34B43A08"):
        provider.launch(4)


def test_throttling_is_retried_with_backoff(make_provider: Make, faults: FaultInjector,
                                            calls: ApiCallCounter,
                                            fake_clock: retry.FakeClock) -> None:
    provider = make_provider(4, regions="us-east-1", instance_type="c7g.large")
    faults.add("RequestLimitExceeded", operation="CreateFleet", times=2)
    records = provider.launch(4)
    assert len(records) == 2
    assert calls["CreateFleet"] == 3
    assert len(fake_clock.sleeps) == 2  # jittered exponential backoff, no real sleep


def test_throttling_gives_up_eventually(make_provider: Make, faults: FaultInjector,
                                        calls: ApiCallCounter) -> None:
    provider = make_provider(4, regions="us-east-1", instance_type="c7g.large")
    faults.add("Throttling", operation="CreateFleet")
    with pytest.raises(VMExecError, match="Throttling"):
        provider.launch(4)
    assert calls["CreateFleet"] == 8


def test_other_errors_are_not_retried(make_provider: Make, faults: FaultInjector,
                                      calls: ApiCallCounter, session: boto3.Session) -> None:
    provider = make_provider(4, regions="us-east-1", instance_type="c7g.large")
    faults.add("InvalidParameterValue", operation="CreateFleet", message="bad value")
    with pytest.raises(VMExecError, match="CreateFleet in us-east-1 failed: "
                                          "InvalidParameterValue: bad value"):
        provider.launch(4)
    assert calls["CreateFleet"] == 1
    assert tagged(session, REGIONS) == []


def test_launch_failing_half_way_destroys_what_it_created(
        make_provider: Make, faults: FaultInjector, session: boto3.Session) -> None:
    provider = make_provider(8)
    # us-east-1 launches; us-west-2 cannot even create its launch template.
    faults.add("UnauthorizedOperation", operation="CreateLaunchTemplate", region="us-west-2",
               times=1)
    with pytest.raises(ConfigError, match="UnauthorizedOperation.*ec2:CreateLaunchTemplate"):
        provider.launch(8)
    assert tagged(session, REGIONS) == [] and provider.describe() == []
    # Later launches set the regions up again; a failure then removes only its own work.
    assert len(provider.launch(4)) == 2
    faults.add("UnauthorizedOperation", operation="CreateFleet", region="us-west-2")
    with pytest.raises(ConfigError, match="UnauthorizedOperation"):
        provider.launch(4)
    assert len(provider.describe()) == 2
    live = [r for r in tagged(session, REGIONS) if r.kind == "instance"]
    assert {r.id for r in live} == {r.id for r in provider.describe()}


# --- the boot script ------------------------------------------------------------------------

def _spec(tmp: Path, **options: Any) -> tuple[BootSpec, FleetKeys]:
    keys = FleetKeys("vmx-test")
    spec = BootSpec(fleet_id="vmx-test", client_public_key=keys.client_public,
                    host_private_key=keys.host_private, host_public_key=keys.host_public,
                    **options)
    return spec, keys


def test_userdata_is_a_small_valid_bash_script(tmp_path: Path) -> None:
    spec, keys = _spec(tmp_path, packages=("numpy==2.0",), index_url="https://mirror/simple",
                       env={"VMEXEC_DEADMAN_INTERVAL": "5"})
    script = render_userdata(spec)
    keys.remove()
    assert script.startswith("#!/bin/bash\n") and len(script.encode()) < USERDATA_LIMIT
    assert "export VMEXEC_DEADMAN_INTERVAL=5" in script
    assert "--index-url https://mirror/simple" in script and "numpy==2.0" in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    with pytest.raises(ConfigError, match="16 KB"):
        render_userdata(BootSpec(**{**spec.__dict__, "packages": ("x" * 40,) * 500}))
    with pytest.raises(ConfigError, match="boot_env"):
        BootSpec(**{**spec.__dict__, "env": {"NOT VALID": "1"}})


def test_boot_script_failure_is_reported(tmp_path: Path) -> None:
    """Run the script for real in a directory: keys go in, a failed install is reported."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    spec, keys = _spec(tmp_path, find_links=(str(wheels),), heartbeat_grace=3600)
    script = tmp_path / "boot.sh"
    script.write_text(render_userdata(spec))
    root = tmp_path / "vm"
    env = {**os.environ, "VMEXEC_ROOT": str(root), "VMEXEC_SSHD_RELOAD": "true",
           "VMEXEC_POWEROFF": "echo would-power-off", "PIP_FIND_LINKS": "",
           "PIP_NO_INDEX": "1"}
    done = subprocess.run(["bash", str(script)], env=env, timeout=120)
    try:
        assert done.returncode == 1
        failed = (root / "var/lib/vmexec/failed").read_text()
        assert "pip install failed" in failed
        assert not (root / "var/lib/vmexec/ready").exists()
        log = (root / "var/log/vmexec-boot.log").read_text()
        assert "vmexec==" in log  # pip's own complaint is in the log
        host_key = root / "etc/ssh/ssh_host_ed25519_key"
        assert host_key.read_text().strip() == keys.host_private.strip()
        assert oct(host_key.stat().st_mode & 0o777) == "0o600"
        assert (root / "home/ec2-user/.ssh/authorized_keys").read_text().strip() == \
            keys.client_public
        # In a directory (VMEXEC_ROOT set) the script never polls the real metadata
        # service: a harness writes interruption notices itself.
        assert not (root / "opt/vmexec/notice.sh").exists()
    finally:
        keys.remove()
        _stop_deadman(root)


def _stop_deadman(root: Path) -> None:
    """Stop the dead-man loop the boot script started (by the pid it recorded)."""
    pid_file = root / "var/lib/vmexec/deadman.pid"
    for _ in range(100):  # it writes the file as soon as it starts
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)


# --- connecting over pinned SSH to a real sshd ------------------------------------------------

def _need_sshd() -> None:
    reason = sshd_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SSH tests but: {reason}")
        pytest.skip(reason)


def machine(tmp_path: Path, provider: EC2Provider, state: str = "ready",
            pinned: bool = True) -> SSHServer:
    """A 'booted machine': an sshd with the fleet's host key and client key, and a
    VMEXEC_ROOT as the boot script leaves it (``state``: ready or failed)."""
    _need_sshd()
    root = tmp_path / "root"
    (root / "var/lib/vmexec").mkdir(parents=True)
    (root / "var/log").mkdir(parents=True)
    venv_bin = root / "opt/vmexec/venv/bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    (root / "var/log/vmexec-boot.log").write_text("step 1\nstep 2: pip exploded\n")
    if state == "failed":
        (root / "var/lib/vmexec/failed").write_text("pip install failed (see the log)\n")
    else:
        (root / "var/lib/vmexec/ready").touch()
    workdir = tmp_path / "sshd"
    workdir.mkdir()
    if pinned:
        (workdir / "ssh_host_ed25519_key").write_text(provider.keys.host_private)
        (workdir / "ssh_host_ed25519_key.pub").write_text(provider.keys.host_public + "\n")
    # The EC2 provider asks agents to power their machine off when the client goes
    # silent; here the "machine" is this computer, so those commands only leave a note.
    fakebin = root / "fakebin"
    fakebin.mkdir()
    for name in ("sudo", "shutdown", "poweroff"):
        fake = fakebin / name
        fake.write_text(f"#!/bin/sh\necho \"$0 $*\" >>{root}/var/log/poweroff.log\n")
        fake.chmod(0o755)
    repo = str(Path(__file__).resolve().parents[1])
    server = SSHServer(workdir, env={"VMEXEC_ROOT": str(root), "PYTHONPATH": repo,
                                     "VMEXEC_POWEROFF": "true",
                                     "PATH": f"{fakebin}:{os.environ.get('PATH', '')}"})
    server.authorize(provider.keys.client_key + ".pub")
    return server


def test_connect_runs_the_agent_over_pinned_ssh(make_provider: Make, tmp_path: Path) -> None:
    provider = make_provider(2, instance_type="c7g.large", regions="us-east-1")
    [record] = provider.launch(2)
    with machine(tmp_path, provider) as server:
        provider.address_for = lambda r: (server.host, server.port)
        provider.ssh_user = server.user
        transport = provider.connect(record, timeout=30)
        try:
            assert transport.read(4)  # the agent's handshake frame begins
        finally:
            transport.close()
    assert record.state == "running" and record.address
    # The agent watches the notice file under the machine's own root, which the boot
    # probe reported, and powers off the way the boot script's dead-man loop would.
    options = provider.agent_options(record)
    assert options["notice_file"] == f"{tmp_path}/root/var/lib/vmexec/spot-interruption"
    assert "VMEXEC_POWEROFF" in " ".join(options["poweroff"])  # type: ignore[arg-type]


def test_connect_reports_a_failed_boot(make_provider: Make, tmp_path: Path) -> None:
    provider = make_provider(2, instance_type="c7g.large", regions="us-east-1")
    [record] = provider.launch(2)
    with machine(tmp_path, provider, state="failed") as server:
        provider.address_for = lambda r: (server.host, server.port)
        provider.ssh_user = server.user
        with pytest.raises(TransportError, match=r"boot script failed: pip install failed"
                                                 r"(.|\n)*pip exploded"):
            provider.connect(record, timeout=30)


def test_connect_refuses_an_unpinned_host_key(make_provider: Make, tmp_path: Path) -> None:
    provider = make_provider(2, instance_type="c7g.large", regions="us-east-1",
                             boot_timeout=5)
    [record] = provider.launch(2)
    with machine(tmp_path, provider, pinned=False) as server:
        provider.address_for = lambda r: (server.host, server.port)
        provider.ssh_user = server.user
        with pytest.raises(TransportError, match=r"not ready within 5s(.|\n)*host key"):
            provider.connect(record, timeout=30)


def test_executor_runs_tasks_on_ec2_machines(session: boto3.Session, tmp_path: Path) -> None:
    """VMExecutor -> plan -> CreateFleet (moto) -> pinned SSH -> agent -> results ->
    teardown, with one real sshd standing in for every machine."""
    _need_sshd()
    target: dict[str, tuple[str, int]] = {}
    ex = VMExecutor(4, provider="ec2", instance_type=MIXED, regions="us-east-1",
                    ssh_cidr=TEST_CIDR, session=session, handle_signals=False,
                    address_for=lambda record: target["address"],
                    ssh_user=getpass.getuser(), heartbeat_interval=0.5, environment=None)
    try:
        with machine(tmp_path, ex.provider) as server:  # type: ignore[arg-type]
            target["address"] = (server.host, server.port)
            assert list(ex.map(pow, [2] * 20, range(20))) == [2 ** i for i in range(20)]
            launched = ex.provider.describe()
            assert {(r.instance_type, r.arch) for r in launched} == {
                ("c7g.large", "arm64"), ("c7i.large", "x86_64")}
            # Machines join as they become ready: at least one has by now.
            assert ex.fleet and all(r.state == "ready" for r in ex.fleet)
            ex.shutdown()
    finally:
        ex.shutdown(cancel_futures=True)
    assert tagged(session, ["us-east-1"]) == []


def test_agent_command_is_shared() -> None:
    assert agent_command().endswith(
        "; exec ${VMEXEC_ROOT:-}/opt/vmexec/venv/bin/python -m vmexec.agent")
    assert agent_command("/vm/3").endswith("; exec /vm/3/opt/vmexec/venv/bin/python -m vmexec.agent")
    # The agent is told which file to touch when its client's frames arrive.
    assert 'VMEXEC_CLIENT_HEARD="/vm/3/opt/vmexec/client/heard"' in agent_command("/vm/3")
