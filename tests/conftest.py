"""Fixtures shared by the suite: executors for each provider, a real sshd on loopback;
and the test tiers.

The contract suite (test_contract.py) is written once and bound to every backend by
the ``make_executor`` fixture, which is parametrized over ``local`` and ``ssh``.

Tiers: ``tox -e fast`` runs ``pytest -m "not slow"`` -- unit, contract and moto tests,
for the edit-test loop (under 3 minutes on a 2-core box). ``tox -e py`` (what
``.ci/run`` runs) runs everything. ``FULL_SUITE_FILES`` and ``FULL_SUITE_TESTS`` below
say what is ``slow``, each with its reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vmexec import VMExecutor
from aws_fixtures import *  # noqa: F401,F403  (registers the AWS fixtures for every module)
from vmexec.testing.sshd import SSHServer, sshd_available

# --- test tiers ---------------------------------------------------------------------------

# Whole files that only the full suite runs: end-to-end paths, real installs, other
# projects' code. (A file under tests/ that is not here is in the fast tier.)
FULL_SUITE_FILES = {
    "cpython": "CPython's own test_concurrent_futures against VMExecutor (local and ssh)",
    "test_docs.py": "builds the docs site strictly and runs every page's examples",
    "test_examples.py": "runs every script in examples/",
    "test_cli_compare.py": "`vmexec compare` on the examples",
    "test_pytest_plugin.py": "the example user project's own test suite, in a subprocess",
    "test_localcloud.py": "boots fake VMs in the local cloud",
    "test_client_network.py": "boots fake VMs in the local cloud",
    "test_deadman.py": "boots fake VMs in the local cloud",
    "test_dropin_ec2.py": "boots fake VMs in the local cloud",
    "test_env_mixed_arch.py": "boots fake VMs in the local cloud",
    "test_guardrails_ec2.py": "boots fake VMs in the local cloud",
    "test_named_fleet.py": "boots fake VMs in the local cloud",
    "test_suspended_client.py": "boots fake VMs in the local cloud",
    "test_ec2_launch.py": "launches on moto and connects over SSH to sshd 'machines'",
    "test_ec2_teardown.py": "fleets torn down in every region, at exit and on signals",
    "test_env_install.py": "installs environments into fresh venvs (and the local cloud)",
    "test_boot_hardening.py": "installs uv with pip into a venv; runs boot scripts",
    "test_simfleet.py": "hundreds of simulated machines",
    "test_joblib.py": "scikit-learn workloads",
    "test_integrations.py": "dask, scipy and emcee workloads",
    "test_faults.py": "machines that die, stall or get replaced: waits on heartbeats",
}

# The slowest tests of otherwise fast files (5 s or more each on a busy 2-core box),
# as ``file::function`` (every parameter of it).
FULL_SUITE_TESTS = {
    "test_handshake.py::test_the_client_does_not_unpickle_a_machines_handshake":
        "waits out a machine's boot timeout",
    "test_cli.py::test_cleanup_filters_by_fleet_and_age": "`vmexec` in subprocesses",
    "test_cli.py::test_ls_and_cleanup_after_a_killed_client": "`vmexec` in subprocesses",
    "test_dropin.py::test_initializer_globals_are_the_tasks_globals_like_process_pool":
        "a ProcessPoolExecutor and a fleet, each initialized",
    "test_hardening_misc.py::test_sighup_tears_the_fleet_down": "a client in a subprocess",
    "test_named_adoption.py::test_an_instance_only_tagged_as_the_fleet_is_not_adopted":
        "two fleets on moto",
    "test_ssh_faults.py::test_dropped_connection_requeues_tasks_on_another_machine":
        "waits for a dropped connection to be noticed",
    "test_env_stage.py::test_compiled_local_package_is_built_by_the_first_machine_and_shared":
        "builds a compiled package",
    "test_cleanup_owner.py::test_cleanup_deletes_only_the_callers_resources_unless_all_owners":
        "`vmexec cleanup` sweeps every region of a moto server, twice",
    "test_cleanup_owner.py::test_cleanup_deletes_exactly_what_it_listed":
        "`vmexec cleanup` sweeps every region of a moto server",
    "test_named_adoption.py::test_an_instance_without_an_owner_tag_is_never_adopted":
        "two fleets on moto",
    "test_named_adoption.py::test_a_security_group_this_computer_did_not_create_is_refused":
        "two fleets on moto",
    "test_budget.py::test_find_leftovers_reports_a_failed_query": "queries every region",
    "test_budget.py::test_find_leftovers_names_an_earlier_fleet": "queries every region",
    "test_budget.py::test_spot_estimate_uses_spot_prices_and_shows_on_demand":
        "moto's spot price history",
    "test_budget.py::test_provider_plan_says_when_a_price_is_unknown": "plans a fleet on moto",
    "test_guardrails_output.py::test_chatty_worker_gets_one_warning_and_bounded_memory":
        "a worker printing megabytes",
    "test_cli_guardrails.py::test_doctor_against_moto": "`vmexec doctor` checks every region",
}

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what only the full suite runs ``slow`` (``pytest -m "not slow"`` skips it)."""
    for item in items:
        try:
            relative = item.path.resolve().relative_to(TESTS)
        except ValueError:  # not under tests/
            continue
        function = getattr(item, "originalname", item.name)
        if relative.parts[0] in FULL_SUITE_FILES or \
                f"{relative.as_posix()}::{function}" in FULL_SUITE_TESTS:
            item.add_marker(pytest.mark.slow)


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
