"""Teardown leaves nothing tagged behind: after shutdown, after an exception in the
``with`` block, after SIGINT/SIGTERM and at interpreter exit.

The signal and exit cases run a real client in a subprocess against a
``ThreadedMotoServer`` on 127.0.0.1 (the subprocess shares its state), then check the
server by tag in every region the fleet used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest

from aws_fixtures import MIXED, REGIONS, TEST_CIDR, tagged
from vmexec import VMExecutor
from vmexec.errors import BrokenFleet
from vmexec.providers.ec2 import EC2Provider
from vmexec.providers.ec2.clients import RetryingClient, in_every_region, retrying
from vmexec.providers.ec2.resources import find_resources
from vmexec.providers.ec2.teardown import sweep
from vmexec.testing.faults import ApiCallCounter

Make = Callable[..., EC2Provider]


def test_shutdown_leaves_nothing_in_any_region(make_provider: Make, session: boto3.Session,
                                               calls: ApiCallCounter) -> None:
    provider = make_provider(24)
    records = provider.launch(24)
    assert len(records) == 12
    assert {r.kind for r in tagged(session, REGIONS)} >= {
        "instance", "volume", "security-group", "launch-template"}
    calls.reset()
    provider.terminate(None)
    assert tagged(session, REGIONS) == []
    summary = provider.teardown_summary
    assert summary is not None and summary.clean
    assert summary.deleted == {"instance": 12, "security-group": 2, "launch-template": 2}
    assert set(summary.regions) == set(REGIONS)
    # One TerminateInstances per region, not per machine.
    assert calls["TerminateInstances"] == len(REGIONS)
    assert all(r.state == "terminated" for r in records) and provider.describe() == []
    assert not os.path.exists(provider.keys.directory)
    provider.terminate(None)  # idempotent
    assert provider.launch(4) == []  # a torn-down fleet launches nothing


def test_terminate_some_records(make_provider: Make, session: boto3.Session) -> None:
    provider = make_provider(8)
    records = provider.launch(8)
    provider.terminate(records[:2])
    left = {r.id for r in tagged(session, REGIONS) if r.kind == "instance"}
    assert left == {r.id for r in records[2:]}
    assert {r.id for r in provider.describe()} == left


def test_unused_fleet_creates_and_deletes_nothing(make_provider: Make,
                                                  calls: ApiCallCounter) -> None:
    provider = make_provider(8)
    before = calls.total
    provider.terminate(None)
    assert calls.total == before  # nothing was made, so nothing to find


def test_sweep_finds_leftovers_by_tag(make_provider: Make, session: boto3.Session) -> None:
    first = make_provider(4, regions="us-east-1")
    second = make_provider(4, regions="us-east-1")
    first.launch(4)
    second.launch(4)
    ec2 = session.client("ec2", region_name="us-east-1")
    summary = sweep({"us-east-1": ec2}, fleet=first.fleet_id)
    assert summary.clean and summary.deleted["instance"] == 2
    assert find_resources(ec2, "us-east-1", fleet=first.fleet_id) == []
    assert find_resources(ec2, "us-east-1", fleet=second.fleet_id)


def test_provider_sweep_removes_only_this_owners_old_fleets(
        make_provider: Make, session: boto3.Session) -> None:
    old_mine, old_theirs, current = (make_provider(4, regions="us-east-1") for _ in range(3))
    for provider in (old_mine, old_theirs, current):
        provider.launch(4)
    ec2 = session.client("ec2", region_name="us-east-1")

    def retag(provider: EC2Provider, **tags: str) -> None:
        ids = [r.id for r in find_resources(ec2, "us-east-1", fleet=provider.fleet_id)]
        ec2.create_tags(Resources=ids, Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    retag(old_mine, **{"vmexec:created": "2020-01-01T00:00:00Z"})
    retag(old_theirs, **{"vmexec:created": "2020-01-01T00:00:00Z",
                         "vmexec:owner": "someone@elsewhere"})
    current.sweep()
    # (moto's CreateTags does not retag launch templates, so old_mine's still looks new.)
    assert {r.kind for r in find_resources(ec2, "us-east-1", fleet=old_mine.fleet_id)} \
        <= {"launch-template"}
    assert find_resources(ec2, "us-east-1", fleet=old_theirs.fleet_id)  # maybe still running
    assert find_resources(ec2, "us-east-1", fleet=current.fleet_id)


# --- through the executor: machines that never boot ---------------------------------------

def _unreachable(record: Any) -> tuple[str, int]:
    return ("127.0.0.1", 9)  # nothing listens: SSH is refused at once


def test_exception_in_with_block(session: boto3.Session) -> None:
    options = dict(provider="ec2", instance_type=MIXED, regions=REGIONS, ssh_cidr=TEST_CIDR,
                   session=session, handle_signals=False, address_for=_unreachable,
                   boot_timeout=2, heartbeat_interval=0.5, environment=None)
    with pytest.raises(ZeroDivisionError):
        with VMExecutor(8, **options) as ex:
            future = ex.submit(pow, 2, 5)
            fleet_id = ex.provider.fleet_id  # type: ignore[attr-defined]
            1 / 0
    # The machines could not boot: the futures fail with BrokenFleet, not hang ...
    with pytest.raises(BrokenFleet):
        future.result(timeout=60)
    # ... and everything the fleet created is gone, in every region.
    assert tagged(session, REGIONS, fleet_id) == []
    assert tagged(session, REGIONS) == []


# --- a real client process against a moto server -------------------------------------------

def server_leftovers(url: str, regions: list[str]) -> list[Any]:
    session = boto3.Session(region_name="us-east-1")
    found = []
    for region in regions:
        ec2 = session.client("ec2", region_name=region, endpoint_url=url)
        found += find_resources(ec2, region)
    return found


CLIENT = textwrap.dedent("""
    import sys, time, logging, signal
    import boto3
    from vmexec import VMExecutor
    from vmexec.providers.ec2 import EC2Provider

    url, mode = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    # A program started from a terminal: SIGHUP is not ignored, even when the tests
    # themselves run under nohup (vmexec leaves an ignored SIGHUP ignored).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    options = dict(instance_type=["c7g.large", "c7i.large"],
                   regions=["us-east-1", "us-west-2"], ssh_cidr="203.0.113.7/32",
                   endpoint_url=url, session=boto3.Session(region_name="us-east-1"),
                   address_for=lambda record: ("127.0.0.1", 9), boot_timeout=600,
                   environment=None)
    if mode == "provider":   # no executor, no terminate(): atexit must clean up
        provider = EC2Provider(8, **options)
        provider.launch(8)
        print("LAUNCHED", provider.fleet_id, flush=True)
        sys.exit(0)
    with VMExecutor(8, provider="ec2", **options) as ex:
        futures = [ex.submit(pow, 2, i) for i in range(8)]
        while len(ex.provider.describe()) < 4:   # launched; they never boot
            time.sleep(0.05)
        print("LAUNCHED", ex.provider.fleet_id, flush=True)
        futures[0].result()   # blocks until a signal arrives
""")


def run_client(tmp_path: Path, url: str, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}
    proc = subprocess.Popen([sys.executable, str(script), url, mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LAUNCHED"):
        proc.kill()
        raise AssertionError(f"client did not launch: {line!r}\n{proc.communicate()[1]}")
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_the_fleet_down(tmp_path: Path, server_url: str, signum: int) -> None:
    server = server_url
    proc = run_client(tmp_path, server, "wait")
    assert {r.kind for r in server_leftovers(server, REGIONS)} >= {"instance",
                                                                  "security-group"}
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in stderr  # Ctrl-C still interrupts the program
    else:
        assert proc.returncode == 128 + signal.SIGTERM
    assert "tearing down 1 EC2 fleet" in stderr
    assert server_leftovers(server, REGIONS) == [], stderr[-3000:]


def test_interpreter_exit_tears_the_fleet_down(tmp_path: Path, server_url: str) -> None:
    server = server_url
    proc = run_client(tmp_path, server, "provider")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert server_leftovers(server, REGIONS) == [], stderr[-3000:]


# --- the shared pieces: every region at once, clients that retry throttling --------------

def test_in_every_region_finishes_every_region_before_raising() -> None:
    done: list[str] = []

    def one(region: str) -> str:
        if region == "us-east-1":
            raise ValueError(f"{region} failed")
        done.append(region)
        return region.upper()

    with pytest.raises(ValueError, match="us-east-1 failed"):
        in_every_region(one, ["us-east-1", "us-west-2", "eu-west-1"])
    assert sorted(done) == ["eu-west-1", "us-west-2"]
    assert in_every_region(one, ["us-west-2", "eu-west-1"]) == {
        "us-west-2": "US-WEST-2", "eu-west-1": "EU-WEST-1"}


def test_retrying_client_wraps_api_calls_only(session: boto3.Session,
                                              calls: ApiCallCounter) -> None:
    raw = session.client("ec2", region_name="us-east-1")
    client = retrying(raw)
    assert isinstance(client, RetryingClient) and retrying(client) is client
    assert client.meta is raw.meta and client.exceptions is raw.exceptions
    assert client.describe_regions()["Regions"]
    assert calls["DescribeRegions"] == 1
    # The waiter is botocore's own (the teardown configures its delay).
    assert client.get_waiter("instance_terminated").name == "InstanceTerminated"

