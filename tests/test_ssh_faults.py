"""Executor-level faults over real SSH: dropped connections, unreachable and bad hosts."""

from __future__ import annotations

import logging
import time

import pytest

import helpers
from conftest import FAST_TIMING, ssh_options
from helpers_wait import wait_until
from vmexec import BrokenFleet, ConfigError, TransportError, VMExecutor
from vmexec.testing.proxy import TCPProxy
from vmexec.testing.sshd import free_port


def test_dropped_connection_requeues_tasks_on_another_machine(sshd, sshd2, caplog):
    caplog.set_level(logging.WARNING, logger="vmexec.scheduler")
    with TCPProxy(sshd.host, sshd.port) as proxy:
        options = ssh_options(sshd, sshd2, slots_per_host=2, **FAST_TIMING)
        # Machine 1 is reached through the proxy, machine 2 directly.
        options["hosts"] = [f"{sshd.user}@127.0.0.1:{proxy.port}", sshd2.host_string]
        known = sshd.workdir / "all_known_hosts"
        key = sshd.host_public_key().split()
        known.write_text(known.read_text() + f"[127.0.0.1]:{proxy.port} {key[0]} {key[1]}\n")
        with VMExecutor(4, **options) as ex:
            futures = [ex.submit(helpers.sleep_then_pid, 1.5) for _ in range(8)]
            wait_until(lambda: len(ex.fleet) == 2 and sum(f.running() for f in futures) >= 4,
                       what="both machines to run tasks")
            assert proxy.cut() >= 1
            results = [f.result(timeout=120) for f in futures]
            assert len(results) == 8 and all(isinstance(pid, int) for pid in results)
            assert [m.label for m in ex.fleet] == [sshd2.host_string]
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    assert lost and "re-queued" in lost[0].getMessage()


def test_unreachable_host_fails_fast_with_a_clear_error(sshd):
    options = ssh_options(sshd, **FAST_TIMING)
    options["hosts"] = [f"{sshd.user}@127.0.0.1:{free_port()}"]
    options["connect_timeout"] = 3.0
    start = time.monotonic()
    with VMExecutor(2, **options) as ex:
        future = ex.submit(helpers.add, 1)
        with pytest.raises(BrokenFleet, match="no machine can run tasks") as info:
            future.result(timeout=60)
    assert time.monotonic() - start < 30
    assert isinstance(info.value.__cause__, TransportError)
    assert "127.0.0.1" in str(info.value)


def test_one_bad_host_among_good_ones_is_skipped(sshd):
    options = ssh_options(sshd, **FAST_TIMING)
    options["hosts"] = [sshd.host_string, f"{sshd.user}@127.0.0.1:{free_port()}"]
    options["connect_timeout"] = 3.0
    with VMExecutor(4, **options) as ex:
        assert list(ex.map(helpers.add, range(20))) == list(range(20))


def test_bad_ssh_options_are_refused_at_construction(sshd, tmp_path):
    base = ssh_options(sshd)
    with pytest.raises(ConfigError, match="user@host"):
        VMExecutor(2, **{**base, "hosts": ["user@@host:x"]})
    with pytest.raises(ConfigError, match="ssh_key"):
        VMExecutor(2, **{**base, "ssh_key": str(tmp_path / "missing_key")})
    with pytest.raises(ConfigError, match="hosts"):
        VMExecutor(2, **{**base, "hosts": []})
    with pytest.raises(ConfigError, match="host_key_policy"):
        VMExecutor(2, **{**base, "host_key_policy": "yolo"})


def test_unknown_host_key_is_refused_then_accepted_new(sshd, tmp_path):
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    options = {**ssh_options(sshd, **FAST_TIMING), "known_hosts": str(empty_known_hosts)}
    with VMExecutor(1, **options) as ex:
        with pytest.raises(BrokenFleet, match="host key"):
            ex.submit(helpers.add, 1).result(timeout=60)
    with VMExecutor(1, **options, host_key_policy="accept-new") as ex:
        assert ex.submit(helpers.add, 5).result(timeout=60) == 5
    assert "ssh-ed25519" in empty_known_hosts.read_text()


def test_slots_default_to_the_host_cpu_count_capped_by_max_workers(sshd):
    import os

    options = ssh_options(sshd, **FAST_TIMING)
    with VMExecutor(None, **options) as ex:
        ex.submit(helpers.add, 1).result(timeout=60)
        assert [m.slots for m in ex._scheduler.machines()] == [os.cpu_count()]
    with VMExecutor(1, **options) as ex:
        ex.submit(helpers.add, 1).result(timeout=60)
        assert [m.slots for m in ex._scheduler.machines()] == [1]
