"""The handshake's environment check: is the machine's installed environment the client's?

Owns:

* ``ENV_HASH_FILE`` — where a machine's install script records the token of the
  environment it installed (under ``$VMEXEC_ROOT``);
* ``read_machine_hash`` — that token, read on the machine;
* ``check_skew`` — the client's refusal of a machine whose token is not its own, saying
  which side is older and how to rebuild.

The client's token comes from ``vmexec.environment.capture.environment_hash``; the
agent reports the machine's in its hello (``vmexec.protocol``).

Sits below the scheduler, beside the protocol: it imports only the standard library and
``vmexec.errors``, so the scheduler checks skew without importing ``vmexec.environment``
(tests/test_layers.py).
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

from vmexec.errors import EnvSyncError

__all__ = ["ENV_HASH_FILE", "read_machine_hash", "check_skew"]

#: Where a machine records the hash of the environment it installed, under $VMEXEC_ROOT.
ENV_HASH_FILE = "opt/vmexec/env-hash"


def read_machine_hash(root: Optional[str] = None) -> Optional[str]:
    """The token a machine's install script wrote, or None (no synced environment).

    Args:
        root: the machine's root (default ``$VMEXEC_ROOT``, empty on a real machine).
    """
    base = os.environ.get("VMEXEC_ROOT", "") if root is None else root
    path = os.path.join(base or "/", ENV_HASH_FILE)
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _split_token(token: str) -> tuple[str, Optional[float]]:
    parts = token.split()
    when: Optional[float] = None
    if len(parts) > 1:
        try:
            when = float(parts[1])
        except ValueError:
            when = None
    return (parts[0] if parts else ""), when


def _when(stamp: Optional[float]) -> str:
    if stamp is None:
        return "at an unknown time"
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


def check_skew(client_hash: Optional[str], machine_hash: Optional[str],
               machine: str = "the machine") -> None:
    """Refuse a machine whose installed environment is not the client's.

    Both arguments are ``environment_hash()`` tokens. Nothing is checked when either
    side has none (``environment=None``: the image is trusted to have everything).

    Args:
        client_hash: the client's token.
        machine_hash: the token the machine reported (``read_machine_hash()``).
        machine: the machine's label, for the message.

    Raises:
        EnvSyncError: the hashes differ; the message says which side is older and how
            to rebuild.
    """
    if not client_hash or not machine_hash:
        return
    mine, my_time = _split_token(client_hash)
    theirs, their_time = _split_token(machine_hash)
    if mine == theirs:
        return
    if my_time is not None and their_time is not None and their_time > my_time:
        stale = (f"this client's environment (captured {_when(my_time)}) is OLDER than the "
                 f"one {machine} was installed from ({_when(their_time)}): another client "
                 "re-synced the fleet. Update this environment to match (see `vmexec env` "
                 "on the other client), or rebuild the machines from this one")
    else:
        stale = (f"{machine} is STALE: it was installed from an environment captured "
                 f"{_when(their_time)}, and this client's environment (captured "
                 f"{_when(my_time)}) has changed since (packages or local code)")
    raise EnvSyncError(
        f"environment skew: {machine} has environment {theirs[:16]}, this client "
        f"{mine[:16]}; {stale}. Rebuild: terminate the named fleet's machines (`vmexec "
        "cleanup`) and start again with environment='auto', which installs the current "
        "environment; `vmexec env` shows what this client has. Pickled code would "
        "otherwise fail on the machine with confusing import or unpickling errors")
