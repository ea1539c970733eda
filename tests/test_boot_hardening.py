"""The boot script's root-owned pieces (issue 12, item 6).

The dead-man loop and the spot-notice poller run as root for the machine's whole life.
``opt/vmexec`` is handed to the login user for the environment install (task code runs
as that user), so a script there could be rewritten by task code and then run as root.
They must live in a directory only root can write.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from vmexec.providers.ec2.userdata import (
    NOTICE_FILE,
    SCRIPTS_DIR,
    BootSpec,
    FleetKeys,
    render_userdata,
)


def _wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {timeout}s")


def test_root_scripts_live_outside_the_login_users_directory(tmp_path: Path) -> None:
    keys = FleetKeys("vmx-root")
    spec = BootSpec(fleet_id="vmx-root", client_public_key=keys.client_public,
                    host_private_key=keys.host_private, host_public_key=keys.host_public,
                    find_links=(str(tmp_path / "no-wheels"),), heartbeat_grace=3600,
                    # What the EC2 provider appends with environment sync: opt/vmexec
                    # goes to the login user.
                    environment_script='chown -R "$(id -u)" "$R/opt/vmexec"; fail "stop here"')
    script = tmp_path / "boot.sh"
    script.write_text(render_userdata(spec))
    root = tmp_path / "vm"
    env = {**os.environ, "VMEXEC_ROOT": str(root), "VMEXEC_SSHD_RELOAD": "true",
           "VMEXEC_POWEROFF": "true", "VMEXEC_IMDS_URL": "http://127.0.0.1:9"}
    subprocess.run(["bash", str(script)], env=env, timeout=120)
    state = root / "var/lib/vmexec"
    deadman_pid = int(_wait_for(state / "deadman.pid"))
    try:
        running = Path(f"/proc/{deadman_pid}/cmdline").read_bytes().split(b"\0")
        deadman = Path(running[1].decode())
        assert deadman.name == "deadman.sh"
        notice = root / SCRIPTS_DIR / "notice.sh"
        for path in (deadman, notice):
            assert path.exists(), path
            # Not under the login user's directory...
            assert root / "opt" not in path.parents, path
            assert path.parent == root / SCRIPTS_DIR
            # ... and only the owner (root, on a machine) may change it or its folder.
            for item in (path, path.parent):
                assert item.stat().st_mode & 0o022 == 0, oct(item.stat().st_mode)
        assert not list((root / "opt/vmexec").glob("*.sh"))
    finally:
        os.kill(deadman_pid, signal.SIGTERM)
        # The poller stops by itself once the notice file exists.
        (root / NOTICE_FILE).write_text("{}")
        keys.remove()


# --- the uv bootstrap: pinned by version and checksum (issue 12, item 8) ------------------

def _fake_uv_wheel(folder: Path, version: str, payload: str) -> Path:
    """A wheel named like uv's that installs a ``uv`` script (no network needed)."""
    import zipfile

    folder.mkdir(exist_ok=True)
    path = folder / f"uv-{version}-py3-none-any.whl"
    info = f"uv-{version}.dist-info"
    files = {
        f"uv-{version}.data/scripts/uv": f"#!/bin/sh\necho {payload}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: uv\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def _run_uv_bootstrap(tmp_path: Path, links: Path) -> subprocess.CompletedProcess[str]:
    """The install script's prelude (which installs uv when the image has none), as a
    machine runs it: uv is not on PATH."""
    from vmexec.environment import install

    words = f"--no-index --find-links {links}"
    prelude = install._COMMON.format(
        token="t", base="b", token_short="t", mode="requirements", pip_index=words,
        uv_index=words, major=3, minor=11, minor_version="3.11", check="''", check_names="",
        vx_get=install.VX_GET, uv_version=install.uv_version(), built_marker="x",
        uv_locks=install._uv_lock_cases(["x86_64", "aarch64"], "3.11", None, [str(links)]))
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "prelude.sh"
    script.write_text(prelude + 'vx_log "uv is $vx_uv: $(sh "$vx_uv")"\n')
    path = ":".join(p for p in os.environ["PATH"].split(":")
                    if not os.path.exists(os.path.join(p, "uv")))
    env = {**os.environ, "PATH": path, "VMEXEC_ROOT": str(tmp_path / "machine")}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_uv_is_installed_only_with_the_resolved_checksum(tmp_path: Path) -> None:
    from vmexec.environment import install

    install._UV_LOCKS.clear()
    version = install.uv_version()
    links = tmp_path / "links"
    wheel = _fake_uv_wheel(links, version, "genuine")
    lock = install.uv_bootstrap_requirements("x86_64", "3.11", None, [str(links)])
    assert lock is not None and f"uv=={version}" in lock
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() in lock

    done = _run_uv_bootstrap(tmp_path / "good", links)
    assert f"installing uv {version} (hash-checked)" in done.stdout, done.stdout + done.stderr
    assert "uv is " in done.stdout and "genuine" in done.stdout

    # The index now serves other bytes under the same name and version.
    _fake_uv_wheel(links, version, "tampered")
    done = _run_uv_bootstrap(tmp_path / "bad", links)
    assert done.returncode != 0
    assert f"cannot install uv {version} with a matching sha256" in done.stdout
    assert "tampered" not in done.stdout


def test_no_checksummed_uv_fails_clearly(tmp_path: Path) -> None:
    from vmexec.environment import install

    install._UV_LOCKS.clear()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run_uv_bootstrap(tmp_path, empty)
    assert done.returncode != 0
    assert "no uv on the image, and no checksummed uv" in done.stdout
    assert "use an image with uv on PATH (ami=)" in done.stdout


# --- the scripts are package files (shellcheck-clean), the user-data their carrier -------

def test_userdata_carries_the_package_scripts_within_the_limit() -> None:
    from vmexec.providers.ec2.userdata import USERDATA_LIMIT, script_text

    keys = FleetKeys("vmx-files")
    try:
        spec = BootSpec(fleet_id="vmx-files", client_public_key=keys.client_public,
                        host_private_key=keys.host_private, host_public_key=keys.host_public,
                        environment_script=script_text("prepare-ssh-install.sh"))
        script = render_userdata(spec)
    finally:
        keys.remove()
    # What the EC2 provider sends with environment sync leaves room for boot_env and
    # packages under EC2's 16 KiB.
    assert len(script.encode()) < USERDATA_LIMIT - 6 * 1024
    for name in ("boot.sh", "deadman.sh", "notice.sh"):
        commands = [line for line in script_text(name).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        assert all(line in script.splitlines() for line in commands), name
    # Values arrive as variables in the header, never formatted into the files.
    assert "vmx-files" not in script.split("\nembedded_script()")[1]


def test_probe_reports_what_the_client_parses(tmp_path: Path) -> None:
    from vmexec.providers.ec2.userdata import READY, WAITING, probe_command

    root = tmp_path / "vm"
    (root / "var/lib/vmexec").mkdir(parents=True)
    env = {**os.environ, "VMEXEC_ROOT": str(root)}
    waiting = subprocess.run(["sh", "-c", probe_command(1)], env=env, capture_output=True,
                             text=True, timeout=30)
    assert waiting.stdout.splitlines()[0] == WAITING
    (root / "var/lib/vmexec/ready").touch()
    ready = subprocess.run(["sh", "-c", probe_command(5)], env=env, capture_output=True,
                           text=True, timeout=30)
    assert ready.stdout.splitlines()[0] == f"{READY} {root}"
