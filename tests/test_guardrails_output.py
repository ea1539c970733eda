"""The chatty-output guard: one warning, bounded output, the task unaffected."""

from __future__ import annotations

import logging
import time

import psutil

import helpers
from helpers_wait import wait_until
from vmexec import VMExecutor
from vmexec.guardrails.logs import OutputGuard


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_guard_warns_once_and_caps_per_second(caplog):
    caplog.set_level(logging.WARNING, logger="vmexec.guardrails")
    clock = FakeClock()
    guard = OutputGuard(warn_lines_per_s=100, cap_lines_per_s=200, report_every=5, clock=clock)
    admitted = sum(guard.admit("m1", "stdout", "line") for _ in range(1000))
    assert admitted == 200
    clock.now += 1.0
    admitted = sum(guard.admit("m2", "app.logger", "line") for _ in range(1000))
    assert admitted == 200
    warnings = [r for r in caplog.records if "chatty" in r.getMessage()]
    assert len(warnings) == 1 and "stdout on m1" in warnings[0].getMessage()
    assert guard.dropped_lines == 1600
    clock.now += 10
    guard.admit("m1", "stdout", "line")
    assert guard.summary().startswith("1,600 lines")


def test_chatty_worker_gets_one_warning_and_bounded_memory(caplog):
    caplog.set_level(logging.INFO, logger="vmexec")
    client = psutil.Process()
    before = client.memory_info().rss
    started = time.monotonic()
    with VMExecutor(2, provider="local") as ex:  # default limits
        # 400,000 short lines: far above 10,000 lines/s and the per-machine 1 MB/s.
        assert ex.submit(helpers.chatter, 400_000, 10).result(timeout=120) == 400_000
        wait_until(lambda: any("dropped" in r.getMessage() for r in caplog.records),
                   timeout=30, what="the agent's report of dropped output")
    elapsed = time.monotonic() - started
    grown = client.memory_info().rss - before
    forwarded = [r for r in caplog.records if r.name == "vmexec.worker"]
    # Bytes as the task printed them, without the "[machine pid N] " prefix per line.
    forwarded_bytes = sum(len(line.partition("] ")[2]) + 1 for r in forwarded
                          for line in r.getMessage().splitlines())
    printed = sum(len(f"{i} {'x' * 10}\n") for i in range(400_000))
    # The agent forwards at most output_limit (1 MB/s by default) per machine: what
    # arrives is bounded by how long the task ran (longer on a busy machine), not by
    # what it printed, and the rest is dropped.
    assert forwarded_bytes <= 1_000_000 * (elapsed + 1)
    assert forwarded_bytes < printed
    assert sum("chatty" in r.getMessage() for r in caplog.records) == 1
    assert grown < 200_000_000


def test_progress_bar_counts_tasks_machines_and_failures(capsys):
    with VMExecutor(2, provider="local", progress=True) as ex:
        assert sum(ex.map(helpers.add, range(50))) == sum(range(50))
        try:
            ex.submit(helpers.fail, "x").result(timeout=60)
        except helpers.CustomError:
            pass
        progress = ex._scheduler.progress
    assert (progress.total, progress.done, progress.failed) == (51, 51, 1)
    assert progress.machines_ready == 1
    err = capsys.readouterr().err
    assert "51/51" in err and "machines 1/1" in err and "failed 1" in err


def test_progress_is_off_when_not_a_terminal(capsys):
    with VMExecutor(1, provider="local") as ex:
        ex.submit(helpers.add, 1).result(timeout=60)
    assert "vmexec:" not in capsys.readouterr().err
