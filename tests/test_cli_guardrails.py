"""``vmexec prices`` and ``vmexec doctor`` against a moto server (and a real sshd)."""

from __future__ import annotations

import socket
import sys

import pytest

from vmexec import __version__, cli
from vmexec.testing.sshd import SSHServer


@pytest.fixture
def url(server_url: str) -> str:
    return server_url


def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)


def table(out: str) -> list[str]:
    """The printed table (the in-process moto server may print its own lines too)."""
    lines = out.strip().splitlines()
    start = next(i for i, text in enumerate(lines) if text.startswith("TYPE "))
    return [text for text in lines[start:] if text.strip()]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- prices ----------------------------------------------------------------------------

def test_prices_table(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prices", "c7g.large", "c7i.xlarge", "--regions", "us-east-1",
                     "eu-west-1", "--endpoint-url", url]) == 0
    header, *rows = table(capsys.readouterr().out)
    assert header.split() == ["TYPE", "REGION", "PURCHASE", "VCPUS", "$/H", "$/VCPU-H",
                              "SOURCE"]
    assert len(rows) == 4
    # moto has no Price List API: the bundled table answers; vCPUs come from moto.
    assert rows[0].split()[:6] == ["c7g.large", "us-east-1", "on-demand", "2", "$0.0725",
                                   "$0.03625"]
    assert rows[3].split()[:6] == ["c7i.xlarge", "eu-west-1", "on-demand", "4", "$0.19152",
                                   "$0.04788"]
    assert "bundled 2026-" in rows[0]


def test_prices_unknown_is_said_and_fails(url: str, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    assert cli.main(["prices", "c7g.large,m7g.large", "--regions", "eu-west-1",
                     "--endpoint-url", url]) == 1
    out = capsys.readouterr().out
    assert "m7g.large  eu-west-1  on-demand  2      unknown" in out
    assert "1 price(s) unknown: vmexec does not guess" in out


def test_prices_spot(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prices", "c7g.large", "--spot", "--endpoint-url", url]) == 0
    row = table(capsys.readouterr().out)[1]
    assert row.split()[:5] == ["c7g.large", "us-east-1", "spot", "2", "$0.00001"]
    assert row.endswith("spot price history")


def test_prices_offline_needs_no_credentials(aws_env: None, no_network: list[object],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    no_credentials(monkeypatch)
    assert cli.main(["prices", "t4g.xlarge", "g5.2xlarge", "p4d.24xlarge"]) == 0
    out = capsys.readouterr().out
    assert "t4g.xlarge    us-east-1  on-demand  4      $0.1344" in out
    assert "$1.21" in out and "$21.96" in out and "$0.22873" in out  # p4d: 96 vCPUs


# --- doctor ----------------------------------------------------------------------------

def test_doctor_against_moto(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--regions", "us-east-1", "us-west-2", "--types",
                     "c7g,c7i,g5.xlarge", "--endpoint-url", url]) == 0
    out = capsys.readouterr().out
    assert "ok    AWS credentials: account 123456789012" in out
    assert "ok    us-east-1: default VPC vpc-" in out
    assert "ok    us-west-2: default VPC vpc-" in out
    # moto does not serve EC2's vCPU quotas: said plainly, a warning, not a failure.
    assert "on-demand vCPU quota for Standard (A, C, D, H, I, M, R, T, Z) instances " \
           "(L-1216C47A; c7g, c7i): could not read it" in out
    assert "spot vCPU quota for Standard" in out and "L-34B43A08" in out
    assert "G and VT instances (L-DB2E81BA; g5)" in out
    assert out.strip().endswith("3 ok, 8 warning(s), 0 failed")


def test_doctor_without_credentials_fails(aws_env: None, no_network: list[object],
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    no_credentials(monkeypatch)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  AWS: no AWS credentials found" in out


def test_doctor_unreachable_host_fails(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert cli.main(["doctor", "--hosts", f"me@127.0.0.1:{port}", "--timeout", "3"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  me@127.0.0.1:{port}: sshd not reachable" in out
    assert "AWS" not in out  # only --hosts: no AWS checks
    assert out.strip().endswith("0 ok, 0 warning(s), 1 failed")


def test_doctor_bad_host_string(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--hosts", "me@host:notaport"]) == 1
    assert "cannot read 'me@host:notaport'" in capsys.readouterr().out


@pytest.mark.ssh
def test_doctor_reaches_an_ssh_host(sshd: SSHServer, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    common = ["doctor", "--hosts", sshd.host_string, "--ssh-key", sshd.client_key,
              "--known-hosts", sshd.known_hosts, "--timeout", "20"]
    assert cli.main([*common, "--python", sys.executable]) == 0
    out = capsys.readouterr().out
    assert f"ok    {sshd.host_string}: sshd, login and vmexec {__version__} on Python " \
           f"{sys.version_info[0]}.{sys.version_info[1]}" in out
    # sshd and the key are fine, but this interpreter does not exist there.
    assert cli.main([*common, "--python", "/nonexistent/python3"]) == 1
    out = capsys.readouterr().out
    assert "sshd answers and the key logs in, but `/nonexistent/python3 -c 'import " \
           "vmexec'` failed there" in out
