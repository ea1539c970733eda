"""Chatty-output guard: measure forwarded worker output, warn once, cap it.

A debug-level logger on a thousand machines can move more data than the tasks do, and
a client that buffers it runs out of memory. The agent already limits what each
machine sends (``output_limit`` bytes/s, see ``vmexec.agent.main``); this guard watches
the whole fleet on the client:

* above ``warn_bytes_per_s`` or ``warn_lines_per_s`` (1 MB/s or 10,000 lines/s by
  default) it warns **once**, naming the busiest machines and loggers;
* above ``cap_bytes_per_s`` / ``cap_lines_per_s`` it drops output for the rest of
  that second and reports how much was dropped, at most every ``report_every`` s.

Nothing is buffered: memory stays constant whatever the workers print.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

logger = logging.getLogger("vmexec.guardrails")


class OutputGuard:
    """Decides, per forwarded chunk, whether it is emitted; thread-safe."""

    def __init__(self, *, warn_bytes_per_s: float = 1_000_000, warn_lines_per_s: float = 10_000,
                 cap_bytes_per_s: float = 4_000_000, cap_lines_per_s: float = 40_000,
                 report_every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.warn_bytes_per_s = warn_bytes_per_s
        self.warn_lines_per_s = warn_lines_per_s
        self.cap_bytes_per_s = cap_bytes_per_s
        self.cap_lines_per_s = cap_lines_per_s
        self.report_every = report_every
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._bytes = 0
        self._lines = 0
        self._sources: collections.Counter[str] = collections.Counter()
        self.warned = False
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._dropped_since_report = (0, 0)
        self._last_report = clock()

    def admit(self, machine: str, source: str, text: str) -> bool:
        """Count a chunk of output; False when it must be dropped."""
        size = len(text)
        lines = text.count("\n") + 1
        warn = report = None
        with self._lock:
            now = self._clock()
            if now - self._window_start >= 1.0:
                self._window_start, self._bytes, self._lines = now, 0, 0
                self._sources.clear()
            self._bytes += size
            self._lines += lines
            key = f"{source} on {machine}"
            if len(self._sources) < 10_000 or key in self._sources:  # bounded memory
                self._sources[key] += size
            admitted = self._bytes <= self.cap_bytes_per_s and self._lines <= self.cap_lines_per_s
            if not self.warned and (self._bytes > self.warn_bytes_per_s
                                    or self._lines > self.warn_lines_per_s):
                self.warned = True
                warn = ", ".join(f"{name} ({count:,} B)"
                                 for name, count in self._sources.most_common(3))
            if not admitted:
                self.dropped_lines += lines
                self.dropped_bytes += size
                lines_d, bytes_d = self._dropped_since_report
                self._dropped_since_report = (lines_d + lines, bytes_d + size)
            if self._dropped_since_report[0] and now - self._last_report >= self.report_every:
                report = self._dropped_since_report
                self._dropped_since_report = (0, 0)
                self._last_report = now
        if warn is not None:
            logger.warning(
                "worker output is chatty (over %s B/s or %s lines/s across the fleet); the "
                "busiest: %s. Lower the log level in your tasks, or print less; output above "
                "%s B/s is dropped.", f"{self.warn_bytes_per_s:,.0f}",
                f"{self.warn_lines_per_s:,.0f}", warn, f"{self.cap_bytes_per_s:,.0f}")
        if report is not None:
            logger.warning("dropped %s lines (%s bytes) of worker output in the last %.0fs",
                           f"{report[0]:,}", f"{report[1]:,}", self.report_every)
        return admitted

    def summary(self) -> str:
        """One line for the end of a run, empty when nothing was dropped."""
        if not self.dropped_lines:
            return ""
        return (f"{self.dropped_lines:,} lines ({self.dropped_bytes:,} bytes) of worker output "
                "were dropped by the output guard")
