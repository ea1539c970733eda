"""Progress bars for long work: tasks done / total (failures, retries) and machines.

One ``tqdm`` bar per executor (``tqdm.auto``: a widget in notebooks, text in terminals),
fed by the scheduler once per result frame rather than per task. Shown when stderr is
a terminal or in a notebook, or when ``progress=True``; never when ``progress=False``.
tqdm is optional: without it, ``progress=None`` shows nothing.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional, TextIO

from vmexec.errors import ConfigError


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts tasks and machines; draws them when enabled."""

    def __init__(self, enabled: Optional[bool], file: Optional[TextIO] = None) -> None:
        self._lock = threading.Lock()
        self.total = self.done = self.failed = self.retried = 0
        self.machines_requested = self.machines_ready = 0
        # ready machines per (region, architecture), for fleets that span them
        self.ready_by_group: dict[str, int] = {}
        self._bar: Any = None
        self._file = file
        self._enabled = _interactive() if enabled is None else enabled
        self._tqdm: Any = None
        if self._enabled:
            try:
                if file is None:
                    from tqdm.auto import tqdm
                else:
                    from tqdm import tqdm
            except ImportError:
                if enabled:
                    raise ConfigError("progress=True needs tqdm: pip install 'vmexec[progress]'"
                                      ) from None
                self._enabled = False
            else:
                self._tqdm = tqdm

    def _draw(self) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            self._bar = self._tqdm(total=self.total, unit="task", desc="vmexec",
                                   file=self._file, dynamic_ncols=True, leave=True)
        bar = self._bar
        if bar.total != self.total:
            bar.total = self.total
        bar.n = self.done
        groups = ""
        if len(self.ready_by_group) > 1 or any(self.ready_by_group) and \
                next(iter(self.ready_by_group)) != "":
            groups = " (" + ", ".join(f"{g} {n}" for g, n in sorted(self.ready_by_group.items())
                                      if g) + ")"
        bar.set_postfix_str(
            f"machines {self.machines_ready}/{self.machines_requested}{groups}"
            + (f", failed {self.failed}" if self.failed else "")
            + (f", retried {self.retried}" if self.retried else ""), refresh=False)
        bar.refresh()

    def tasks_added(self, count: int) -> None:
        if not self._enabled:  # called on every submit: no lock when nothing is drawn
            return
        with self._lock:
            self.total += count
            self._draw()

    def tasks_done(self, ok: int, failed: int) -> None:
        if not self._enabled:
            return
        with self._lock:
            self.done += ok + failed
            self.failed += failed
            self._draw()

    def task_retried(self) -> None:
        with self._lock:
            self.retried += 1
            self._draw()

    def machines(self, requested: int = 0, ready: int = 0, group: str = "") -> None:
        """Count machines asked for, and ready ones (``group``: "region arch")."""
        with self._lock:
            self.machines_requested += requested
            self.machines_ready += ready
            if ready:
                self.ready_by_group[group] = self.ready_by_group.get(group, 0) + ready
            self._draw()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._draw()
                self._bar.close()
                self._bar = None
