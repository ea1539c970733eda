"""Named fleets: ``name=`` makes a fleet findable and reusable.

End to end on the local cloud (moto + fake VMs with real sshd): a first run launches and
installs; its shutdown keeps the ready machines warm; a second run with the same name
reuses them (no launch call, no boot, no install: the environment hash matches); after
an edit of the user's code a third run re-syncs just that code; their dead-man switch
turns idle machines off after ``keepalive``; ``vmexec cleanup --fleet`` removes the rest.
Plus, on moto alone: the persisted keys, another owner's name, and the keep-warm
teardown's bookkeeping.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmexec.errors import ConfigError
from vmexec.providers.ec2.userdata import FleetKeys, named_fleet_directory

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _require_sshd() -> None:
    from vmexec.testing.sshd import sshd_available

    problem = sshd_available()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the local-cloud tests but: {problem}")
        pytest.skip(f"needs OpenSSH's sshd: {problem} (apt-get install openssh-server)")


def where_am_i(x: int) -> tuple[int, str]:
    import fleetmath

    # The fake VM's root is .../<instance id>/root: which machine ran the task.
    return fleetmath.scale(x), Path(os.environ.get("VMEXEC_ROOT", "")).parent.name


def test_keys_of_a_named_fleet_persist_and_must_be_private(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMEXEC_FLEETS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = named_fleet_directory("vmx-nightly")
    assert directory == str(tmp_path / "vmexec" / "fleets" / "vmx-nightly")
    first = FleetKeys("vmx-nightly", directory)
    again = FleetKeys("vmx-nightly", directory)
    assert (again.client_public, again.host_public) == (first.client_public, first.host_public)
    assert oct(os.stat(directory).st_mode & 0o777) == "0o700"
    first.remove()  # a named fleet's keys survive the run
    assert Path(first.client_key).exists()
    os.chmod(first.client_key, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        FleetKeys("vmx-nightly", directory)
    first.destroy()
    assert not Path(directory).exists()
    ephemeral = FleetKeys("vmx-12345678")
    assert ephemeral.client_public != first.client_public
    ephemeral.remove()
    assert not Path(ephemeral.directory).exists()


def test_reuse_resync_keepalive_and_cleanup_on_the_local_cloud(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    _require_sshd()
    from vmexec import VMExecutor
    from vmexec.cli import main as cli_main
    from vmexec.testing.localcloud import LocalCloud

    monkeypatch.setenv("VMEXEC_FLEETS_DIR", str(tmp_path / "fleets"))
    code = tmp_path / "project"
    code.mkdir()
    (code / "fleetmath.py").write_text("def scale(x):\n    return 3 * x\n")
    monkeypatch.chdir(code)
    monkeypatch.syspath_prepend(str(code))
    caplog.set_level(logging.INFO, logger="vmexec")

    with LocalCloud(regions=["us-east-1"], vm_tools=("uv",)) as cloud:
        boot_env = {**cloud.boot_env(), "VMEXEC_DEADMAN_INTERVAL": "0.5"}

        def run(keepalive: float) -> tuple[list[tuple[int, str]], Any]:
            # fleetmath changes between runs: a fresh import in the client each time.
            sys.modules.pop("fleetmath", None)
            options = cloud.executor_options(environment=["tenacity"], boot_env=boot_env)
            with VMExecutor(2, provider="ec2", instance_type="c7i.large",
                            regions=["us-east-1"], name="nightly", keepalive=keepalive,
                            heartbeat_interval=0.5, boot_timeout=180.0, **options) as ex:
                results = list(ex.map(where_am_i, range(6)))
            return results, ex._provider

        def launches() -> int:
            return sum(n for (_, op), n in cloud.api_calls.items()
                       if op in ("CreateFleet", "RunInstances"))

        # 1. A first run launches, installs, and keeps its machine warm.
        results, provider = run(keepalive=300)
        assert [r[0] for r in results] == [0, 3, 6, 9, 12, 15]
        machines = {r[1] for r in results}
        assert len(machines) == 1 and provider.fleet_id == "vmx-nightly"
        assert provider.teardown_summary.clean
        assert [r.id for r in provider.teardown_summary.kept] == sorted(machines)
        live = {i["InstanceId"]: i["State"]["Name"] for i in cloud.instances()}
        assert live == {next(iter(machines)): "running"}
        kinds = [kind for _, kind, _ in cloud.tagged_resources()]
        assert "launch-template" not in kinds and kinds.count("security-group") == 1
        assert "kept warm" in caplog.text  # in the receipt and the teardown line
        [machine] = machines
        venv = cloud.vm(machine).root / "opt" / "vmexec" / "venv"
        (venv / "made-by-run-1").write_text("")
        calls = launches()

        # 2. The same name reuses it: no launch call, no new venv.
        caplog.clear()
        results, provider = run(keepalive=300)
        assert [r[0] for r in results] == [0, 3, 6, 9, 12, 15]
        assert {r[1] for r in results} == machines
        assert launches() == calls
        assert (venv / "made-by-run-1").exists()
        assert "reusing 1 running machine" in caplog.text

        # 3. Only the user's code changed: the same machine, the same venv, new code.
        (code / "fleetmath.py").write_text("def scale(x):\n    return 4 * x\n")
        results, provider = run(keepalive=2)
        assert [r[0] for r in results] == [0, 4, 8, 12, 16, 20]
        assert {r[1] for r in results} == machines and launches() == calls
        assert (venv / "made-by-run-1").exists()

        # 4. keepalive=2 for this client: its dead-man switch turns the machine off
        #    (terminated: InstanceInitiatedShutdownBehavior) seconds after the agent.
        root = cloud.vm(machine).root
        try:
            cloud.wait_for(lambda: all(i["State"]["Name"] == "terminated"
                                       for i in cloud.instances()), timeout=60)
        except TimeoutError:
            agents = subprocess.run(["pgrep", "-af", "vmexec.agent"], capture_output=True,
                                    text=True).stdout
            grace = root / "opt" / "vmexec" / "client" / "agent-grace"
            pytest.fail(f"the machine did not power off: {cloud.instances()}\nagent-grace: "
                        f"{grace.read_text() if grace.exists() else 'missing'!r}\n"
                        f"agents:\n{agents}\nboot log ends:\n"
                        f"{(root / 'var/log/vmexec-boot.log').read_text()[-2000:]}")
        boot_log = (root / "var" / "log" / "vmexec-boot.log").read_text()
        assert "powering off: nothing heard from a client for 2s" in boot_log

        # 5. What the named fleet still holds (its security group, staged environment)
        #    goes with `vmexec cleanup --fleet`.
        assert {kind for _, kind, _ in cloud.tagged_resources()} <= {"security-group",
                                                                      "s3-bucket"}
        code_ = cli_main(["cleanup", "--fleet", "vmx-nightly", "--region", "us-east-1",
                          "--endpoint-url", cloud.endpoint_url, "--yes"])
        assert code_ == 0
        assert cloud.tagged_resources() == []
        s3 = cloud.session.client("s3", region_name="us-east-1",
                                  endpoint_url=cloud.endpoint_url)
        assert s3.list_buckets()["Buckets"] == []
        assert cloud.offmachine_requests == []


# --- the control plane alone (moto): keep-warm teardown, adoption, owners ---------------

ONE_REGION = dict(instance_type=["c7i.large"], regions=["us-east-1"])


def _kinds(found: list[Any]) -> list[str]:
    return sorted(r.kind for r in found)


def test_keep_warm_keeps_ready_machines_and_a_second_run_adopts_them(
        make_provider: Any, session: Any, calls: Any) -> None:
    from aws_fixtures import launches, tagged

    first = make_provider(4, name="warm", **ONE_REGION)
    records = first.launch(4)
    assert len(records) == 2  # two c7i.large of 2 slots
    records[0].state = "ready"  # its agent answered; the other is still booting
    first.terminate(None)
    summary = first.teardown_summary
    assert summary.clean and [r.id for r in summary.kept] == [records[0].id]
    assert summary.deleted.get("instance") == 1 and summary.deleted.get("launch-template") == 1
    left = tagged(session, ["us-east-1"], "vmx-warm")
    assert [r.id for r in left if r.kind == "instance"] == [records[0].id]
    assert "launch-template" not in _kinds(left) and _kinds(left).count("security-group") == 1
    [group] = [r.id for r in left if r.kind == "security-group"]
    assert Path(named_fleet_directory("vmx-warm"), "client_ed25519").exists()

    before = launches(calls)
    second = make_provider(4, name="warm", **ONE_REGION)
    assert second.keys.client_public == first.keys.client_public  # it can log in
    adopted = second.launch(4)
    assert [r.id for r in adopted] == [records[0].id] and launches(calls) == before
    added = second.launch(2)  # the rest is launched, into the kept security group
    assert len(added) == 1 and launches(calls) == before + 1
    ec2 = session.client("ec2", region_name="us-east-1")
    [template] = ec2.describe_launch_templates(LaunchTemplateNames=["vmexec-vmx-warm"])[
        "LaunchTemplates"]  # the old one was replaced
    [version] = ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"])["LaunchTemplateVersions"]
    assert version["LaunchTemplateData"]["SecurityGroupIds"] == [group]

    # Interrupted (SIGINT/SIGTERM): a named fleet is removed, keys included.
    second.start_background_teardown().join(timeout=120)
    assert second.teardown_summary is not None and second.teardown_summary.clean
    assert not second.teardown_summary.kept
    assert tagged(session, ["us-east-1"], "vmx-warm") == []
    assert not Path(named_fleet_directory("vmx-warm")).exists()


def test_machines_of_types_no_longer_planned_are_terminated(make_provider: Any,
                                                            session: Any) -> None:
    from aws_fixtures import tagged

    first = make_provider(2, name="retype", **ONE_REGION)
    [old] = first.launch(2)
    old.state = "ready"
    first.terminate(None)
    second = make_provider(2, name="retype", instance_type=["c7g.large"],
                           regions=["us-east-1"])
    [new] = second.launch(2)
    assert new.instance_type == "c7g.large" and new.id != old.id
    live = [r.id for r in tagged(session, ["us-east-1"], "vmx-retype")
            if r.kind == "instance" and r.state in ("pending", "running")]
    assert live == [new.id]


def test_a_name_another_owner_uses_is_refused_before_anything_is_launched(
        make_provider: Any, calls: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from aws_fixtures import launches
    from vmexec.providers.ec2 import resources

    make_provider(2, name="shared", **ONE_REGION).launch(2)
    before = launches(calls)
    bob = "arn:aws:iam::123456789012:user/bob"
    monkeypatch.setattr(resources, "caller_owner", lambda sts: bob)
    with pytest.raises(ConfigError, match=r"belongs to .* not to arn:aws:iam::123456789012:"
                                          r"user/bob.*another name="):
        make_provider(2, name="shared", **ONE_REGION)
    assert launches(calls) == before


def test_machines_another_client_is_using_are_not_adopted(make_provider: Any,
                                                         calls: Any) -> None:
    from aws_fixtures import launches

    first = make_provider(2, name="shared-run", **ONE_REGION)
    [mine] = first.launch(2)
    mine.state = "ready"
    before = launches(calls)
    second = make_provider(2, name="shared-run", **ONE_REGION)  # while the first works
    [theirs] = second.launch(2)
    assert theirs.id != mine.id and launches(calls) == before + 1
    theirs.state = "ready"
    first.terminate(None)  # keeps its machine warm and marks it free
    second.terminate(None)
    third = make_provider(4, name="shared-run", **ONE_REGION)
    assert sorted(r.id for r in third.launch(4)) == sorted([mine.id, theirs.id])
    assert launches(calls) == before + 1


def test_keep_active_marks_a_setup_in_progress_and_dies_with_its_session(
        tmp_path: Path) -> None:
    """An install over SSH keeps the dead-man switch from firing under it, and a lost
    session cannot keep a machine alive."""
    import signal
    import time

    from vmexec.providers.ec2.userdata import keep_active_command

    active = tmp_path / "opt" / "vmexec" / "client" / "active"
    active.parent.mkdir(parents=True)
    done = subprocess.run(["sh", "-c", keep_active_command("sleep 1.2; exit 3",
                                                           root=str(tmp_path), every=1)])
    assert done.returncode == 3 and active.exists()  # the command's status is kept

    # The session's shell is killed (the connection broke): the toucher stops.
    session = subprocess.Popen(["sh", "-c", keep_active_command(
        "sleep 30", root=str(tmp_path), every=1)], start_new_session=True)
    time.sleep(1.5)
    os.kill(session.pid, signal.SIGKILL)
    session.wait()
    time.sleep(2.5)  # the toucher notices within `every` seconds
    stamp = active.stat().st_mtime
    time.sleep(2.0)
    assert active.stat().st_mtime == stamp
    os.killpg(session.pid, signal.SIGKILL)  # the orphaned `sleep 30`
