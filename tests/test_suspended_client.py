"""A suspended client must not keep machines alive (issue 12, item 1).

A laptop whose lid closes in the middle of a ``map`` stops reading, but its TCP
connections stay open: the agents' writes of large results fill the SSH window and the
pipes, and block. Before the fix an agent blocked in ``write`` never ran its watchdog, and
the boot script's dead-man loop counted the running agent process as "client alive": the
machines ran on until someone noticed.

Each test starts a real client process against a ``LocalCloud`` (as ``test_deadman.py``
does), lets it stream large results, then SIGSTOPs it. Every instance must be off
within the agent's ``watchdog_timeout`` (first test) or the dead-man grace (second
test) plus a margin for this shared computer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import first_line, instance_states, local_cloud, start_remote_client
from vmexec.testing.localcloud import LocalCloud

pytestmark = pytest.mark.ssh

REGION = "us-east-1"
INTERVAL = 0.5  # the dead-man loop looks twice a second
MARGIN = 60.0  # generous: machines share two cores with the harness and moto

CLIENT = textwrap.dedent("""
    import json, os, sys
    from vmexec import VMExecutor
    from vmexec.testing.localcloud import remote_executor_options

    def big(i):
        return os.urandom(16) * (1 << 18)  # 4 MiB per result

    ex = VMExecutor(2, provider="ec2", instance_type="c7i.large", regions=[sys.argv[2]],
                    slots_per_machine=1, heartbeat_interval=0.5, heartbeat_timeout=30,
                    watchdog_timeout=float(sys.argv[3]), boot_timeout=120,
                    **remote_executor_options(json.loads(sys.argv[1])))
    said = False
    while True:  # large results, for ever: the test suspends this process meanwhile
        for _ in ex.map(big, range(32)):
            if not said and len(ex.fleet) == 2:
                print(json.dumps([m.id for m in ex.fleet]), flush=True)
                said = True
""")


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    yield from local_cloud(REGION)


def states(cloud: LocalCloud, ids: list[str]) -> dict[str, str]:
    return instance_states(cloud, REGION, ids)


def run_and_suspend(cloud: LocalCloud, tmp_path: Path, watchdog: float,
                    boot_env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str], Path]:
    """Start the client, wait until both machines stream results, then SIGSTOP it."""
    proc, log = start_remote_client(cloud, tmp_path / "client.py", CLIENT, REGION,
                                    str(watchdog), boot_env=boot_env)
    try:
        # The client prints once both machines answered.
        ids = json.loads(first_line(proc, log, 240))
        assert len(ids) == 2
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    proc.send_signal(signal.SIGSTOP)  # mid-map: results keep coming, nobody reads them
    return proc, ids, log


def wait_all_off(cloud: LocalCloud, ids: list[str], within: float, log: Path) -> None:
    def diagnosis() -> str:
        tails = "\n".join(f"--- {i} boot log ends:\n{cloud.vm(i).boot_log()[-800:]}"
                          for i in ids)
        return f"every instance off: {states(cloud, ids)}\n{tails}"

    cloud.wait_for(lambda: set(states(cloud, ids).values()) == {"terminated"}, within,
                   diagnosis)
    tagged = {i["InstanceId"] for i in cloud.instances(REGION)
              if i["State"]["Name"] != "terminated"
              and any(t["Key"] == "vmexec:fleet" for t in i.get("Tags", []))}
    assert tagged == set()


def end(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGKILL)  # also ends a stopped process
    proc.communicate(timeout=30)


def test_agent_watchdog_runs_while_its_writes_to_a_suspended_client_block(
        cloud: LocalCloud, tmp_path: Path) -> None:
    """The dead-man grace is long here: the agents' own watchdog must power the
    machines off, although the client stopped reading their results."""
    watchdog = 6.0
    boot_env = {**cloud.boot_env(), "VMEXEC_DEADMAN_AFTER_AGENT": "3600",
                "VMEXEC_DEADMAN_INTERVAL": str(INTERVAL)}
    proc, ids, log = run_and_suspend(cloud, tmp_path, watchdog, boot_env)
    try:
        wait_all_off(cloud, ids, watchdog + MARGIN, log)
    finally:
        end(proc)
    for instance_id in ids:
        # Not the dead-man loop: the agent, whose loop kept running.
        assert "powering off" not in cloud.vm(instance_id).boot_log()
    assert cloud.offmachine_requests == []


def test_deadman_counts_frames_received_not_a_running_agent(
        cloud: LocalCloud, tmp_path: Path) -> None:
    """The dead-man loop must see that no frame arrived although the agents are still
    running. While an agent runs, its idle client may be silent for half the
    watchdog_timeout (the agent tells the loop): with a watchdog of 40 s and a grace of
    4 s the loop powers off after 21 s, long before the agents' own watchdog."""
    grace, watchdog = 4, 40.0
    limit = int(watchdog / 2) + 1
    boot_env = {**cloud.boot_env(), "VMEXEC_DEADMAN_AFTER_AGENT": str(grace),
                "VMEXEC_DEADMAN_INTERVAL": str(INTERVAL)}
    proc, ids, log = run_and_suspend(cloud, tmp_path, watchdog, boot_env)
    try:
        wait_all_off(cloud, ids, limit + INTERVAL + MARGIN, log)
    finally:
        end(proc)
    for instance_id in ids:
        assert f"powering off: nothing heard from a client for {limit}s" in \
            cloud.vm(instance_id).boot_log()
    assert cloud.offmachine_requests == []


IDLE_CLIENT = textwrap.dedent("""
    import json, os, sys, time
    from vmexec import VMExecutor
    from vmexec.testing.localcloud import remote_executor_options

    def where(_):
        return os.environ.get("VMEXEC_ROOT", "")

    ex = VMExecutor(1, provider="ec2", instance_type="c7i.large", regions=[sys.argv[2]],
                    slots_per_machine=1, heartbeat_interval=0.5, heartbeat_timeout=30,
                    watchdog_timeout=30, boot_timeout=120, keepalive=600,
                    **remote_executor_options(json.loads(sys.argv[1])))
    first = set(ex.map(where, range(4)))
    time.sleep(12)  # idle: the client only pings, every watchdog_timeout/6 at most
    second = set(ex.map(where, range(4)))
    print(json.dumps([m.id for m in ex.fleet] + [first == second]), flush=True)
    ex.shutdown()
""")


def test_an_idle_client_keeps_its_machines(cloud: LocalCloud, tmp_path: Path) -> None:
    """Frames are liveness, and an idle client sends few: with a dead-man grace shorter
    than its ping interval, a running agent's machine must still stay on."""
    boot_env = {**cloud.boot_env(), "VMEXEC_DEADMAN_AFTER_AGENT": "2",
                "VMEXEC_DEADMAN_INTERVAL": str(INTERVAL)}
    proc, log = start_remote_client(cloud, tmp_path / "idle.py", IDLE_CLIENT, REGION,
                                    boot_env=boot_env)
    try:
        out, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        end(proc)
        raise
    assert proc.returncode == 0, log.read_text()[-3000:]
    *ids, same_machine = json.loads(out.strip().splitlines()[-1])
    # The same machine served both maps: it did not power off while the client idled.
    assert same_machine is True and len(ids) == 1
    assert "nothing heard from a client" not in cloud.vm(ids[0]).boot_log()
