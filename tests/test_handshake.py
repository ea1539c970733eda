"""The handshake is not a pickle (issue 12, item 9).

The client reads a machine's handshake before it trusts the machine: unpickling it would
run whatever code the machine (or whoever controls it) put in the bytes. The handshake
is JSON with explicit types for bytes and tuples; the frames after it stay pickles (the
per-task path is unchanged).
"""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vmexec import VMExecutor, protocol
from vmexec.errors import ProtocolError
from vmexec.transports.local import LocalTransport


class _Boom:
    """Unpickling this creates the file named in it: code run by a decoder."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_round_trip_keeps_types() -> None:
    info = {**protocol.local_info(), "initializer": b"\x00\xffpickled bytes",
            "python": (3, 11, 9), "env": {"A": "1"}, "poweroff": ["sudo", "-n", "x"],
            "nested": [(1, b"x"), {"k": None}], "flag": True, "ratio": 0.5}
    frame = protocol.encode_handshake(info)
    [payload] = protocol.FrameReader().feed(frame)
    assert payload.startswith(b"{")  # JSON, not a pickle
    back = protocol.decode_handshake(payload)
    assert back == info
    assert type(back["python"]) is tuple and type(back["initializer"]) is bytes
    assert type(back["nested"][0]) is tuple


def test_values_outside_the_handshake_types_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot travel"):
        protocol.encode_handshake({"x": {1, 2}})
    with pytest.raises(ProtocolError, match="same vmexec version"):
        protocol.decode_handshake(b'{"x": {"$code": "os.system"}}')
    with pytest.raises(ProtocolError):
        protocol.decode_handshake(b"[1, 2]")


def test_a_pickled_handshake_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps({"protocol": 1, "x": _Boom(str(marker))})
    with pytest.raises(ProtocolError, match="not vmexec's JSON handshake"):
        protocol.decode_handshake(payload)
    assert not marker.exists()


def test_the_client_does_not_unpickle_a_machines_handshake(tmp_path: Path) -> None:
    """A "machine" whose agent answers with a pickle that runs code when loaded: the
    client refuses the machine, and the code never runs on the client."""
    marker = tmp_path / "ran-on-the-client"
    evil = tmp_path / "evil_agent.py"
    payload = pickle.dumps({**protocol.local_info(), "x": _Boom(str(marker))}, protocol=4)
    evil.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, struct, sys, time
        payload = {payload!r}
        os.write(1, {protocol.MAGIC!r} + struct.pack(">I", len(payload)) + payload)
        time.sleep(30)
        """))
    evil.chmod(0o755)
    with VMExecutor(1, provider="local", python=str(evil), boot_timeout=10,
                    max_retries=0) as ex:
        future = ex.submit(pow, 2, 3)
        with pytest.raises(Exception) as failure:
            future.result(timeout=120)
    assert not marker.exists(), "the machine's handshake was unpickled on the client"
    assert "handshake" in str(failure.value) or "handshake" in repr(failure.value.__cause__)


def test_the_agent_refuses_a_pickled_hello(tmp_path: Path) -> None:
    marker = tmp_path / "ran-on-the-agent"
    transport = LocalTransport([sys.executable, "-m", "vmexec.agent"], label="agent",
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        magic = b""
        while len(magic) < len(protocol.MAGIC):
            magic += transport.read(len(protocol.MAGIC) - len(magic))
        reader = protocol.FrameReader()
        frames: list[bytes] = []
        while not frames:
            frames = reader.feed(transport.read(1 << 16))
        hello = protocol.decode_handshake(frames[0])  # the agent speaks JSON
        assert hello["protocol"] == protocol.PROTOCOL_VERSION
        payload = pickle.dumps({**protocol.local_info(), "x": _Boom(str(marker))})
        transport.write(len(payload).to_bytes(4, "big") + payload)
        answer: list[bytes] = []
        while not answer:
            data = transport.read(1 << 16)
            assert data, transport.diagnostics()
            answer = reader.feed(data)
        # After the handshake, frames are pickles as before (the REFUSED message).
        [(kind, reason)] = protocol.decode(answer[0])
        assert kind == protocol.Msg.REFUSED and "JSON handshake" in reason
        assert not marker.exists()
    finally:
        transport.close()
