"""Task functions used by the tests, and helpers the test modules share.

A user module (not installed): its task functions travel by value. The shared helpers
(below the task functions) import the harness lazily, so that importing this module
stays cheap for tests that never start a cloud.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from vmexec.testing.localcloud import LocalCloud

class Point:
    """A user-defined class crossing the wire both ways."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class CustomError(Exception):
    pass


def add(a: int, b: int = 0) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def fail(message: str) -> None:
    raise CustomError(message)


def fail_if(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def init(value: str) -> None:
    # Process state that survives between tasks (functions of a by-value module get
    # their own globals per pickle, so a module-level list would not be shared).
    os.environ["VMEXEC_TEST_INIT"] = os.environ.get("VMEXEC_TEST_INIT", "") + value


def init_fails() -> None:
    raise RuntimeError("initializer exploded")


def initialized() -> str:
    return os.environ.get("VMEXEC_TEST_INIT", "")


def shout(text: str) -> str:
    print(text)
    print("to stderr:", text, file=sys.stderr)
    logging.getLogger("user.module").warning("logged: %s", text)
    return text


def die_once(marker: str) -> str:
    """Kill the worker process the first time (per marker file), succeed after."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(13)
    return "survived"


def die_always(how: str = "exit") -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(7)


def worker_and_agent_pids() -> str:
    return f"{os.getpid()} {os.getppid()}"


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def chatter(lines: int, width: int = 100) -> int:
    """Print a lot, fast: the chatty-logger scenario."""
    payload = "x" * width
    for i in range(lines):
        print(i, payload)
    return lines


def getenv(name: str) -> "str | None":
    return os.environ.get(name)


# --- helpers shared by test modules ------------------------------------------------------

def local_cloud(region: str) -> Iterator["LocalCloud"]:
    """The body of a module's ``cloud`` fixture: a ``LocalCloud`` polling ``region``,
    which fails the module if a request tried to leave it::

        @pytest.fixture(scope="module")
        def cloud() -> Iterator[LocalCloud]:
            yield from helpers.local_cloud(REGION)
    """
    from conftest import _require_sshd  # the suite's one rule for a missing sshd
    from vmexec.testing.localcloud import LocalCloud

    _require_sshd()
    with LocalCloud(regions=[region]) as cloud:
        yield cloud
        assert cloud.offmachine_requests == [], "a request tried to leave the local cloud"


def instance_states(cloud: "LocalCloud", region: str, ids: list[str]) -> dict[str, str]:
    """The state of each instance of ``ids`` in ``region``, as moto reports it."""
    answer = cloud.client(region).describe_instances(InstanceIds=ids)
    return {i["InstanceId"]: i["State"]["Name"]
            for r in answer["Reservations"] for i in r["Instances"]}


def start_remote_client(cloud: "LocalCloud", script: Path, source: str, *args: str,
                        **options: Any) -> tuple["subprocess.Popen[str]", Path]:
    """Run ``source`` (written to ``script``) as a client in a process of its own, with
    ``cloud.remote_options(**options)`` as JSON and ``args`` as its arguments.

    Returns:
        The process (its stdout a pipe) and the file its stderr goes to.
    """
    script.write_text(source)
    log = script.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cloud.remote_options(**options)), *args],
            env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    return proc, log


def first_line(proc: "subprocess.Popen[str]", log: Path, timeout: float) -> str:
    """The client's first line of output, waiting up to ``timeout`` seconds for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    assert line.strip(), f"the client said nothing (exit {proc.poll()}):\n" \
                         f"{log.read_text()[-3000:]}"
    return line


class FakeRoute:
    """Stands in for ``socket.socket`` when the client asks which address its route to
    the internet would use: a UDP "connect" that sends nothing, answering ``address``.

    ``monkeypatch.setattr(socket, "socket", FakeRoute("192.168.1.23"))``
    """

    def __init__(self, address: str) -> None:
        self.address = address

    def __call__(self, *args: Any) -> "FakeRoute":
        return self

    def __enter__(self) -> "FakeRoute":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def connect(self, address: Any) -> None:  # a UDP connect sends nothing
        pass

    def getsockname(self) -> tuple[str, int]:
        return (self.address, 40000)
