"""AWS fixtures shared by the EC2, CLI and local-cloud tests: moto, fault injection,
API call counting, and a guard that fails any connection leaving loopback.

Imported by conftest.py, so every test module can use the fixtures by name.
"""


from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.request
from typing import Any, Callable, Iterator, Optional

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from vmexec import retry
from vmexec.providers.ec2 import EC2Provider
from vmexec.providers.ec2.resources import Resource, find_resources
from vmexec.testing.faults import ApiCallCounter, FaultInjector

TEST_CIDR = "203.0.113.7/32"  # TEST-NET-3: never a real client
REGIONS = ["us-east-1", "us-west-2"]
MIXED = ["c7g.large", "c7i.large"]
LAUNCH_OPERATIONS = ("RunInstances", "CreateFleet")


# --- fixtures shared by the EC2 test modules -----------------------------------------

@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Fake credentials; no profile, config file or endpoint override from outside."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAVMEXECTESTING000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "vmexec-test-secret-never-on-a-machine")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "vmexec-test-session-token")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any TCP connection that leaves this machine (and record it)."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and \
                self.type == socket.SOCK_STREAM:
            host = address[0]
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                attempts.append(address)
                raise ConnectionRefusedError(f"test guard: no connections to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert not attempts, f"something tried to reach the network: {attempts}"


@pytest.fixture
def fake_clock() -> Iterator[retry.FakeClock]:
    with retry.use_clock(retry.FakeClock()) as clock:
        yield clock  # type: ignore[misc]


@pytest.fixture
def moto(aws_env: None, no_network: list[Any], fake_clock: retry.FakeClock) -> Iterator[None]:
    with mock_aws():
        yield


@pytest.fixture
def session(moto: None) -> boto3.Session:
    return boto3.Session(region_name="us-east-1")


@pytest.fixture
def faults(session: boto3.Session) -> FaultInjector:
    """Registered on the session before any provider makes its clients."""
    return FaultInjector(session)


@pytest.fixture
def calls(session: boto3.Session) -> ApiCallCounter:
    return ApiCallCounter(session)


@pytest.fixture
def make_provider(session: boto3.Session, faults: FaultInjector, calls: ApiCallCounter
                  ) -> Iterator[Callable[..., EC2Provider]]:
    created: list[EC2Provider] = []

    def make(max_workers: int = 8, **options: Any) -> EC2Provider:
        settings: dict[str, Any] = dict(instance_type=MIXED, regions=REGIONS,
                                        ssh_cidr=TEST_CIDR, session=session,
                                        handle_signals=False,
                                        # the image has what it needs: these tests are
                                        # about the control plane, not environment sync
                                        environment=None)
        settings.update(options)
        provider = EC2Provider(max_workers, **settings)
        created.append(provider)
        return provider

    yield make
    for provider in created:
        provider.terminate(None)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A moto server on 127.0.0.1 that client subprocesses share with the test."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def server_url(moto_server: str, aws_env: None) -> Iterator[str]:
    """The moto server's URL; its state is reset after each test."""
    yield moto_server
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=30).read()


def tagged(session: boto3.Session, regions: list[str], fleet: Optional[str] = None
           ) -> list[Resource]:
    """Every vmexec-tagged resource left in ``regions`` (the teardown check)."""
    found = []
    for region in regions:
        found += find_resources(session.client("ec2", region_name=region), region,
                                fleet=fleet)
    return found


def launches(calls: ApiCallCounter) -> int:
    return sum(calls[op] for op in LAUNCH_OPERATIONS)


