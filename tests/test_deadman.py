"""The boot script's dead-man switch, end to end: a client killed with SIGKILL (no atexit,
no teardown) leaves machines whose agents are gone; each powers itself off within the
grace, and EC2 terminates it (the launch template's InstanceInitiatedShutdownBehavior).

The client runs in a process of its own against a ``LocalCloud`` in this one
(``remote_options`` / ``remote_executor_options``), so that killing it leaves the cloud
untouched: what happens next is up to the machines alone.

Also the two harness behaviours this depends on: an instance's shutdown behaviour comes
from the launch template version it was launched with (moto ignores the template's), and
a power-off request waits while the cloud's control socket is busy (a dead-man asks once).
"""

from __future__ import annotations

import base64
import json
import shlex
import signal
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import _require_sshd  # the suite's one rule for a missing sshd
from helpers import first_line, instance_states, local_cloud, start_remote_client
from vmexec.testing.fakevm import MARKER_ENV, FakeVM, FakeVMHost, control_request
from vmexec.testing.localcloud import LocalCloud

pytestmark = pytest.mark.ssh

REGION = "us-east-1"
# Short dead-man settings (boot_env): power off 3 s after the last agent ended, looking
# twice a second. The default grace is 300 s.
AFTER_AGENT = 3
INTERVAL = 0.5
# Generous: the machines share this computer's two cores with the harness and moto.
MARGIN = 60.0

CLIENT = textwrap.dedent("""
    import json, os, sys, time
    from vmexec import VMExecutor
    from vmexec.testing.localcloud import remote_executor_options

    def where(_):
        return os.environ.get("VMEXEC_ROOT", "")

    # One slot per machine: two slots are two machines. The agents' own watchdog is
    # long: the machines must be turned off by the dead-man switch, not by it.
    ex = VMExecutor(2, provider="ec2", instance_type="c7i.large", regions=[sys.argv[2]],
                    slots_per_machine=1, heartbeat_interval=0.5, heartbeat_timeout=20,
                    watchdog_timeout=120, boot_timeout=120,
                    **remote_executor_options(json.loads(sys.argv[1])))
    deadline = time.monotonic() + 150
    while len(ex.fleet) < 2:  # the fleet grows with demand: keep work flowing
        assert time.monotonic() < deadline, f"2 machines did not join: {ex.fleet}"
        assert all(list(ex.map(where, range(8))))
    print(json.dumps([m.id for m in ex.fleet]), flush=True)
    time.sleep(600)  # killed long before
""")


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    yield from local_cloud(REGION)


def saw_agent(vm: FakeVM) -> bool:
    """Whether the machine's dead-man loop has seen an agent running (it notes the first
    one it sees in ``agent-seen``)."""
    return (vm.root / "var/lib/vmexec/agent-seen").exists()


def states(cloud: LocalCloud, ids: list[str]) -> dict[str, str]:
    return instance_states(cloud, REGION, ids)


def test_shutdown_behaviour_comes_from_the_launch_template_version(
        cloud: LocalCloud) -> None:
    """moto ignores a launch template's InstanceInitiatedShutdownBehavior (for
    CreateFleet, and RunInstances from a template) and reports "stop": the harness reads
    the template version each instance was launched with, as EC2 applies it."""
    ec2 = cloud.session.client("ec2", region_name=REGION, endpoint_url=cloud.endpoint_url)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    script = "#!/bin/sh\nexit 0\n"
    template = ec2.create_launch_template(
        LaunchTemplateName=f"deadman-{time.monotonic_ns()}", LaunchTemplateData={
            "ImageId": image, "InstanceType": "c7i.large",
            "UserData": base64.b64encode(script.encode()).decode(),
            "InstanceInitiatedShutdownBehavior": "terminate"})["LaunchTemplate"]
    template_id = template["LaunchTemplateId"]
    ec2.create_launch_template_version(  # version 2, $Latest: stop
        LaunchTemplateId=template_id, SourceVersion="1",
        LaunchTemplateData={"InstanceInitiatedShutdownBehavior": "stop"})
    fleet = ec2.create_fleet(
        Type="instant", TargetCapacitySpecification={"TotalTargetCapacity": 2,
                                                     "DefaultTargetCapacityType": "on-demand"},
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template_id, "Version": "1"}}])
    expected = {i: "terminate" for group in fleet["Instances"] for i in group["InstanceIds"]}
    for launch, behaviour in (
            (dict(LaunchTemplate={"LaunchTemplateId": template_id}), "terminate"),  # $Default
            (dict(LaunchTemplate={"LaunchTemplateId": template_id, "Version": "$Latest"}),
             "stop"),
            (dict(ImageId=image, UserData=script), "stop"),  # no template: EC2's default
            (dict(ImageId=image, UserData=script, InstanceInitiatedShutdownBehavior="terminate"),
             "terminate")):
        [instance] = ec2.run_instances(MinCount=1, MaxCount=1, **launch)["Instances"]
        expected[instance["InstanceId"]] = behaviour
    ids = list(expected)
    assert len(ids) == 6
    try:
        assert {i: cloud.vm(i).spec.shutdown_behavior for i in ids} == expected
        # What the dead-man switch runs in a machine ($VMEXEC_POWEROFF) ends each
        # instance as its behaviour says.
        poweroff = shlex.split(cloud.boot_env()["VMEXEC_POWEROFF"])
        for instance_id in ids:
            vm = cloud.vm(instance_id)
            subprocess.run(poweroff, env={MARKER_ENV: vm.marker}, check=True, timeout=60)
        final = {"terminate": "terminated", "stop": "stopped"}
        cloud.wait_for(lambda: states(cloud, ids) == {i: final[b] for i, b in expected.items()},
                       60, lambda: f"the instances to end as {expected}: {states(cloud, ids)}")
    finally:
        ec2.terminate_instances(InstanceIds=ids)
        for instance_id in ids:
            assert cloud.vm(instance_id).stopped.wait(30), instance_id


def test_killed_client_machines_power_off_by_themselves_and_terminate(
        cloud: LocalCloud, tmp_path: Path) -> None:
    """SIGKILL: no atexit, no teardown. The agents see their stream end and exit; each
    machine's dead-man loop powers it off once no agent has run for its grace, and the
    launch template's InstanceInitiatedShutdownBehavior makes that a termination."""
    boot_env = {**cloud.boot_env(), "VMEXEC_DEADMAN_AFTER_AGENT": str(AFTER_AGENT),
                "VMEXEC_DEADMAN_INTERVAL": str(INTERVAL)}
    proc, log = start_remote_client(cloud, tmp_path / "client.py", CLIENT, REGION,
                                    boot_env=boot_env)
    try:
        ids = json.loads(first_line(proc, log, 150))
        assert len(ids) == 2
        vms = [cloud.vm(i) for i in ids]
        # Before any agent, the dead-man waits for the boot grace (boot_timeout + 600 s):
        # the short one applies once it has seen an agent.
        cloud.wait_for(lambda: all(saw_agent(vm) for vm in vms), 30,
                       "the dead-man loops to see the agents")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    cloud.wait_for(lambda: set(states(cloud, ids).values()) == {"terminated"},
                   AFTER_AGENT + INTERVAL + MARGIN,
                   lambda: f"the instances to terminate: {states(cloud, ids)}")
    # Those were all of the fleet's instances: none is left running.
    tagged = {i["InstanceId"] for i in cloud.instances(REGION)
              if any(t["Key"] == "vmexec:fleet" for t in i.get("Tags", []))}
    assert tagged == set(ids)
    for vm in vms:
        assert vm.spec.shutdown_behavior == "terminate"  # from the launch template
        assert vm.stopped.wait(30), vm
        # The dead-man switch turned it off (not the agent's watchdog, not the client).
        assert f"powering off: nothing heard from a client for {AFTER_AGENT}s" in vm.boot_log()
    assert cloud.offmachine_requests == []


def answer_behind(server: socket.socket, ahead: int) -> dict[str, Any]:
    """Accept the ``ahead`` connections that fill the backlog, then answer the request
    queued behind them."""
    for _ in range(ahead):
        conn, _ = server.accept()
        conn.close()
    conn, _ = server.accept()
    conn.settimeout(30)
    with conn, conn.makefile("rwb") as stream:
        request = json.loads(stream.readline())
        stream.write(b'{"message": "ok"}\n')
        stream.flush()
    return dict(request)


@pytest.mark.parametrize("asker", ["shim", "client"])
def test_a_request_to_a_full_backlog_waits_for_room(tmp_path: Path, asker: str) -> None:
    """Every machine of a killed client's fleet asks to power off within one dead-man
    interval. A connect to a full listen backlog fails at once (EAGAIN) when the socket
    has a timeout, and a dead-man asks only once: the request must wait for room."""
    _require_sshd()  # FakeVMHost's sshd settings
    path = str(tmp_path / "ctl.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(0)
        server.settimeout(30)
        ahead = []
        while True:  # fill the backlog, without accepting
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                break
            ahead.append(sock)
        if asker == "shim":
            host = FakeVMHost(tmp_path / "host", path, "backlog-test")
            shim = subprocess.Popen([host.ctl, "poweroff"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            asking = threading.Thread(target=shim.communicate, kwargs={"timeout": 60})
        else:
            answers: list[str] = []
            asking = threading.Thread(target=lambda: answers.append(
                control_request(path, "poweroff", timeout=60)))
        asking.start()
        # Refused, it would be over at once; waiting, it still waits.
        asking.join(0.5)
        assert asking.is_alive()
        request = answer_behind(server, len(ahead))
        asking.join(30)
        for sock in ahead:
            sock.close()
    assert request["cmd"] == "poweroff"
    if asker == "shim":
        assert shim.returncode == 0
    else:
        assert answers == ["ok"]
