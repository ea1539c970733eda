"""Faults: agents whose client vanished, version mismatch, bad input, lost machines."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import helpers
from helpers_wait import wait_until
from vmexec import BrokenFleet, ConfigError, VersionMismatch, VMExecutor
from vmexec import protocol
from vmexec.protocol import FrameReader, Msg, decode, encode_frame
from vmexec.transports.local import LocalTransport


def _start_agent(watchdog: float, heartbeat: float = 0.2) -> tuple[LocalTransport, FrameReader]:
    transport = LocalTransport([sys.executable, "-m", "vmexec.agent"], label="test-agent")
    return transport, _handshake(transport, watchdog, heartbeat)


def _handshake(transport: LocalTransport, watchdog: float, heartbeat: float,
               poweroff: object = None) -> FrameReader:
    magic = b""
    while len(magic) < len(protocol.MAGIC):
        magic += transport.read(len(protocol.MAGIC) - len(magic))
    assert magic == protocol.MAGIC
    reader = FrameReader()
    hello = None
    while hello is None:
        for payload in reader.feed(transport.read(1 << 16)):
            hello = protocol.decode_handshake(payload)
    assert hello["cpu_count"] >= 1 and hello["python"][:2] == tuple(sys.version_info[:2])
    transport.write(protocol.encode_handshake({
        **protocol.local_info(), "slots": 1, "initializer": None,
        "max_tasks_per_child": None, "log_level": 30, "heartbeat_interval": heartbeat,
        "watchdog_timeout": watchdog, "poweroff": poweroff}))
    return reader


def test_agent_watchdog_ends_an_agent_whose_client_went_silent():
    transport, reader = _start_agent(watchdog=1.0)
    agent = psutil.Process(transport.pid)
    # The stream stays open but nothing is sent: a client on a dead network link.
    agent.wait(timeout=30)
    assert "nothing from the client" in transport.diagnostics()
    transport.close()


def test_agent_answers_pings_and_sends_heartbeats():
    transport, reader = _start_agent(watchdog=30.0, heartbeat=0.2)
    transport.write(encode_frame([(Msg.PING, 12.5)]))
    kinds: list[int] = []
    deadline = time.monotonic() + 20
    while not ({Msg.PONG, Msg.HEARTBEAT} <= set(kinds)) and time.monotonic() < deadline:
        for payload in reader.feed(transport.read(1 << 16)):
            kinds += [m[0] for m in decode(payload)]
    assert Msg.PONG in kinds and Msg.HEARTBEAT in kinds
    transport.close()


def test_agent_exits_when_its_client_is_killed(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import helpers
        from vmexec import VMExecutor
        ex = VMExecutor(2, provider="local")
        print(ex.submit(helpers.worker_and_agent_pids).result(timeout=60), flush=True)
        os.kill(os.getpid(), 9)
    """))
    client = subprocess.run([sys.executable, str(script), os.path.dirname(helpers.__file__)],
                            capture_output=True, text=True, timeout=120)
    assert client.returncode == -signal.SIGKILL, client.stderr
    worker_pid, agent_pid = map(int, client.stdout.split())

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # The agent sees EOF on its stdin and exits; its worker follows (parent-death signal).
    wait_until(lambda: gone(agent_pid), timeout=30, what="the agent to exit")
    wait_until(lambda: gone(worker_pid), timeout=30, what="the worker to exit")


def test_python_minor_version_mismatch_is_refused(tmp_path):
    fake = tmp_path / "python-3.2"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        exec {sys.executable} -c "import vmexec.agent.main as m; m.PYTHON_VERSION = (3, 2, 0); m.main()"
    """))
    fake.chmod(0o755)
    with VMExecutor(1, provider="local", python=str(fake)) as ex:
        future = ex.submit(helpers.add, 1)
        with pytest.raises(BrokenFleet, match="minor") as info:
            future.result(timeout=60)
    assert isinstance(info.value.__cause__, VersionMismatch)
    assert "3.2" in str(info.value)


def test_agent_that_cannot_start_breaks_with_its_stderr(tmp_path):
    with VMExecutor(1, provider="local", python=str(tmp_path / "no-such-python")) as ex:
        with pytest.raises(BrokenFleet, match="no-such-python"):
            ex.submit(helpers.add, 1).result(timeout=60)


def test_unknown_provider_names_the_choices(monkeypatch):
    with pytest.raises(ConfigError, match="unknown provider 'gcp'.*'local'"):
        VMExecutor(provider="gcp")
    monkeypatch.setenv("VMEXEC_PROVIDER", "nope")
    with pytest.raises(ValueError, match="VMEXEC_PROVIDER"):
        VMExecutor()


def test_provider_from_environment(monkeypatch):
    monkeypatch.setenv("VMEXEC_PROVIDER", "local")
    with VMExecutor(1) as ex:
        assert ex.provider.name == "local"
        assert ex.submit(helpers.add, 2).result(timeout=60) == 2


def test_ec2_is_the_default_and_checks_its_options_first(monkeypatch):
    monkeypatch.delenv("VMEXEC_PROVIDER", raising=False)
    with pytest.raises(ConfigError, match="instance_type="):
        VMExecutor(4)  # no AWS call is made before this error


def test_bad_options_are_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="does not take option.*machnes"):
        VMExecutor(2, provider="local", machnes=2)
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        VMExecutor(2, provider="local", max_tasks_per_child=0)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        VMExecutor(2, provider="local", heartbeat_interval=5, heartbeat_timeout=1)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        VMExecutor(2, provider="local", initializer="not callable")


def test_silent_machine_is_marked_lost_and_its_tasks_move(caplog):
    """A machine whose agent stops answering (frozen, not disconnected) is given up."""
    caplog.set_level(logging.WARNING, logger="vmexec.scheduler")
    with VMExecutor(2, provider="local", machines=2, heartbeat_interval=0.2,
                    heartbeat_timeout=2.0, watchdog_timeout=30.0) as ex:
        futures = [ex.submit(helpers.sleep_then_pid, 1.0) for _ in range(4)]
        wait_until(lambda: len(ex.fleet) == 2 and sum(f.running() for f in futures) >= 2)
        frozen = ex.provider._transports[ex.fleet[0].id]
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            assert len([f.result(timeout=60) for f in futures]) == 4
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
    assert any("no heartbeat" in r.getMessage() for r in caplog.records)


def test_watchdog_powers_off_a_cloud_machine(tmp_path):
    """Told it runs on a cloud machine, the watchdog calls the OS power-off."""
    shim = tmp_path / "bin"
    shim.mkdir()
    marker = tmp_path / "powered-off"
    script = shim / "fake-shutdown"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {marker}\n")
    script.chmod(0o755)
    transport = LocalTransport([sys.executable, "-m", "vmexec.agent"], label="cloud")
    # An explicit command: a test must never be able to reach the real shutdown.
    _handshake(transport, watchdog=1.0, heartbeat=0.2, poweroff=[str(script), "-h", "now"])
    psutil.Process(transport.pid).wait(timeout=30)
    assert marker.read_text().strip() == "-h now"
    transport.close()


def test_executor_collected_without_shutdown_finishes_work_and_tears_down():
    import gc
    import weakref

    ex = VMExecutor(1, provider="local")
    future = ex.submit(helpers.sleep_and_return, 0.3, "finished")
    scheduler, ref = ex._scheduler, weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None, "the scheduler must not keep the executor alive"
    assert future.result(timeout=60) == "finished"
    assert scheduler.torn_down.wait(30), "the fleet was not torn down"
    assert scheduler._provider.describe() == []


def test_keepalive_turns_an_idle_fleet_off_and_it_grows_back(caplog):
    caplog.set_level(logging.INFO, logger="vmexec.scheduler")
    with VMExecutor(2, provider="local", keepalive="1s", heartbeat_interval=0.2,
                    heartbeat_timeout=20.0, watchdog_timeout=30.0) as ex:
        assert ex.submit(helpers.add, 1).result(timeout=60) == 1
        first = ex.fleet[0].id
        wait_until(lambda: ex.fleet == [] and ex.provider.describe() == [], timeout=30,
                   what="the idle machine to be turned off")
        assert any("keepalive" in r.getMessage() for r in caplog.records)
        assert ex.submit(helpers.add, 2).result(timeout=60) == 2  # grows back on demand
        assert ex.fleet[0].id != first


def test_max_lifetime_replaces_old_machines_without_losing_work():
    with VMExecutor(1, provider="local", max_lifetime=1.0, heartbeat_interval=0.2,
                    heartbeat_timeout=20.0, watchdog_timeout=30.0) as ex:
        futures = [ex.submit(helpers.sleep_then_pid, 0.2) for _ in range(30)]
        pids = {f.result(timeout=120) for f in futures}
    assert len(pids) >= 2  # the first machine was drained and replaced mid-run


def test_interruption_notice_moves_queued_work_and_replaces_the_machine(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vmexec.scheduler")
    ex = VMExecutor(2, provider="local", machines=2, heartbeat_interval=0.2,
                    heartbeat_timeout=20.0, watchdog_timeout=30.0)
    # The EC2 provider points agents at the file its boot script's metadata poller
    # writes; here each machine gets its own file in tmp_path.
    ex.provider.agent_options = lambda record: {"notice_file": str(tmp_path / record.id)}
    with ex:
        futures = [ex.submit(helpers.sleep_then_pid, 0.2) for _ in range(24)]
        wait_until(lambda: len(ex.fleet) == 2 and all(
            m.inflight for m in ex._scheduler.machines()), what="both machines busy")
        doomed = ex.fleet[0]
        (tmp_path / doomed.id).write_text("spot interruption: terminate at 12:00:00Z")
        assert len([f.result(timeout=120) for f in futures]) == 24
        wait_until(lambda: doomed.id not in [m.id for m in ex.fleet], timeout=30,
                   what="the interrupted machine to be retired")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "going away (spot interruption" in messages
    assert "max_lifetime" not in messages


def test_local_provider_runs_cloud_scripts_unchanged(caplog):
    caplog.set_level(logging.INFO, logger="vmexec.providers.local")
    with VMExecutor(2, provider="local", instance_type=["c7g.large", "c7i.large"],
                    regions=["us-east-1", "us-west-2"], spot=True) as ex:
        assert ex.submit(helpers.add, 1, 2).result(timeout=60) == 3
    assert "ignores the cloud option(s) instance_type, regions, spot" in caplog.text


def test_environment_skew_between_client_and_machine_is_refused(tmp_path, monkeypatch):
    """The machine reports the environment it installed; a different one is refused."""
    root = tmp_path / "machine-root"
    (root / "opt" / "vmexec").mkdir(parents=True)
    (root / "opt" / "vmexec" / "env-hash").write_text("aaaa1111 1700000000\n")
    monkeypatch.setenv("VMEXEC_ROOT", str(root))  # the local agent inherits it
    ex = VMExecutor(1, provider="local")
    ex.provider.agent_options = lambda record: {"environment_hash": "bbbb2222 1700000500"}
    with ex:
        with pytest.raises(BrokenFleet, match="STALE") as info:
            ex.submit(helpers.add, 1).result(timeout=60)
    assert type(info.value.__cause__).__name__ == "EnvSyncError"
