"""The vmexec wire protocol: frames, message types and the handshake.

Owns the byte format spoken between the client and ``python -m vmexec.agent``, and
between the agent and its worker processes. Imports only the standard library and
``vmexec.errors`` / ``vmexec._version``: it runs on a bare machine.

Wire format
-----------
The agent's very first bytes are ``MAGIC``, so that anything a remote shell prints
before the agent starts (a chatty ``.bashrc``) is recognised and reported instead of
being parsed as a frame. After that, both directions carry frames::

    +-----------------+-------------------------------------------+
    | length: u32 BE  | pickle(list of messages)                  |
    +-----------------+-------------------------------------------+

A frame holds a *batch* of messages: batching is how one round trip carries hundreds
of tasks. Each message is a tuple whose first item is a small int (see ``Msg``). User
objects (callables, arguments, results) are never unpickled by the agent: they travel
as opaque ``bytes`` made by cloudpickle on one end and loaded on the other, so the
agent itself needs none of the user's modules.

Handshake frames (the first frame each way) are JSON objects, not pickles: the client
reads the machine's handshake *before* it trusts the machine, and unpickling runs code
chosen by whoever wrote the bytes. Types JSON lacks are explicit: ``{"$bytes": base64}``
and ``{"$tuple": [...]}`` (``encode_handshake`` / ``decode_handshake``). Only
str/int/float/bool/None, lists, tuples, bytes and dicts with str keys travel; anything
else is refused. A version mismatch is *reported* (the versions are plain fields), not
failed inside a decoder. After the handshake, frames are pickles as above: the per-task
path is unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import pickle
import platform
import struct
import sys
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from vmexec._version import __version__

if TYPE_CHECKING:
    from vmexec.errors import ProtocolError, VersionMismatch


def _errors() -> Any:
    # vmexec.errors subclasses BrokenProcessPool, whose module imports multiprocessing
    # (~40 ms). Every machine's agent imports this module at start and needs the error
    # classes only to raise them: imported then, not at start.
    from vmexec import errors

    return errors


def __getattr__(name: str) -> Any:
    if name in ("ProtocolError", "VersionMismatch"):
        return getattr(_errors(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# 2: TASK's last field may be 2, a micro-batch of separate calls (agent/worker.py).
# 3: the handshake is JSON (2 and before pickled it).
PROTOCOL_VERSION = 3
MAGIC = b"VMEXEC-AGENT\n"
_HEADER = struct.Struct(">I")
# A frame larger than this is either garbage on the stream or a task that should have
# been staged another way; refusing it early keeps a corrupted length from making us
# allocate gigabytes.
MAX_FRAME_BYTES = 1 << 31
_PICKLE_PROTOCOL = 5 if sys.version_info >= (3, 8) else 4
PICKLE_PROTOCOL = _PICKLE_PROTOCOL


class Msg:
    """Message type codes: the first item of every message (see the named types below)."""

    # client -> agent
    FUNC = 1
    TASK = 2
    PING = 3
    SHUTDOWN = 4
    RELEASE = 5
    FORGET = 6
    # agent -> client
    RESULT = 10
    LOST = 11
    LOG = 12
    PONG = 13
    BROKEN = 14
    HEARTBEAT = 15
    REFUSED = 16
    NOTICE = 17
    RELEASED = 18
    # worker -> agent only
    INIT_FAILED = 20
    READY = 21


# The messages, one named type each. On the wire a message is a plain tuple whose first
# item is its ``Msg`` code (``encode_frame`` strips the type: a named tuple pickles ten
# times slower, by class reference); ``decode`` gives every message its type back, so
# readers say ``message.task_id``, not ``message[1]``. Senders build them with their
# code first: ``Result(Msg.RESULT, task_id, True, payload, seconds)``.

# -- client -> agent -----------------------------------------------------------------


class Func(NamedTuple):
    """A callable the tasks that follow use, sent once per machine (cached by digest)."""

    kind: int
    digest: bytes
    callable_bytes: bytes


class Task(NamedTuple):
    """Run a call (``chunked`` False), a chunk of ``map`` calls (True), or a
    micro-batch of separate map calls (``BATCH``: ``args`` pickles ``[(id, args)]``)."""

    kind: int
    task_id: int
    digest: bytes
    args: bytes
    chunked: int


class Ping(NamedTuple):
    """Are you there? Answered with ``Pong`` carrying ``sent_at`` back (round-trip time)."""

    kind: int
    sent_at: float


class Shutdown(NamedTuple):
    """Finish what runs, send the last results, stop."""

    kind: int


class Release(NamedTuple):
    """Give back every task not yet handed to a worker (work stealing, notices)."""

    kind: int


class Forget(NamedTuple):
    """Drop a cached callable that no queued task uses any more."""

    kind: int
    digest: bytes


# -- agent -> client -----------------------------------------------------------------


class Result(NamedTuple):
    """A call's outcome: ``payload`` pickles the value, or ``(exception, traceback
    text)`` when not ``ok``; for a micro-batch, a list of per-item outcomes."""

    kind: int
    task_id: int
    ok: bool
    payload: bytes
    seconds: float


class Lost(NamedTuple):
    """The worker running the task died (the client decides whether to retry)."""

    kind: int
    task_id: int
    reason: str


class Log(NamedTuple):
    """Output of a worker: ``stream`` is "stdout", "stderr" or "log" (a log record)."""

    kind: int
    worker_pid: int
    stream: str
    levelno: int
    logger_name: str
    text: str


class Pong(NamedTuple):
    """The answer to a ``Ping``."""

    kind: int
    sent_at: float


class Broken(NamedTuple):
    """A worker could not start (e.g. the initializer raised): the executor is broken."""

    kind: int
    reason: str
    traceback: str


class Heartbeat(NamedTuple):
    """The agent is alive (sent when nothing else went to the client for an interval)."""

    kind: int


class Refused(NamedTuple):
    """The agent will not serve this client (e.g. another one holds the machine)."""

    kind: int
    reason: str


class Notice(NamedTuple):
    """The machine is going away (e.g. a spot interruption notice)."""

    kind: int
    text: str


class Released(NamedTuple):
    """The tasks given back, unstarted, after ``Release``."""

    kind: int
    task_ids: list[int]


# -- worker -> agent -----------------------------------------------------------------


class InitFailed(NamedTuple):
    """The worker's initializer raised."""

    kind: int
    traceback: str


class Ready(NamedTuple):
    """The worker started and ran its initializer."""

    kind: int
    pid: int


# Message code -> its type. tuple.__new__ gives a decoded tuple its type (~0.15 µs, a
# third of calling the type): a frame of results is decoded once per message.
_TYPES: dict[int, type] = {
    Msg.FUNC: Func, Msg.TASK: Task, Msg.PING: Ping, Msg.SHUTDOWN: Shutdown,
    Msg.RELEASE: Release, Msg.FORGET: Forget, Msg.RESULT: Result, Msg.LOST: Lost,
    Msg.LOG: Log, Msg.PONG: Pong, Msg.BROKEN: Broken, Msg.HEARTBEAT: Heartbeat,
    Msg.REFUSED: Refused, Msg.NOTICE: Notice, Msg.RELEASED: Released,
    Msg.INIT_FAILED: InitFailed, Msg.READY: Ready,
}
_new_tuple = tuple.__new__


# Values made only of these (in tuples, lists and dicts, a few levels deep) pickle the
# same with the standard pickler, at ~0.5 µs against cloudpickle's ~3.5 µs (it builds a
# Pickler object per call): per map item, on the client and on the worker.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})
_PLAIN_MAX_ITEMS = 64


def is_plain(obj: Any, depth: int = 0) -> bool:
    """True when ``obj`` is builtin data that plain ``pickle`` handles like cloudpickle."""
    kind = type(obj)
    if kind in _PLAIN_TYPES:
        return True
    if depth >= 3:
        return False
    if kind is tuple or kind is list:
        if len(obj) > _PLAIN_MAX_ITEMS:
            return False
        for item in obj:  # a loop, not all(genexpr): this runs once per map item
            if type(item) not in _PLAIN_TYPES and not is_plain(item, depth + 1):
                return False
        return True
    if kind is dict:
        if len(obj) > _PLAIN_MAX_ITEMS:
            return False
        for key, value in obj.items():
            if type(key) is not str or not is_plain(value, depth + 1):
                return False
        return True
    return False


def dumps_value(obj: Any, general: Callable[[Any], bytes]) -> bytes:
    """Pickle ``obj``: the standard pickler for plain data, else ``general`` (cloudpickle)."""
    if is_plain(obj):
        return pickle.dumps(obj, _PICKLE_PROTOCOL)
    return general(obj)


def encode_frame(messages: list[Any]) -> bytes:
    """Serialise a batch of messages into one frame (header + payload)."""
    # As plain tuples (see the message types): tuple() of a plain tuple is itself.
    payload = pickle.dumps([tuple(m) for m in messages], _PICKLE_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def encode_handshake(info: dict[str, Any]) -> bytes:
    """Serialise a handshake dict as one JSON frame (see the module docstring).

    Raises:
        TypeError: a value of a type the handshake does not carry.
    """
    payload = json.dumps(_to_json(info), separators=(",", ":"),
                         allow_nan=False).encode("utf-8")
    return _HEADER.pack(len(payload)) + payload


def decode_handshake(payload: bytes) -> dict[str, Any]:
    """The handshake dict of a JSON handshake frame; never unpickles.

    Raises:
        ProtocolError: not a JSON object of the handshake's types (a vmexec before
            protocol 3 pickled its handshake: install the same vmexec on both ends).
    """
    try:
        data = json.loads(payload.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a {type(data).__name__}, not an object")
        return dict(_from_json(data))
    except (UnicodeDecodeError, ValueError, TypeError, binascii.Error) as exc:
        raise _errors().ProtocolError(
            f"the far end's handshake ({len(payload)} bytes) is not vmexec's JSON handshake "
            f"({exc}): it runs another vmexec version (before protocol 3 the handshake was "
            "pickled). Install the same vmexec version on both ends") from None


def _to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {"$tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or key.startswith("$"):
                raise TypeError(f"handshake: key {key!r} (keys are str, not starting with $)")
        return {k: _to_json(v) for k, v in value.items()}
    raise TypeError(f"handshake: a value of type {type(value).__name__} cannot travel "
                    "(str, int, float, bool, None, list, tuple, bytes, dict)")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and "$bytes" in value:
            encoded = value["$bytes"]
            if not isinstance(encoded, str):
                raise TypeError("$bytes holds no base64 text")
            return base64.b64decode(encoded.encode("ascii"), validate=True)
        if len(value) == 1 and "$tuple" in value:
            items = value["$tuple"]
            if not isinstance(items, list):
                raise TypeError("$tuple holds no list")
            return tuple(_from_json(v) for v in items)
        if any(k.startswith("$") for k in value):
            raise TypeError(f"unknown typed value {sorted(value)}")
        return {k: _from_json(v) for k, v in value.items()}
    return value


# What one read of a stream of frames asks for. 64 KiB: as much as a Linux pipe holds,
# and under the allocator's mmap threshold. A 1 MiB request made every read of a small
# frame allocate (mmap) and free a 1 MiB buffer: ~18 µs a read against ~1 µs, and a
# submit round trip reads four times (agent, worker, agent, client).
READ_SIZE = 1 << 16


class FrameReader:
    """Incremental frame parser: feed it bytes as they arrive, get whole payloads out.

    Keeps one buffer and slices frames out of it, so a read of 1 MiB holding hundreds
    of small frames costs one allocation per frame, not per byte.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return every complete frame payload now available, in order."""
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME_BYTES:
                raise _errors().ProtocolError(
                    f"frame of {length} bytes announced: the stream is corrupt or the far "
                    "end is not a vmexec agent"
                )
            if end - pos - 4 < length:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return frames

    def pending_bytes(self) -> int:
        return len(self._buf)


def decode(payload: bytes) -> list[Any]:
    """The messages of one frame payload, each as its named type.

    Unpickles the envelope only: user bytes (callables, arguments, results) stay opaque.

    Raises:
        ProtocolError: not a list of known messages (a corrupted stream, or a far end
            speaking another protocol version).
    """
    try:
        messages: list[Any] = [
            _new_tuple(_TYPES[message[0]], message)  # type: ignore[call-overload]
            for message in pickle.loads(payload)]
        for message in messages:  # a short tuple would fail later, far from the cause
            if len(message) != len(message._fields):
                raise ValueError(f"{type(message).__name__} of {len(message)} fields")
        return messages
    except Exception as exc:  # a corrupted stream must not kill the reader silently
        raise _errors().ProtocolError(f"undecodable frame ({len(payload)} bytes): {exc!r}") from exc


# Where vmexec.environment's install script records the environment it installed
# (vmexec.environment.spec.ENV_HASH_FILE; read here without importing that package).
_ENV_HASH_FILE = "opt/vmexec/env-hash"


def _environment_hash() -> Any:
    import os

    path = os.path.join(os.environ.get("VMEXEC_ROOT", "") or "/", _ENV_HASH_FILE)
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:  # no synced environment on this machine (environment=None)
        return None


def local_info(slots_hint: int | None = None) -> dict[str, Any]:
    """What this end says about itself in the handshake."""
    import os

    return {
        "protocol": PROTOCOL_VERSION,
        "python": tuple(sys.version_info[:3]),
        "implementation": sys.implementation.name,
        "vmexec": __version__,
        "arch": platform.machine(),
        "system": platform.system(),
        "hostname": platform.node(),
        "pid": os.getpid(),
        "cpu_count": os.cpu_count() or 1,
        "executable": sys.executable,
        "environment_hash": _environment_hash(),
    }


def check_compatible(mine: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    """Refuse a peer whose pickled code cannot run here.

    Raises:
        VersionMismatch: protocol version, Python implementation or minor version differ.
    """
    if theirs.get("protocol") != mine["protocol"]:
        raise _errors().VersionMismatch(
            f"{where} speaks vmexec protocol {theirs.get('protocol')!r} (vmexec "
            f"{theirs.get('vmexec')}), this client speaks {mine['protocol']} (vmexec "
            f"{mine['vmexec']}): install the same vmexec version on both ends"
        )
    mine_py = tuple(mine["python"][:2])
    their_py = tuple(theirs.get("python", (0, 0))[:2])
    if mine_py != their_py or theirs.get("implementation") != mine["implementation"]:
        raise _errors().VersionMismatch(
            f"{where} runs {theirs.get('implementation')} "
            f"{'.'.join(map(str, their_py))} ({theirs.get('executable')}) but this client "
            f"runs {mine['implementation']} {'.'.join(map(str, mine_py))}: pickled code "
            "does not cross Python minor versions. Point the machine at a matching "
            "interpreter (option python=...) or run the client with the machine's version"
        )
