"""Waiting for machines to run: one batched poll per region, however many boot at once.

``InstanceWatcher.wait_running(instance_id, deadline)`` is what each connect thread
calls; one poller thread per region describes every instance still awaited in one
``DescribeInstances`` call (in chunks of 500 ids) and wakes the waiters, so hundreds of
booting machines cost a call every few seconds, not hundreds.

Lives under ``providers/ec2`` (botocore error types). Must not import the scheduler or
the executor.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from botocore.exceptions import ClientError

from vmexec import retry
from vmexec.errors import TransportError

__all__ = ["InstanceWatcher"]

log = logging.getLogger(__name__)

#: DescribeInstances takes at most this many ids per call.
_DESCRIBE_CHUNK = 500

# Instance states from which an instance will never become "running".
_DEAD_STATES = ("shutting-down", "terminated", "stopping", "stopped")


class InstanceWatcher:
    """Waits for instances to reach "running", with one poll per region for all of them.

    Hundreds of connect threads wait at once; each ``wait_running`` registers its
    instance and blocks on a condition, and a single poller thread per region describes
    every registered instance in batches (``DescribeInstances``, up to 500 ids a call)
    with a growing interval, so the API load does not grow with the fleet.

    Args:
        ec2: the region's EC2 client.
        region: its name, for messages.
        interval: first pause between polls (doubles up to ``max_interval``).
        clock: time source (``vmexec.retry`` clocks).
    """

    def __init__(self, ec2: Any, region: str, *, interval: float = 2.0,
                 max_interval: float = 10.0, clock: Optional[retry.Clock] = None) -> None:
        self.ec2 = ec2
        self.region = region
        self.interval = interval
        self.max_interval = max_interval
        self.clock = clock or retry.current_clock()
        self._cond = threading.Condition()
        self._waiting: dict[str, int] = {}  # instance id -> number of waiters
        self._seen: dict[str, dict[str, Any]] = {}
        self._poller: Optional[threading.Thread] = None
        self._closed = False

    def wait_running(self, instance_id: str, deadline: float) -> dict[str, Any]:
        """Block until ``instance_id`` runs; return its ``DescribeInstances`` entry.

        Args:
            instance_id: the instance.
            deadline: a ``clock.monotonic()`` time.

        Raises:
            TransportError: it is terminating/stopped, or the deadline passed.
        """
        with self._cond:
            self._waiting[instance_id] = self._waiting.get(instance_id, 0) + 1
            self._seen.pop(instance_id, None)
            if self._poller is None or not self._poller.is_alive():
                self._poller = threading.Thread(target=self._poll, daemon=True,
                                                name=f"vmexec-ec2-watch-{self.region}")
                self._poller.start()
            self._cond.notify_all()
            try:
                while True:
                    entry = self._seen.get(instance_id)
                    state = (entry or {}).get("State", {}).get("Name")
                    if state == "running":
                        return entry or {}
                    if state in _DEAD_STATES:
                        reason = (entry or {}).get("StateReason", {}).get("Message", "")
                        raise TransportError(
                            f"instance {instance_id} in {self.region} is {state} instead of "
                            f"booting{': ' + reason if reason else ''}")
                    if self._closed:
                        raise TransportError(f"stopped waiting for {instance_id}: the "
                                             "fleet is shutting down")
                    remaining = deadline - self.clock.monotonic()
                    if remaining <= 0:
                        raise TransportError(
                            f"instance {instance_id} in {self.region} did not reach "
                            f"'running' in time (last state: {state or 'unknown'})")
                    self._cond.wait(min(remaining, 1.0))
            finally:
                self._waiting[instance_id] -= 1
                if not self._waiting[instance_id]:
                    del self._waiting[instance_id]

    def close(self) -> None:
        """Wake every waiter with an error and stop polling."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _poll(self) -> None:
        pause = self.interval
        while True:
            with self._cond:
                ids = sorted(self._waiting)
                if self._closed or not ids:
                    self._poller = None
                    return
            entries: dict[str, dict[str, Any]] = {}
            try:
                for start in range(0, len(ids), _DESCRIBE_CHUNK):
                    entries.update(self._describe(ids[start:start + _DESCRIBE_CHUNK]))
            except ClientError as exc:
                log.warning("describing instances in %s failed: %s", self.region, exc)
            with self._cond:
                self._seen.update(entries)
                self._cond.notify_all()
                settled = all(
                    self._seen.get(i, {}).get("State", {}).get("Name") in ("running",
                                                                        *_DEAD_STATES)
                    for i in self._waiting)
            if not settled:
                self.clock.sleep(pause)
                pause = min(self.max_interval, pause * 2)
            else:
                pause = self.interval
                with self._cond:
                    # Wait for new instances; the waiters take theirs and leave.
                    self._cond.wait(0.5)

    def _describe(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        try:
            answer = self.ec2.describe_instances(InstanceIds=ids)
        except ClientError as exc:
            if retry.error_code(exc) != "InvalidInstanceID.NotFound":
                raise
            # Just launched: EC2's reads are eventually consistent. Ask one by one later.
            return {}
        return {i["InstanceId"]: i for r in answer.get("Reservations", [])
                for i in r.get("Instances", [])}
