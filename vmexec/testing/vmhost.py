"""What every fake VM of one local cloud shares: directories, shims, sshd settings.

Owns ``FakeVMHost``: the shims first on every ``PATH`` in a machine (``shutdown``,
``poweroff``, ``halt``, ``reboot``, ``systemctl``, ``systemd-run``, ``sudo``, and the
package managers ``apt-get``, ``apt``, ``dnf``, ``yum``), so that a power-off becomes a
request to the harness and nothing reaches this computer's own init system or
packages; a Python of the client's minor version; the tools a broken machine
(``fail_boot``) lacks; and whether this sshd takes ``PerSourcePenalties``. The shim
and the broken tool are package data (``vmexec/testing/scripts``).

Also owns what the other fake VM modules share: ``FakeVMError`` and ``MARKER_ENV``.

Must not import: boto3, moto, paramiko, or vmexec's core (standard library and psutil
only).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

from vmexec.testing.sshd import config_ok, find_sshd, sshd_available

__all__ = ["FakeVMHost", "FakeVMError", "MARKER_ENV", "keygen"]

log = logging.getLogger(__name__)

#: Environment variable that marks every process of a fake VM (value: the VM's marker).
MARKER_ENV = "VMEXEC_FAKEVM"

# Commands that would act on the real computer if the script reached them: the shims
# stand in for them on every PATH inside a fake VM.
_SHIM_NAMES = ("shutdown", "poweroff", "halt", "reboot", "systemctl", "systemd-run", "sudo",
               "apt-get", "apt", "dnf", "yum")
# Commands a broken machine (fail_boot) lacks: whatever the boot script uses to make a
# Python environment fails, so the script's own failure path runs.
_BROKEN_NAMES = ("python", "python3", f"python3.{sys.version_info[1]}", "pip", "pip3", "uv")


class FakeVMError(RuntimeError):
    """A fake VM could not do what was asked (the message says why, with log tails)."""


class FakeVMHost:
    """What every fake VM of one local cloud shares: directories, shims, sshd settings.

    Args:
        workdir: the cloud's directory; machines live in ``workdir/vms/<id>``.
        control_socket: path of the ``ControlServer`` socket the shims talk to.
        marker_prefix: prefix of every machine's ``VMEXEC_FAKEVM`` marker, unique to this
            cloud, so that stopping a machine never touches another cloud's processes.
        distro_sshd: start an sshd with a throwaway host key at power-on (as a real
            image does) until the boot script installs the pinned key.
        extra_path: directories put on the machines' PATH after the shims and Python
            (e.g. a directory holding ``uv``).

    Raises:
        FakeVMError: sshd or ssh-keygen is missing.
    """

    def __init__(self, workdir: Path, control_socket: str, marker_prefix: str, *,
                 distro_sshd: bool = True, extra_path: Iterable[str] = (),
                 machine_env: Optional[dict[str, str]] = None) -> None:
        reason = sshd_available()
        if reason is not None:
            raise FakeVMError(reason)
        self.workdir = workdir
        self.control_socket = control_socket
        self.marker_prefix = marker_prefix
        self.distro_sshd = distro_sshd
        self.sshd_path = find_sshd() or "sshd"
        self.shim_dir = workdir / "bin"
        self.python_dir = workdir / "python"
        self.broken_dir = workdir / "broken"
        self.extra_path = [str(p) for p in extra_path]
        # Extra variables in every machine's sessions, e.g. a UV_CACHE_DIR shared by all
        # machines to model an image whose package cache is already warm.
        self.machine_env = dict(machine_env or {})
        self.vms_dir = workdir / "vms"
        for d in (self.shim_dir, self.python_dir, self.broken_dir, self.vms_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_shims()
        # sshd refuses to run without its privilege-separation directory.
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except PermissionError:
            log.debug("cannot create /run/sshd (not root): sshd runs without privsep")
        self.per_source_penalties = self._probe_penalties()

    @property
    def ctl(self) -> str:
        """The shim that sends a request to the local cloud (``ctl sshd-reload`` ...)."""
        return str(self.shim_dir / "fakevm-ctl")

    def machine_path(self, broken: bool = False) -> str:
        """The PATH inside a machine: shims, Python of this minor version, the system's."""
        dirs = [str(self.broken_dir)] if broken else []
        dirs += [str(self.shim_dir), str(self.python_dir), *self.extra_path,
                 "/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin"]
        return ":".join(dirs)

    def _write_shims(self) -> None:
        # Scripts get a shebang line with this interpreter; -I keeps a machine's
        # PYTHONPATH or broken site-packages from affecting the shim.
        header = (f"#!{_base_interpreter()} -I\n"
                  f"SOCKET = {self.control_socket!r}\nMARKER_ENV = {MARKER_ENV!r}\n")
        source = header + _script("fakevm_shim.py")
        ctl = self.shim_dir / "fakevm-ctl"
        ctl.write_text(source)
        ctl.chmod(0o755)
        for name in _SHIM_NAMES:
            _symlink(ctl, self.shim_dir / name)
        # A Python of the client's minor version, as the boot script expects to find.
        python = _base_interpreter()
        for name in ("python3", f"python3.{sys.version_info[1]}"):
            _symlink(Path(python), self.python_dir / name)
        broken = self.broken_dir / "broken-tool"
        broken.write_text(_script("broken-tool.sh"))
        broken.chmod(0o755)
        for name in _BROKEN_NAMES:
            _symlink(broken, self.broken_dir / name)

    def _probe_penalties(self) -> bool:
        # OpenSSH >= 9.8 penalises addresses whose logins fail (every client here comes
        # from 127.0.0.1, and fault tests fail logins on purpose); older sshd rejects
        # the option. Probe once per cloud, not once per machine.
        probe = self.workdir / "sshd_probe_config"
        key = self.workdir / "probe_host_key"
        keygen(key)
        probe.write_text(f"HostKey {key}\nListenAddress 127.0.0.1\nPerSourcePenalties no\n")
        try:
            return config_ok(self.sshd_path, probe)
        finally:
            probe.unlink()


def _script(name: str) -> str:
    """A script shipped in ``vmexec/testing/scripts``."""
    return resources.files("vmexec.testing").joinpath("scripts", name).read_text("utf-8")


def keygen(path: Path) -> None:
    """An ed25519 key pair at ``path`` (kept if there is one already)."""
    if path.exists():
        return
    result = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fakevm",
                             "-f", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise FakeVMError(f"ssh-keygen failed: {result.stderr.strip()}")


def _symlink(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _base_interpreter() -> str:
    """This interpreter's real binary, outside any virtualenv (a machine has no venv)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)
