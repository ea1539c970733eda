"""Task functions used by the tests. A user module (not installed): travels by value."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

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
