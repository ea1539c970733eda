"""A fleet simulator: thousands of SSH-reachable machines in one process, for scale tests.

``SimFleet`` starts one server process that gives every simulated machine its own
loopback address (``127.77.x.y``), its own SSH host key and a real SSH server (asyncssh)
that runs a simulated agent when the client executes ``python -m vmexec.agent``. The
client under test is the *unchanged* vmexec client: ``provider="ssh"`` with the fleet's
host list, pinned host keys (a real known_hosts file) and client key, speaking the real
wire protocol (magic, handshake, frames, heartbeats). Only the far end is simulated,
so two thousand machines fit on a laptop and the client's own cost can be measured::

    from vmexec import VMExecutor
    from vmexec.testing.simfleet import SimFleet, sleep_task

    with SimFleet(machines=1000, slots=2, regions={"near": 0.001, "far": 0.070}) as fleet:
        with VMExecutor(max_workers=2000, **fleet.executor_options()) as ex:
            results = list(ex.map(sleep_task, [0.001] * 100_000))

What the simulated agent does with a task:

* ``sleep_task(seconds, value)`` is not run: the machine holds one of its slots for
  ``seconds`` (a timer) and returns ``value``. This is how a thousand machines "run"
  long tasks on two cores.
* Any other callable runs in the server process, inline, one at a time: real code,
  real results and exceptions (with the remote traceback), but no isolation. Keep
  such tasks short.

Knobs: ``regions`` (name -> round-trip seconds, applied half each way to every frame),
``boot`` (seconds before each machine's SSH server listens: a number or a
``(low, high)`` uniform range; the client's connect pool retries with backoff
meanwhile), and faults: ``die`` / ``stall`` / ``drop`` (how many machines, and after
how many seconds of being connected: the agent exits; the agent stops answering while
the connection stays up; the TCP connection is reset).

This module imports asyncssh only in the server process; ``SimFleet`` itself needs the
standard library.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

__all__ = ["SimFleet", "SimConfig", "sleep_task"]

_BASE_OCTET = 77  # 127.77.x.y: clear of 127.0.0.1 and of the local cloud's addresses
_PER_OCTET = 250


def sleep_task(seconds: float, value: Any = None) -> Any:
    """Sleep ``seconds`` and return ``value``.

    On a simulated machine it holds a slot for ``seconds`` without running; anywhere
    else (local, ssh, ec2) it really sleeps, so a benchmark means the same everywhere.
    """
    time.sleep(seconds)
    return value


@dataclass
class SimConfig:
    """Everything the server process needs (sent to it as JSON)."""

    machines: int = 10
    slots: int = 1
    regions: dict[str, float] = field(default_factory=lambda: {"sim": 0.0})
    boot: Union[float, tuple[float, float]] = 0.0
    die: tuple[int, float] = (0, 0.0)
    stall: tuple[int, float] = (0, 0.0)
    drop: tuple[int, float] = (0, 0.0)
    slow: tuple[int, float] = (0, 1.0)
    seed: int = 0
    user: str = "sim"


def address_of(index: int) -> str:
    """The loopback address of simulated machine ``index``."""
    return f"127.{_BASE_OCTET + index // (_PER_OCTET * 254)}." \
           f"{(index // _PER_OCTET) % 254}.{index % _PER_OCTET + 1}"


class SimFleet:
    """N simulated machines behind real SSH, served by one background process.

    Args:
        machines: how many machines (tested to 2000+).
        slots: task slots each machine reports (its "CPU count").
        regions: region name -> round-trip seconds; machines are spread over them in
            turn. Labels and hostnames say the region.
        boot: seconds until a machine accepts SSH: a number, or ``(low, high)`` for a
            uniform spread.
        die, stall, drop: ``(count, after_seconds)``: that many machines (chosen with
            ``seed``) fail that way ``after_seconds`` after their agent started.
        slow: ``(count, factor)``: that many machines run ``sleep_task`` ``factor``
            times slower (a mixed fleet: older types, noisy neighbours).
        workdir: where keys and known_hosts go (default: a temporary directory,
            removed on exit).

    Use as a context manager; ``executor_options()`` gives the ``VMExecutor``
    arguments that reach the fleet.
    """

    def __init__(self, machines: int = 10, *, slots: int = 1,
                 regions: Optional[dict[str, float]] = None,
                 boot: Union[float, tuple[float, float]] = 0.0,
                 die: tuple[int, float] = (0, 0.0), stall: tuple[int, float] = (0, 0.0),
                 drop: tuple[int, float] = (0, 0.0), slow: tuple[int, float] = (0, 1.0),
                 seed: int = 0,
                 workdir: Optional[str] = None) -> None:
        if machines < 1:
            raise ValueError(f"machines must be at least 1, not {machines!r}")
        self.config = SimConfig(machines=machines, slots=slots,
                                regions=dict(regions or {"sim": 0.0}), boot=boot, die=die,
                                stall=stall, drop=drop, slow=slow, seed=seed)
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="vmexec-simfleet-")
        self.port = 0
        self._proc: Optional[subprocess.Popen[str]] = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        """Start the server process; returns once every address is bound or booting."""
        config_path = os.path.join(self.workdir, "config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(asdict(self.config), f)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vmexec.testing.simfleet", config_path, self.workdir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line or line.startswith("ready "):
                break
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"the fleet simulator did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        """Stop the server (every simulated machine goes away) and remove the workdir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what the client needs ------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        return [f"{self.config.user}@{address_of(i)}:{self.port}"
                for i in range(self.config.machines)]

    @property
    def ssh_key(self) -> str:
        return os.path.join(self.workdir, "client_key")

    @property
    def known_hosts(self) -> str:
        return os.path.join(self.workdir, "known_hosts")

    def executor_options(self) -> dict[str, Any]:
        """``VMExecutor`` keyword arguments that reach this fleet over real SSH."""
        return {"provider": "ssh", "hosts": self.hosts, "ssh_key": self.ssh_key,
                "known_hosts": self.known_hosts, "slots_per_host": self.config.slots}

    def stats(self) -> dict[str, Any]:
        """Counters of the server: connections, agents running, tasks done, ..."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None or proc.stdout is None:
                raise RuntimeError("the fleet simulator is not running")
            proc.stdin.write("stats\n")
            proc.stdin.flush()
            return dict(json.loads(proc.stdout.readline()))


# --- the server process ----------------------------------------------------------------


def _serve(config_path: str, workdir: str) -> None:  # pragma: no cover - subprocess
    import asyncio

    import asyncssh

    from vmexec import protocol
    from vmexec.protocol import FrameReader, Msg, decode, encode_frame
    from vmexec.transports.ssh import SSH_CIPHERS

    _like_openssh(asyncssh)
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    config = SimConfig(**raw)
    rng = random.Random(config.seed)
    logging_quiet()
    region_names = list(config.regions)
    counters = {"connections": 0, "agents": 0, "agents_running": 0, "tasks": 0,
                "frames_in": 0, "frames_out": 0, "listening": 0}

    def pick(spec: Any) -> set[int]:
        count = int(spec[0])
        return set(rng.sample(range(config.machines), min(count, config.machines)))

    dying, stalling, dropping = pick(config.die), pick(config.stall), pick(config.drop)
    slowed = pick(config.slow)

    def boot_delay() -> float:
        spec = config.boot
        if isinstance(spec, (list, tuple)):
            return rng.uniform(float(spec[0]), float(spec[1]))
        return float(spec)

    class SimAgent(asyncssh.SSHServerSession):  # type: ignore[misc]
        """The far end of one agent channel: the vmexec protocol, simulated execution."""

        def __init__(self, index: int) -> None:
            self.index = index
            region = region_names[index % len(region_names)]
            self.region = region
            self.one_way = config.regions[region] / 2
            self.reader = FrameReader()
            self.hello_done = False
            self.funcs: dict[bytes, Any] = {}
            self.queue: list[tuple[Any, ...]] = []
            self.running = 0
            self.slots = config.slots
            self.outbox: list[Any] = []
            self.flush_scheduled = False
            self.last_sent = self.last_heard = 0.0
            self.heartbeat = 5.0
            self.watchdog = 180.0
            self.stalled = False
            self.chan: Any = None
            self.loop = asyncio.get_event_loop()
            self.timer: Any = None
            self.pace = float(config.slow[1]) if index in slowed else 1.0

        # -- SSH session events
        def connection_made(self, chan: Any) -> None:
            self.chan = chan

        def exec_requested(self, command: str) -> bool:
            return "vmexec.agent" in command

        def session_started(self) -> None:
            counters["agents"] += 1
            counters["agents_running"] += 1
            info = protocol.local_info()
            info.update(hostname=f"sim-{self.region}-{self.index}"
                        + ("-slow" if self.pace != 1.0 else ""), cpu_count=self.slots,
                        pid=100000 + self.index, environment_hash=None)
            self._send_raw(protocol.MAGIC + protocol.encode_handshake(info))
            now = self.loop.time()
            self.last_sent = self.last_heard = now
            for chosen, after, what in ((dying, config.die[1], "die"),
                                        (stalling, config.stall[1], "stall"),
                                        (dropping, config.drop[1], "drop")):
                if self.index in chosen:
                    self.loop.call_later(float(after), self.fault, what)
            self.timer = self.loop.call_later(1.0, self.tick)

        def data_received(self, data: bytes, datatype: Any) -> None:
            if self.stalled:
                return
            if self.one_way:
                self.loop.call_later(self.one_way, self.receive, data)
            else:
                self.receive(data)

        def eof_received(self) -> bool:
            self.end(0)
            return False

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
                counters["agents_running"] -= 1

        # -- protocol
        def receive(self, data: bytes) -> None:
            if self.chan is None:
                return
            self.last_heard = self.loop.time()
            for payload in self.reader.feed(data):
                counters["frames_in"] += 1
                if not self.hello_done:
                    hello = protocol.decode_handshake(payload)
                    self.hello_done = True
                    self.slots = max(1, int(hello.get("slots", self.slots)))
                    self.heartbeat = float(hello.get("heartbeat_interval", 5.0))
                    self.watchdog = float(hello.get("watchdog_timeout", 180.0))
                    continue
                for message in decode(payload):
                    self.on_message(message)
            self.dispatch()

        def on_message(self, message: tuple[Any, ...]) -> None:
            kind = message[0]
            if kind == Msg.TASK:
                self.queue.append(message)
            elif kind == Msg.FUNC:
                self.funcs[message[1]] = message[2]
            elif kind == Msg.FORGET:
                self.funcs.pop(message[1], None)
            elif kind == Msg.PING:
                self.send((Msg.PONG, message[1]))
            elif kind == Msg.RELEASE:
                released = [m[1] for m in self.queue]
                self.queue.clear()
                self.send((Msg.RELEASED, released))
            elif kind == Msg.SHUTDOWN:
                self.end(0)

        def dispatch(self) -> None:
            while self.queue and self.running < self.slots and self.chan is not None:
                _, task_id, digest, args, chunked = self.queue.pop(0)
                self.running += 1
                try:
                    fn = self.funcs[digest]
                    if isinstance(fn, bytes):
                        import cloudpickle

                        fn = self.funcs[digest] = cloudpickle.loads(fn)
                except BaseException as exc:  # noqa: BLE001 - reported as the task's error
                    self.finish(task_id, *_failed(exc), 0.0)
                    continue
                if fn is sleep_task or getattr(fn, "__name__", "") == "sleep_task" and \
                        getattr(fn, "__module__", "") in (__name__, "vmexec.testing.simfleet"):
                    self.start_sleep(task_id, args, chunked)
                else:
                    self.finish(task_id, *_run_inline(fn, args, chunked))

        def start_sleep(self, task_id: int, args: bytes, chunked: Any) -> None:
            import pickle

            call = pickle.loads(args)
            if chunked == 2:  # a batch of separate calls: one timer for all of them
                items = [(item_id, pickle.loads(data)) for item_id, data in call]
                total = sum(_sleep_seconds(c) for _, c in items)
                outcome = [(item_id, True, pickle.dumps(_sleep_value(c)), _sleep_seconds(c))
                           for item_id, c in items]
                self.loop.call_later(total * self.pace, self.finish, task_id, True,
                                     pickle.dumps(outcome), total * self.pace)
            elif chunked:
                total = sum(_sleep_seconds(((a), {})) for a in call)
                values = [a[1] if len(a) > 1 else None for a in call]
                self.loop.call_later(total * self.pace, self.finish, task_id, True,
                                     pickle.dumps(values), total * self.pace)
            else:
                seconds = _sleep_seconds(call)
                self.loop.call_later(seconds * self.pace, self.finish, task_id, True,
                                     pickle.dumps(_sleep_value(call)), seconds * self.pace)

        def finish(self, task_id: int, ok: bool, payload: bytes, seconds: float) -> None:
            self.running -= 1
            if self.chan is None or self.stalled:
                return
            counters["tasks"] += 1
            self.send((Msg.RESULT, task_id, ok, payload, seconds))
            self.dispatch()

        # -- output
        def send(self, message: Any) -> None:
            self.outbox.append(message)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self.flush)

        def flush(self) -> None:
            self.flush_scheduled = False
            if not self.outbox or self.chan is None:
                return
            frame = encode_frame(self.outbox)
            self.outbox = []
            counters["frames_out"] += 1
            if self.one_way:
                self.loop.call_later(self.one_way, self._send_raw, frame)
            else:
                self._send_raw(frame)

        def _send_raw(self, data: bytes) -> None:
            if self.chan is not None and not self.stalled:
                self.last_sent = self.loop.time()
                try:
                    self.chan.write(data)
                except (asyncssh.Error, OSError):
                    self.end(1)

        def tick(self) -> None:
            now = self.loop.time()
            if self.chan is None:
                return
            if now - self.last_heard > self.watchdog:
                self.end(4)
                return
            if not self.stalled and now - self.last_sent >= self.heartbeat:
                self.send((Msg.HEARTBEAT,))
            self.timer = self.loop.call_later(1.0, self.tick)

        def fault(self, what: str) -> None:
            if self.chan is None:
                return
            if what == "stall":
                self.stalled = True  # connection up, agent silent: only heartbeats notice
            elif what == "drop":
                conn = self.chan.get_extra_info("connection")
                self.chan = None
                conn.abort()
            else:
                self.end(137)

        def end(self, status: int) -> None:
            chan, self.chan = self.chan, None
            if chan is not None:
                try:
                    chan.exit(status)
                except (asyncssh.Error, OSError):
                    pass

    class SimServer(asyncssh.SSHServer):  # type: ignore[misc]
        def __init__(self, index: int) -> None:
            self.index = index

        def session_requested(self) -> SimAgent:
            return SimAgent(self.index)

        def connection_made(self, conn: Any) -> None:
            counters["connections"] += 1

        def begin_auth(self, username: str) -> bool:
            return True  # public key required (authorized_client_keys)

    async def main() -> None:
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        key_path = os.path.join(workdir, "client_key")
        client_key.write_private_key(key_path)
        os.chmod(key_path, 0o600)
        client_key.write_public_key(key_path + ".pub")
        authorized = asyncssh.import_authorized_keys(
            client_key.export_public_key().decode("ascii"))
        probe = __import__("socket").socket()
        probe.bind((address_of(0), 0))
        port = probe.getsockname()[1]
        probe.close()
        keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(config.machines)]
        with open(os.path.join(workdir, "known_hosts"), "w", encoding="ascii") as f:
            for index, key in enumerate(keys):
                public = key.export_public_key().decode("ascii").strip()
                f.write(f"[{address_of(index)}]:{port} {public}\n")
        servers = []

        async def open_machine(index: int, delay: float) -> None:
            if delay > 0:
                await asyncio.sleep(delay)
            servers.append(await asyncssh.listen(
                address_of(index), port, server_host_keys=[keys[index]],
                authorized_client_keys=authorized, server_factory=lambda: SimServer(index),
                line_editor=False, encoding=None, config=None,
                reuse_address=True, backlog=128, keepalive_interval=0,
                encryption_algs=SSH_CIPHERS,
                compression_algs=None))
            counters["listening"] += 1

        delays = [boot_delay() for _ in range(config.machines)]
        booted = [open_machine(i, d) for i, d in enumerate(delays) if d <= 0]
        later = [asyncio.ensure_future(open_machine(i, d))
                 for i, d in enumerate(delays) if d > 0]
        await asyncio.gather(*booted)
        print(f"ready {port}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.strip() == b"stats":
                print(json.dumps(counters), flush=True)
        for task in later:
            task.cancel()
        for server in servers:
            server.close()

    asyncio.run(main())


def _like_openssh(asyncssh: Any) -> None:  # pragma: no cover - subprocess
    """Make the simulated machines' SSH servers send what OpenSSH's sshd sends.

    asyncssh puts an empty SSH_MSG_IGNORE packet before every encrypted packet (a
    countermeasure for CBC ciphers); OpenSSH does not for exec sessions. Left in,
    every frame from a simulated machine would cost the client two packets where a
    real machine costs one, and the measured client cost would be the simulator's.
    """
    from asyncssh import connection
    from asyncssh.constants import MSG_IGNORE

    original = connection.SSHConnection.send_packet
    empty = b"\0\0\0\0"  # String(b"")

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (empty,):
            return
        original(self, pkttype, *args, handler=handler)

    connection.SSHConnection.send_packet = send_packet  # type: ignore[method-assign]


def _sleep_seconds(call: Any) -> float:
    args, kwargs = call
    return float(kwargs.get("seconds", args[0] if args else 0.0))


def _sleep_value(call: Any) -> Any:
    args, kwargs = call
    return kwargs.get("value", args[1] if len(args) > 1 else None)


def _failed(exc: BaseException) -> tuple[bool, bytes]:
    from vmexec.agent.worker import _describe_exception

    return False, _describe_exception(exc)


def _run_inline(fn: Any, args: bytes, chunked: Any) -> tuple[bool, bytes, float]:
    """Run a real task in the server process, as a worker would, and pickle its outcome."""
    import cloudpickle

    from vmexec.agent.worker import _call, _describe_exception

    started = time.perf_counter()
    try:
        value = _call(fn, cloudpickle.loads(args), chunked)
        payload, ok = cloudpickle.dumps(value), True
    except BaseException as exc:  # noqa: BLE001 - the task's own error, sent back
        payload, ok = _describe_exception(exc), False
    return ok, payload, time.perf_counter() - started


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="vmexec simfleet: %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(int(os.environ.get("VMEXEC_SIMFLEET_LOG", logging.WARNING)))


if __name__ == "__main__":  # pragma: no cover - the server process
    _serve(sys.argv[1], sys.argv[2])
