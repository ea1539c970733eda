"""Presigned URLs stay out of process lists and logs (issue 12, item 5).

A presigned S3 URL's query is a credential (signature, access key id, session token).
Every process's command line is readable by every user of a machine (``ps``,
``/proc/*/cmdline``) and the SSH transport logs the remote command at debug level, so:
the install script goes to the machine on stdin, downloads pass their URL to curl or
Python on stdin, and error messages show URLs without their query.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmexec.environment.install import bootstrap_script, redact_urls
from vmexec.environment.spec import Artifact
from vmexec.providers.base import MachineRecord
from vmexec.transports.local import LocalTransport

SECRET = "X-Amz-Signature=0123456789abcdefSECRET"


def command_lines() -> list[str]:
    lines = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    lines.append(f.read().replace(b"\0", b" ").decode("utf-8", "replace"))
            except OSError:
                pass
    return lines


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, Any]]]:
    """An HTTP server on loopback that, while it answers, looks at every command line."""
    seen: dict[str, Any] = {"requests": 0, "leaks": []}
    body = b"echo BOOTSTRAPPED >\"$VMEXEC_ROOT/ran\"\n"
    seen["body"] = body

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            seen["requests"] += 1
            # The downloader is running right now: its command line is in /proc.
            seen["leaks"] += [line for line in command_lines() if "SECRET" in line]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def python_only_path(tmp_path: Path) -> str:
    """A PATH with the tools the script needs but no curl: the Python fallback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The interpreter itself, not a wrapper (pyenv's shims need more tools than this).
    os.symlink(os.path.realpath(sys.executable), bin_dir / "python3")
    for tool in ("bash", "sha256sum", "cut", "mkdir", "cat"):
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            if os.path.exists(os.path.join(folder, tool)):
                os.symlink(os.path.join(folder, tool), bin_dir / tool)
                break
    return str(bin_dir)


@pytest.mark.parametrize("downloader", ["curl", "python"])
def test_downloads_keep_the_url_off_every_command_line(
        server: tuple[str, dict[str, Any]], tmp_path: Path, downloader: str) -> None:
    url, seen = server
    script = Artifact(name="install.sh", kind="script",
                      sha256=hashlib.sha256(seen["body"]).hexdigest(), size=len(seen["body"]),
                      path="", url=f"{url}/vmexec/a/install.sh?{SECRET}&X-Amz-Credential=AKIA")
    env = {**os.environ, "VMEXEC_ROOT": str(tmp_path)}
    if downloader == "python":
        env["PATH"] = python_only_path(tmp_path)
    boot = tmp_path / "boot.sh"  # as the boot script runs it: from a file
    boot.write_text(bootstrap_script(script))
    done = subprocess.run([shutil.which("bash") or "bash", str(boot)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ran").read_text() == "BOOTSTRAPPED\n"
    assert seen["requests"] == 1
    assert seen["leaks"] == []


def test_the_install_script_reaches_the_machine_on_stdin(
        make_provider: Any, tmp_path: Path) -> None:
    """The provider's install step, run for real in a local shell standing in for the SSH
    session: the command (what ps shows, what the debug log prints) has no URL, the
    script still runs, and a failure's message has the URL without its query."""
    provider = make_provider(2, instance_type=["c7i.large"], regions=["us-east-1"])
    record = MachineRecord(id="i-0", label="i-0", slots=2, provider="ec2",
                           region="us-east-1")
    commands: list[str] = []

    def ssh(command: str, timeout: float) -> LocalTransport:
        commands.append(command)
        return LocalTransport(["sh", "-c", command], label="stand-in",
                              env={**os.environ, "VMEXEC_ROOT": str(tmp_path)})

    url = f"https://vmexec-staging.s3.amazonaws.com/vmexec/a/x.whl?{SECRET}"
    ok = (f'vx_url="{url}"\n'
          f'for f in /proc/[0-9]*/cmdline; do tr "\\0" " " <"$f"; echo; done '
          f'>"$VMEXEC_ROOT/cmdlines"\n')
    provider._connector.install_script = lambda region: ok
    provider._connector.install_environment(record, ssh, 30.0)
    assert "SECRET" not in commands[-1]
    snapshot = (tmp_path / "cmdlines").read_text()
    assert snapshot.strip() and "SECRET" not in snapshot

    failing = f'echo "curl: cannot fetch {url}"; exit 1\n'
    provider._connector.install_script = lambda region: failing
    with pytest.raises(Exception) as failure:
        provider._connector.install_environment(record, ssh, 30.0)
    message = str(failure.value)
    assert "installing the environment failed" in message
    assert "SECRET" not in message and "x.whl?<redacted>" in message


def test_redact_urls() -> None:
    text = (f"GET https://b.s3.amazonaws.com/k?{SECRET}&X-Amz-Security-Token=abc failed; "
            "see file:///tmp/x and http://mirror/simple")
    assert redact_urls(text) == ("GET https://b.s3.amazonaws.com/k?<redacted> failed; "
                                 "see file:///tmp/x and http://mirror/simple")
