"""Fixtures shared by the suite: executors for each provider, a real sshd on loopback.

The contract suite (test_contract.py) is written once and bound to every backend by
the ``make_executor`` fixture, which is parametrized over ``local`` and ``ssh``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterator

import pytest

from vmexec import VMExecutor
from aws_fixtures import *  # noqa: F401,F403  (registers the AWS fixtures for every module)
from vmexec.testing.sshd import SSHServer, sshd_available

@pytest.fixture(autouse=True, scope="session")
def _named_fleets_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory
                                        ) -> Iterator[None]:
    """Named fleets keep their keys in VMEXEC_FLEETS_DIR: never the user's ~/.cache."""
    saved = os.environ.get("VMEXEC_FLEETS_DIR")
    os.environ["VMEXEC_FLEETS_DIR"] = str(tmp_path_factory.mktemp("fleets"))
    yield
    if saved is None:
        os.environ.pop("VMEXEC_FLEETS_DIR", None)
    else:
        os.environ["VMEXEC_FLEETS_DIR"] = saved


# Tests run on machines shared with other jobs: keep failure detection quick but not
# so tight that a busy CI box marks healthy machines lost.
FAST_TIMING = dict(heartbeat_interval=0.5, heartbeat_timeout=20.0, watchdog_timeout=30.0)


def _require_sshd() -> None:
    reason = sshd_available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the SSH tests but: {reason} (install openssh-server)")
    pytest.skip(f"SSH tests need OpenSSH's sshd: {reason} (apt-get install openssh-server)")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real OpenSSH server on 127.0.0.1 with its own host key and authorized_keys."""
    _require_sshd()
    with SSHServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def sshd2(tmp_path_factory: pytest.TempPathFactory, sshd: SSHServer) -> Iterator[SSHServer]:
    """A second sshd (a second 'machine') that trusts the same client key."""
    with SSHServer(tmp_path_factory.mktemp("sshd2")) as server:
        server.authorize(sshd.client_key + ".pub")
        yield server


def ssh_options(*servers: SSHServer, **extra: Any) -> dict[str, Any]:
    """Executor options reaching ``servers`` (one known_hosts file pins all of them)."""
    known = servers[0].workdir / "all_known_hosts"
    known.write_text("".join(open(s.known_hosts).read() for s in servers))
    options: dict[str, Any] = dict(provider="ssh", hosts=[s.host_string for s in servers],
                                   ssh_key=servers[0].client_key, known_hosts=str(known),
                                   python=sys.executable)
    options.update(extra)
    return options


@pytest.fixture(params=["local", "ssh"])
def make_executor(request: pytest.FixtureRequest) -> Iterator[Callable[..., VMExecutor]]:
    """Factory for executors of the parametrized provider; shuts them all down after."""
    created: list[VMExecutor] = []
    if request.param == "ssh":
        server = request.getfixturevalue("sshd")

    def make(max_workers: int = 2, **kwargs: Any) -> VMExecutor:
        options = {**FAST_TIMING, **kwargs}
        if request.param == "local":
            ex = VMExecutor(max_workers, provider="local", **options)
        else:
            options.pop("machines", None)
            ex = VMExecutor(max_workers, **ssh_options(server, slots_per_host=max_workers,
                                                       **options))
        created.append(ex)
        return ex

    make.provider = request.param  # type: ignore[attr-defined]
    yield make
    for ex in created:
        ex.shutdown(wait=True, cancel_futures=True)
