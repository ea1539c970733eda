"""``vmexec ls`` and ``vmexec cleanup`` against a moto server, after a client was killed.

A client process launches a fleet against a ``ThreadedMotoServer`` on 127.0.0.1 and is
killed with SIGKILL (no atexit, no signal handler: exactly what leaks resources); the
CLI then finds its resources by tag and removes them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import pytest

from aws_fixtures import REGIONS
from vmexec import cli
from vmexec.providers.ec2.resources import find_resources


@pytest.fixture
def url(server_url: str) -> str:
    return server_url


KILLED_CLIENT = textwrap.dedent("""
    import sys, time
    import boto3
    from vmexec.providers.ec2 import EC2Provider

    provider = EC2Provider(8, instance_type=["c7g.large", "c7i.large"],
                           regions=["us-east-1", "us-west-2"], ssh_cidr="203.0.113.7/32",
                           endpoint_url=sys.argv[1], name=sys.argv[2],
                           session=boto3.Session(region_name="us-east-1"), environment=None)
    provider.launch(8)
    print(provider.fleet_id, flush=True)
    time.sleep(600)
""")


def killed_client(tmp_path: Path, url: str, name: str) -> str:
    """Launch a fleet in a subprocess, SIGKILL it; return the fleet id it leaked."""
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), url, name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    fleet = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    assert fleet.startswith("vmx-"), stderr
    return fleet


def leftovers(url: str, fleet: str | None = None) -> list[object]:
    session = boto3.Session(region_name="us-east-1")
    found: list[object] = []
    for region in REGIONS:
        ec2 = session.client("ec2", region_name=region, endpoint_url=url)
        found += find_resources(ec2, region, fleet=fleet)
    return found


def run(url: str, *args: str) -> int:
    regions = [a for r in REGIONS for a in ("--region", r)]
    return cli.main([args[0], "--endpoint-url", url, *regions, *args[1:]])


def test_ls_and_cleanup_after_a_killed_client(tmp_path: Path, url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    fleet = killed_client(tmp_path, url, "killed-run")
    leaked = leftovers(url, fleet)
    assert {r.kind for r in leaked} == {"instance", "volume", "security-group",  # type: ignore
                                        "launch-template"}

    assert run(url, "ls") == 0
    out = capsys.readouterr().out
    for resource in leaked:
        assert resource.id in out  # type: ignore[attr-defined]
    assert fleet in out and "killed-run" in out and "arn:aws:" in out
    assert "4 instance(s)" in out and "in 1 fleet(s)" in out

    # Dry run by default: shows, deletes nothing.
    assert run(url, "cleanup") == 0
    out = capsys.readouterr().out
    assert "would delete" in out and "--yes" in out
    assert len(leftovers(url, fleet)) == len(leaked)

    assert run(url, "cleanup", "--yes") == 0
    out = capsys.readouterr().out
    assert "deleted 4 instance(s), 2 launch-template(s), 2 security-group(s)" in out
    assert leftovers(url) == []

    assert run(url, "ls") == 0
    assert "no vmexec resources in 2 region(s)" in capsys.readouterr().out


def test_cleanup_filters_by_fleet_and_age(tmp_path: Path, url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    first = killed_client(tmp_path, url, "first")
    second = killed_client(tmp_path, url, "second")
    # Both are seconds old: an age filter spares them.
    assert run(url, "cleanup", "--older-than", "2h", "--yes") == 0
    assert "nothing to clean up" in capsys.readouterr().out
    assert leftovers(url, first) and leftovers(url, second)
    assert run(url, "cleanup", "--fleet", first, "--yes") == 0
    assert first in capsys.readouterr().out
    assert leftovers(url, first) == [] and leftovers(url, second)
    assert run(url, "ls") == 0
    out = capsys.readouterr().out
    assert second in out and first not in out


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ls" in out and "cleanup" in out
    assert cli.main([]) == 2


@pytest.mark.parametrize("module", ["vmexec", "vmexec.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    """``python -m vmexec`` and ``python -m vmexec.cli`` are the console script."""
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("vmexec "), done.stderr


def test_bad_age_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cleanup", "--older-than", "soon"])
    assert exit_info.value.code == 2
    assert "cannot read the age 'soon'" in capsys.readouterr().err


def test_no_credentials(aws_env: None, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert cli.main(["ls", "--region", "us-east-1"]) == 2
    assert "no AWS credentials found" in capsys.readouterr().err


def test_adding_a_command_is_one_function(capsys: pytest.CaptureFixture[str]) -> None:
    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.regions}")
        return 0

    cli.command("hello", "say hello", cli.region_options)(hello)
    try:
        assert cli.main(["hello", "--region", "eu-west-1"]) == 0
        assert "hello ['eu-west-1']" in capsys.readouterr().out
    finally:
        del cli.COMMANDS["hello"]
