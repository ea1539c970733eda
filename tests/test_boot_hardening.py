"""The boot script's root-owned pieces (issue 12, item 6).

The dead-man loop and the spot-notice poller run as root for the machine's whole life.
``opt/vmexec`` is handed to the login user for the environment install (task code runs
as that user), so a script there could be rewritten by task code and then run as root.
They must live in a directory only root can write.
"""

from __future__ import annotations

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
