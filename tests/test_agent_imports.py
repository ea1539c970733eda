"""The agent is a leaf: what ``python -m vmexec.agent`` imports, checked in a clean process.

Every machine pays the agent's start-up time, and a bare machine has only the standard
library and cloudpickle: the agent must not pull in the client (executor, scheduler,
environment, guardrails), an SSH or cloud library, or multiprocessing.
"""

from __future__ import annotations

import json
import subprocess
import sys

# What the agent may import of vmexec: the protocol, the version, and its own modules
# (any module of vmexec.agent: the package is the agent).
AGENT_MODULES = {"vmexec", "vmexec._version", "vmexec.protocol"}
AGENT_PACKAGE = "vmexec.agent"
# Never on the agent's import path (each costs start-up time or needs a package the
# machine may not have).
FORBIDDEN = {"multiprocessing", "concurrent.futures.process", "asyncio", "paramiko",
             "asyncssh", "boto3", "botocore", "psutil", "tqdm", "vmexec.errors"}


def _imported_by(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True, timeout=60)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_agent_imports_only_protocol_agent_and_cloudpickle() -> None:
    modules = set(_imported_by("import vmexec.agent.main"))
    ours = {m for m in modules if m == "vmexec" or m.startswith("vmexec.")}
    client = {m for m in ours - AGENT_MODULES
              if m != AGENT_PACKAGE and not m.startswith(AGENT_PACKAGE + ".")}
    assert not client, f"the agent imports client modules: {sorted(client)}"
    assert "cloudpickle" in modules
    assert not modules & FORBIDDEN, f"the agent imports {sorted(modules & FORBIDDEN)}"


def test_import_vmexec_is_lazy_and_public_names_still_resolve() -> None:
    modules = set(_imported_by("import vmexec"))
    assert "vmexec.executor" not in modules and "vmexec.scheduler" not in modules
    import vmexec

    for name in vmexec.__all__:
        assert getattr(vmexec, name) is not None, name
    assert vmexec.VMExecutor.__module__ == "vmexec.executor"
    assert issubclass(vmexec.VersionMismatch, vmexec.VMExecError)


def test_protocol_errors_are_the_public_classes() -> None:
    from vmexec import errors, protocol

    assert protocol.ProtocolError is errors.ProtocolError
    assert protocol.VersionMismatch is errors.VersionMismatch
    reader = protocol.FrameReader()
    try:
        reader.feed(b"\xff\xff\xff\xff")
    except errors.ProtocolError as exc:
        assert "corrupt" in str(exc)
    else:
        raise AssertionError("a corrupt length must raise ProtocolError")
