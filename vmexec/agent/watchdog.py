"""The agent's side of "the machine turns itself off": watchdog, dead-man file, notices.

Owns what keeps a machine from running up a bill for a client that is gone, and what
tells the client the machine is going away:

* The watchdog: when nothing has come from the client for ``watchdog_timeout`` seconds
  the agent stops, and on cloud machines (``poweroff`` in the handshake) powers the
  machine off. "Nothing came" means no frame *received*: an agent blocked writing to a
  client that stopped reading counts as silent.
* Liveness for the machine's dead-man switch: when ``$VMEXEC_CLIENT_HEARD`` names a
  file, the agent touches it when frames *arrive* from the client (at most once a
  second), never on its own: a running agent alone does not keep a machine on. Next to
  it the agent writes how long its client may stay silent (``silence``).
* Interruption notices: the cloud's warning (e.g. EC2's spot interruption), which the
  boot script's poller writes to ``notice_file``, goes to the client once as NOTICE.

``Watchdog`` is a part of ``vmexec.agent.main.Agent`` (a mixin); the state it uses is
listed on the class and set by ``Agent.__init__``.

Imports only the standard library and vmexec.protocol: runs on a bare machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional

from vmexec.protocol import Msg, Notice

#: The environment variable naming the file touched on receipt of client frames.
HEARD_FILE_ENV = "VMEXEC_CLIENT_HEARD"
# The dead-man switch looks at the heard file every few seconds: touching it more
# often than this only costs system calls on the hot path.
_HEARD_TOUCH_EVERY = 1.0


class Watchdog:
    """The watchdog, the dead-man file and notices (a part of ``Agent``)."""

    # Set by Agent.__init__ (and the handshake).
    outbox: list[Any]
    watchdog_timeout: float
    last_heard: float
    heard_file: Optional[str]
    _heard_touched: float
    notice_file: Optional[str]
    _notice_sent: bool
    _notice_next_check: float

    def _heard_from_client(self, now: float) -> None:
        self.last_heard = now
        if self.heard_file is not None and now - self._heard_touched >= _HEARD_TOUCH_EVERY:
            self._heard_touched = now
            try:
                os.utime(self.heard_file)
            except FileNotFoundError:
                try:
                    os.close(os.open(self.heard_file, os.O_WRONLY | os.O_CREAT, 0o644))
                except OSError:
                    pass
            except OSError:  # the switch then powers off on its own grace: say why
                sys.stderr.write(f"vmexec agent: cannot touch {self.heard_file}\n")
                self.heard_file = None

    def _client_gone_silent(self, now: float) -> bool:
        """True (and says so on stderr) when the watchdog's time without the client is up."""
        if now - self.last_heard > self.watchdog_timeout:
            sys.stderr.write(
                f"vmexec agent: nothing from the client for {self.watchdog_timeout:.0f}s;"
                " stopping\n")
            return True
        return False

    def _note_silence_bound(self) -> None:
        """Tell the dead-man switch how long this client may stay silent while the agent
        runs: an idle client pings only every so often (a fraction of watchdog_timeout),
        and a short keepalive must not power the machine off under it."""
        if self.heard_file is None:
            return
        path = os.path.join(os.path.dirname(self.heard_file), "silence")
        try:
            with open(path + ".tmp", "w", encoding="ascii") as f:
                f.write(f"{int(self.watchdog_timeout / 2) + 1}\n")
            os.replace(path + ".tmp", path)
        except OSError:
            pass

    def _check_notice(self, now: float) -> None:
        """Tell the client once when the machine announces it is going away.

        The cloud's notice (e.g. EC2's two-minute spot interruption warning, read from
        the instance metadata by the boot script's poller) lands in ``notice_file``;
        the agent only looks at the file, so it needs no network access of its own.
        """
        if self.notice_file is None or self._notice_sent or now < self._notice_next_check:
            return
        self._notice_next_check = now + 1.0
        try:
            with open(self.notice_file, encoding="utf-8", errors="replace") as handle:
                text = handle.read(4096).strip()
        except OSError:
            return
        self._notice_sent = True
        self.outbox.append(Notice(Msg.NOTICE, text or "the machine is going away"))


def power_off(command: list[str]) -> None:
    """Turn the machine off (cloud machines terminate on OS shutdown)."""
    try:
        subprocess.call(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        sys.stderr.write(f"vmexec agent: power-off command {command!r} failed: {exc}\n")


def default_poweroff_command() -> list[str]:
    """``shutdown -h now``, through ``sudo -n`` when the agent is not root."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return ["sudo", "-n", "shutdown", "-h", "now"]
    return ["shutdown", "-h", "now"]
