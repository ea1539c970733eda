"""Fake VMs: a cloud instance's boot and SSH life, played by processes on this machine.

Owns, for each instance the local cloud hands it (``FakeVM``):

* a root directory standing in for the machine's ``/`` (exported as ``VMEXEC_ROOT``);
* an address of its own, ``127.A.B.C`` port 22 (Linux routes all of 127.0.0.0/8 to
  ``lo``), so every machine is a distinct host to the SSH client;
* the distribution's sshd, started at "power on" with a throwaway host key, as on a real
  image where sshd is up before user-data runs (a client that connects early sees a
  host key other than the pinned one and must wait, not give up or accept it);
* running the instance's user-data script for real, with a clean environment (no AWS
  credentials; an unreachable HTTP proxy so that anything reaching for the internet
  fails at once, as on a machine without internet access);
* the sshd (re)start that the script asks for (``$VMEXEC_SSHD_RELOAD``), with the host
  key the script installed under ``$VMEXEC_ROOT/etc/ssh`` and its ``authorized_keys``;
* shims first on every ``PATH`` in the machine (``shutdown``, ``poweroff``, ``halt``,
  ``reboot``, ``systemctl``, ``systemd-run``, ``sudo``, and the package managers
  ``apt-get``, ``apt``, ``dnf``, ``yum``) so that a power-off becomes a request to the
  harness and nothing reaches this computer's own init system or packages;
* faults: killing the machine (abruptly, or freezing it silently), replacing its sshd by
  a socket that never answers, breaking its Python so the boot script fails, writing a
  spot interruption notice;
* stopping: every process of the machine is found (descendants of what the harness
  started, and every process carrying the machine's ``VMEXEC_FAKEVM`` marker in its
  environment, which catches daemonised ones) and killed.

Also owns ``ControlServer``: the Unix socket the shims talk to (``control_request`` is
its client side, for other processes), and ``FakeVMHost``: the directories, shims and
settings shared by every machine of one cloud.

Must not import: boto3, moto, paramiko, or vmexec's core (standard library and psutil
only): this module knows nothing of clouds; ``vmexec.testing.localcloud`` maps instances
to fake VMs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import psutil

from vmexec.testing.sshd import (
    COMMON_CONFIG,
    config_ok,
    find_sshd,
    read_banner,
    sshd_available,
    tail,
)

__all__ = [
    "FakeVM",
    "FakeVMError",
    "FakeVMHost",
    "ControlServer",
    "control_request",
    "find_processes",
    "stop_machines",
    "stop_processes",
    "VMSpec",
    "MARKER_ENV",
    "INTERRUPTION_NOTICE",
]

log = logging.getLogger(__name__)

#: Environment variable that marks every process of a fake VM (value: the VM's marker).
MARKER_ENV = "VMEXEC_FAKEVM"

#: Where a fake VM's spot interruption notice appears, relative to its root (the agent
#: reads ``$VMEXEC_ROOT`` + this; on EC2 the same JSON is served by the instance
#: metadata service at ``/latest/meta-data/spot/instance-action``).
INTERRUPTION_NOTICE = "var/lib/vmexec/spot-interruption"

#: Seconds a (re)started sshd may take to answer with its banner.
SSHD_START_TIMEOUT = 15.0

#: A boot script still running after this long stops counting as "booting" for the
#: local cloud's limit on concurrent boots (a script that never ends must not keep
#: every other machine powered off).
BOOT_SLOT_SECONDS = 120.0

#: Seconds between SIGTERM and SIGKILL when a machine is terminated (an orderly shutdown).
STOP_GRACE = 1.0

# Commands that would act on the real computer if the script reached them: the shims
# stand in for them on every PATH inside a fake VM.
_SHIM_NAMES = ("shutdown", "poweroff", "halt", "reboot", "systemctl", "systemd-run", "sudo",
               "apt-get", "apt", "dnf", "yum")
# Commands a broken machine (fail_boot) lacks: whatever the boot script uses to make a
# Python environment fails, so the script's own failure path runs.
_BROKEN_NAMES = ("python", "python3", f"python3.{sys.version_info[1]}", "pip", "pip3", "uv")
# An address nothing listens on: the machines' proxy, so the internet is unreachable.
_NO_INTERNET_PROXY = "http://127.0.0.1:9"


class FakeVMError(RuntimeError):
    """A fake VM could not do what was asked (the message says why, with log tails)."""


@dataclasses.dataclass(frozen=True)
class VMSpec:
    """What a fake VM is made from: the instance as the cloud describes it.

    Attributes:
        instance_id: the cloud's id (e.g. ``i-0abc...``).
        user_data: the raw user-data (a script starting with ``#!``).
        host, port: the address its sshd listens on.
        region, zone, instance_type: for logs and ``repr``.
        shutdown_behavior: ``"terminate"`` or ``"stop"``: what a power-off does.
    """

    instance_id: str
    user_data: bytes
    host: str
    port: int
    region: str = ""
    zone: str = ""
    instance_type: str = ""
    shutdown_behavior: str = "terminate"


# The program behind every shim. It runs with this interpreter in isolated mode (-I:
# no PYTHON* variables, no user site) so a machine's broken Python cannot break it.
_SHIM_SOURCE = r'''
import json, os, socket, sys, time

SOCKET = {socket!r}
NAME = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]


def ask(command, *args):
    """Send one request to the local cloud and exit with its verdict."""
    request = {{"vm": os.environ.get({marker!r}, ""), "root": os.environ.get("VMEXEC_ROOT", ""),
               "cmd": command, "args": list(args)}}
    try:
        with connect(time.monotonic() + 60) as s:
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data or b"{{}}")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fake VM: {{NAME}}: the local cloud did not answer: {{exc}}\n")
        sys.exit(1)
    if reply.get("error"):
        sys.stderr.write(f"fake VM: {{NAME}}: {{reply['error']}}\n")
        sys.exit(1)
    if reply.get("message"):
        sys.stdout.write(reply["message"] + "\n")
    sys.exit(0)


def connect(deadline):
    """A connection to the local cloud; waits while its listen backlog is full (many
    machines asking at once), which a socket with a timeout is told with EAGAIN at once."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            s.connect(SOCKET)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def minutes(when):
    """shutdown's TIME: now, +M, or hh:mm (taken as now: a test never waits for a clock)."""
    if when.startswith("+") and when[1:].isdigit():
        return int(when[1:]) * 60
    return 0


if NAME == "sudo":
    # The fake VM runs everything as root already: drop sudo's options and run the rest.
    args = list(ARGS)
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option == "--":
            break
        if option in ("-u", "-g", "-C", "-h", "-p", "-U", "-r", "-t", "-T", "-D") and args:
            args.pop(0)
    if not args:
        sys.exit(0)
    os.execvp(args[0], args)
elif NAME in ("poweroff", "halt"):
    ask("poweroff")
elif NAME == "reboot":
    ask("reboot")
elif NAME == "shutdown":
    if "-c" in ARGS:
        ask("cancel-poweroff")
    if "-r" in ARGS or "--reboot" in ARGS:
        ask("reboot")
    times = [a for a in ARGS if not a.startswith("-")]
    ask("poweroff", str(minutes(times[0]) if times else 60))
elif NAME == "systemctl":
    verbs = [a for a in ARGS if not a.startswith("-")]
    if verbs and verbs[0] in ("poweroff", "halt"):
        ask("poweroff")
    restarts = ("restart", "reload", "start", "reload-or-restart", "try-restart")
    if len(verbs) >= 2 and verbs[0] in restarts and verbs[1].split(".")[0] in ("ssh", "sshd"):
        ask("sshd-reload")
    sys.stderr.write(f"fake VM: systemctl {{' '.join(ARGS)}}: a fake VM runs no systemd\n")
    sys.exit(1)
elif NAME in ("apt-get", "apt", "dnf", "yum"):
    # They would change this computer, not the machine: a fake VM has no package manager.
    sys.stderr.write(f"fake VM: {{NAME}}: a fake VM installs no system packages\n")
    sys.exit(1)
elif NAME == "systemd-run":
    sys.stderr.write("fake VM: systemd-run: a fake VM runs no systemd\n")
    sys.exit(1)
elif NAME == "fakevm-ctl" and ARGS:
    ask(*ARGS)
else:
    sys.stderr.write(f"fake VM: unknown shim {{NAME}} {{ARGS}}\n")
    sys.exit(2)
'''

_BROKEN_SOURCE = """#!/bin/sh
echo "$(basename "$0"): cannot execute: this machine's Python is broken (fault injected by \
LocalCloud.fail_boot)" >&2
exit 127
"""


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
        source = f"#!{_base_interpreter()} -I\n" + _SHIM_SOURCE.format(
            socket=self.control_socket, marker=MARKER_ENV)
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
        broken.write_text(_BROKEN_SOURCE)
        broken.chmod(0o755)
        for name in _BROKEN_NAMES:
            _symlink(broken, self.broken_dir / name)

    def _probe_penalties(self) -> bool:
        # OpenSSH >= 9.8 penalises addresses whose logins fail (every client here comes
        # from 127.0.0.1, and fault tests fail logins on purpose); older sshd rejects
        # the option. Probe once per cloud, not once per machine.
        probe = self.workdir / "sshd_probe_config"
        key = self.workdir / "probe_host_key"
        _keygen(key)
        probe.write_text(f"HostKey {key}\nListenAddress 127.0.0.1\nPerSourcePenalties no\n")
        try:
            return config_ok(self.sshd_path, probe)
        finally:
            probe.unlink()


class FakeVM:
    """One machine: a root directory, an address, its sshd and its boot script.

    Thread-safe: the watcher, the control server and test code may call any method at
    any time; a per-machine lock orders state changes.

    Args:
        host: the shared ``FakeVMHost``.
        spec: the instance it plays.
        broken: break its Python so the boot script fails (``fail_boot``).
        blackholed: its sshd never answers (``blackhole`` before boot).

    Attributes:
        state: ``"created"`` → ``"booting"`` → ``"stopping"`` → ``"stopped"``; ``"dead"``
            after ``kill`` (then ``"stopping"`` → ``"stopped"`` when its instance ends).
        root: its ``/`` (``VMEXEC_ROOT``).
        marker: the ``VMEXEC_FAKEVM`` value carried by every one of its processes.
    """

    def __init__(self, host: FakeVMHost, spec: VMSpec, *, broken: bool = False,
                 blackholed: bool = False) -> None:
        self.host = host
        self.spec = spec
        self.id = spec.instance_id
        self.marker = f"{host.marker_prefix}:{spec.instance_id}"
        self.dir = host.vms_dir / spec.instance_id
        self.root = self.dir / "root"
        self.hostside = self.dir / "host"
        self.broken = broken
        self.blackholed = blackholed
        self.state = "created"
        self.boot_exit: Optional[int] = None
        self.boot_started = 0.0
        self.frozen = False
        self.sshd_starts = 0
        self._lock = threading.RLock()
        self._sshd: Optional[subprocess.Popen[bytes]] = None
        self._boot: Optional[subprocess.Popen[bytes]] = None
        self._blackhole: Optional[socket.socket] = None
        self._started: list[subprocess.Popen[bytes]] = []
        self._orphans: list[psutil.Process] = []
        #: Set once the machine is off and every process of it is gone.
        self.stopped = threading.Event()

    # --- what tests look at ------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of its sshd."""
        return (self.spec.host, self.spec.port)

    @property
    def boot_running(self) -> bool:
        """Whether its boot script runs and counts as booting: started, not ended (as of
        the last ``poll``) and younger than ``BOOT_SLOT_SECONDS``."""
        return (self._boot is not None and self.boot_exit is None
                and time.monotonic() - self.boot_started < BOOT_SLOT_SECONDS)

    @property
    def pinned_host_key(self) -> Path:
        """Where the boot script installs the host key the client pins."""
        return self.root / "etc/ssh/ssh_host_ed25519_key"

    @property
    def ready(self) -> bool:
        """Whether the boot script marked the machine ready."""
        return (self.root / "var/lib/vmexec/ready").exists()

    @property
    def failed(self) -> bool:
        """Whether the boot script marked its boot failed."""
        return (self.root / "var/lib/vmexec/failed").exists()

    def boot_log(self) -> str:
        """The boot script's log and its captured output (what cloud-init would keep)."""
        parts = []
        for rel in ("var/log/vmexec-boot.log", "var/log/cloud-init-output.log"):
            path = self.root / rel
            if path.exists():
                parts.append(f"--- {rel}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def sshd_log(self) -> str:
        """Everything its sshd logged."""
        path = self.hostside / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """Every live process of this machine."""
        with self._lock:
            known = [(self.marker, p) for p in self._known_processes()]
        return find_processes({self.marker}, known).get(self.marker, [])

    # --- life --------------------------------------------------------------------------

    def boot(self) -> None:
        """Power on: lay out the root, start the distribution's sshd, run the user-data.

        Returns at once; the boot script runs on (``poll``/``wait_boot`` see it end).

        Raises:
            OSError: the root cannot be written, or the blackhole's address is taken.
            FakeVMError: ssh-keygen failed.
        """
        with self._lock:
            if self.state != "created":
                return
            self.state = "booting"
            for rel in ("etc/ssh", "root", "home", "tmp", "var/log", "var/lib/vmexec",
                        "var/lib/cloud/instance", "opt"):
                (self.root / rel).mkdir(parents=True, exist_ok=True)
            self.hostside.mkdir(parents=True, exist_ok=True)
            if self.blackholed:
                self._open_blackhole()
            elif self.host.distro_sshd:
                key = self.hostside / "distro_host_ed25519_key"
                _keygen(key)
                self._start_sshd(key, wait=False)
            script = self.root / "var/lib/cloud/instance/user-data.txt"
            script.write_bytes(self.spec.user_data)
            script.chmod(0o700)
            output = open(self.root / "var/log/cloud-init-output.log", "ab")
            try:
                if not self.spec.user_data.startswith(b"#!"):
                    output.write(b"fake VM: user-data is not a script (no #! line); "
                                 b"a fake VM runs scripts only\n")
                    self.boot_exit = 126
                    return
                # A session of its own: a signal aimed at the test run must not reach
                # the machine's processes before the harness stops them in order.
                self.boot_started = time.monotonic()
                self._boot = subprocess.Popen(
                    [str(script)], cwd=self.root, env=self._boot_env(),
                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    start_new_session=True)
                self._started.append(self._boot)
            finally:
                output.close()
        log.debug("fake VM %s booting at %s:%d", self.id, *self.address)

    def poll(self) -> Optional[int]:
        """Reap the boot script if it has ended; returns its exit status or None."""
        with self._lock:
            if self._boot is not None and self.boot_exit is None:
                code = self._boot.poll()
                if code is not None:
                    self.boot_exit = code
                    log.debug("fake VM %s: boot script exited with %d", self.id, code)
            for proc in list(self._started):
                if proc.poll() is not None and proc is not self._boot:
                    self._started.remove(proc)
            return self.boot_exit

    def wait_boot(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the boot script ends, up to ``timeout`` seconds.

        Returns:
            Its exit status; None if it did not start or still runs.
        """
        with self._lock:
            proc = self._boot
        if proc is None:
            return self.boot_exit
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with self._lock:
            if self.boot_exit is None:
                self.boot_exit = code
        return code

    def reload_sshd(self) -> str:
        """(Re)start sshd with the host key the boot script installed.

        Sessions already open survive, as with ``systemctl restart sshd``: only the
        listener is replaced.

        Returns:
            A message for the caller.

        Raises:
            FakeVMError: the machine is down, the host key is missing, or sshd did not
                answer (the message has its log tail).
        """
        with self._lock:
            if self.state != "booting":
                raise FakeVMError(f"machine {self.id} is {self.state}")
            if self.blackholed:
                self._open_blackhole()
                return "sshd restarted (it will never answer: blackholed)"
            if not self.pinned_host_key.exists():
                raise FakeVMError(
                    f"sshd: no host key at {self.pinned_host_key}: the boot script must "
                    "install it before asking for a restart")
            self.pinned_host_key.chmod(0o600)
            self._stop_listener()
            self._start_sshd(self.pinned_host_key, wait=True)
            return f"sshd listening on {self.spec.host}:{self.spec.port}"

    def blackhole(self) -> None:
        """Replace sshd by a socket that accepts connections and never says a word.

        Sessions already open are left alone: only new connections hang.
        """
        with self._lock:
            self.blackholed = True
            if self.state == "booting":
                self._stop_listener()
                self._open_blackhole()

    def interrupt(self, notice: dict[str, str]) -> Path:
        """Write a spot interruption notice where the agent looks for it.

        Args:
            notice: the JSON body EC2's metadata service would serve
                (``{"action": "terminate", "time": "..."}``).

        Returns:
            The notice file.
        """
        path = self.root / INTERRUPTION_NOTICE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(notice))
        # Atomic: a poller never reads half a notice.
        os.replace(tmp, path)
        return path

    def kill(self, silent: bool = False) -> int:
        """The machine dies: every process of it is killed at once (or frozen).

        Args:
            silent: freeze the processes (SIGSTOP) instead: connections stay open and
                nothing answers, like a machine whose network or kernel hung.

        Returns:
            How many processes were killed or frozen.
        """
        with self._lock:
            if self.state in ("dead", "stopping", "stopped"):
                return 0
            self.state = "dead"
            self.frozen = silent
            procs = self.processes()
            if not silent:
                self._close_blackhole()
        count = _signal_all(procs, signal.SIGSTOP if silent else signal.SIGKILL)
        if not silent:
            self.reap()
        log.info("fake VM %s %s (%d processes)", self.id, "frozen" if silent else "killed",
                 count)
        return count

    def stop(self) -> None:
        """Power off: SIGTERM every process, SIGKILL what is left after ``STOP_GRACE``."""
        stop_machines([self])

    def begin_stop(self) -> Optional[tuple[float, list[psutil.Process]]]:
        """Mark the machine stopped and close its sockets; the caller kills its processes.

        Returns:
            ``(grace, started)`` — seconds of SIGTERM grace (0 for a frozen machine) and
            the processes the harness started — or None when it was stopped already.
        """
        with self._lock:
            if self.state in ("stopping", "stopped"):
                return None
            was_frozen = self.frozen
            self.state = "stopping"
            self._close_blackhole()
            return (0.0 if was_frozen else STOP_GRACE), self._known_processes()

    def reap(self) -> None:
        """Collect the exit status of every process the harness started for it."""
        with self._lock:
            started, self._started = self._started, []
            self._sshd = None
        for proc in started:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=5)
            if proc is self._boot and self.boot_exit is None:
                self.boot_exit = code

    # --- internals ---------------------------------------------------------------------

    def _boot_env(self) -> dict[str, str]:
        env = self._machine_env(broken=self.broken)
        env.update({
            "VMEXEC_SSHD_RELOAD": f"{self.host.ctl} sshd-reload",
            "VMEXEC_POWEROFF": f"{self.host.ctl} poweroff",
            "TMPDIR": str(self.root / "tmp"),
        })
        return env

    def _machine_env(self, broken: bool = False) -> dict[str, str]:
        return {
            "PATH": self.host.machine_path(broken=broken),
            "HOME": str(self.root / "root"),
            "LANG": "C.UTF-8",
            "VMEXEC_ROOT": str(self.root),
            MARKER_ENV: self.marker,
            "http_proxy": _NO_INTERNET_PROXY,
            "https_proxy": _NO_INTERNET_PROXY,
            "HTTP_PROXY": _NO_INTERNET_PROXY,
            "HTTPS_PROXY": _NO_INTERNET_PROXY,
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            **self.host.machine_env,
        }

    def _write_sshd_config(self, host_key: Path) -> Path:
        session_env = self._machine_env()
        settings = " ".join(f'"{k}={v}"' for k, v in session_env.items())
        lines = [
            f"ListenAddress {self.spec.host}",
            f"Port {self.spec.port}",
            f"HostKey {host_key}",
            f"PidFile {self.hostside / 'sshd.pid'}",
            # The machine's own authorized_keys, as the boot script wrote them.
            f"AuthorizedKeysFile {self.root}/root/.ssh/authorized_keys "
            f"{self.root}/home/%u/.ssh/authorized_keys",
            *COMMON_CONFIG,
            "PermitRootLogin prohibit-password",
            "MaxStartups 100",
            "LoginGraceTime 30",
            # Sessions run inside the machine: its PATH (shims first), its root, its marker.
            f"SetEnv {settings}",
        ]
        if self.host.per_source_penalties:
            lines.append("PerSourcePenalties no")
        path = self.hostside / "sshd_config"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _start_sshd(self, host_key: Path, wait: bool) -> None:
        config = self._write_sshd_config(host_key)
        log_path = self.hostside / "sshd.log"
        cmd = [self.host.sshd_path, "-D", "-E", str(log_path), "-f", str(config)]
        env = {"PATH": self.host.machine_path(), MARKER_ENV: self.marker, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        self._sshd = proc
        self._started.append(proc)
        self.sshd_starts += 1
        if wait:
            self._wait_banner(proc, log_path)

    def _wait_banner(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + SSHD_START_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FakeVMError(
                    f"sshd of {self.id} exited with status {proc.returncode}; its log says:\n"
                    f"{tail(log_path.read_text(errors='replace'))}")
            banner = read_banner(self.spec.host, self.spec.port,
                                  max(0.05, deadline - time.monotonic()))
            if isinstance(banner, bytes) and banner.startswith(b"SSH-"):
                return
            last = str(banner)
            try:
                # A short pause between probes that ends at once if sshd exits.
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
        raise FakeVMError(f"sshd of {self.id} did not answer on {self.spec.host}:"
                          f"{self.spec.port} within {SSHD_START_TIMEOUT:g}s ({last})")

    def _stop_listener(self) -> None:
        """Stop the sshd listener only; its sessions are separate processes and live on."""
        proc, self._sshd = self._sshd, None
        if proc is None or proc.poll() is not None:
            return
        try:
            self._orphans += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass  # it died under us: nothing of it survives to be tracked
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _open_blackhole(self) -> None:
        if self._blackhole is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.address)
        # Never accepted: the kernel completes each TCP handshake into the backlog and
        # the client waits for a banner that never comes. The backlog outlasts any
        # reasonable number of retries.
        sock.listen(1024)
        self._blackhole = sock

    def _close_blackhole(self) -> None:
        sock, self._blackhole = self._blackhole, None
        if sock is not None:
            sock.close()

    def _known_processes(self) -> list[psutil.Process]:
        """What the harness started for this machine, and the sessions of sshd listeners
        it replaced (they outlive their listener, reparented away from it)."""
        known = []
        for popen in self._started:
            if popen.returncode is None:
                try:
                    known.append(psutil.Process(popen.pid))
                except psutil.NoSuchProcess:
                    continue
        return known + [p for p in self._orphans if p.is_running()]

    def __repr__(self) -> str:
        return (f"<FakeVM {self.id} {self.spec.instance_type} {self.spec.zone} "
                f"{self.spec.host}:{self.spec.port} {self.state}>")


class _ControlSocketServer(socketserver.ThreadingUnixStreamServer):
    # socketserver's default backlog is 5. Every machine of a fleet whose client was
    # killed powers off within the same dead-man interval; on Linux a connect to a full
    # backlog fails at once (EAGAIN) for a socket with a timeout, and a dead-man that
    # cannot ask never asks again. The kernel caps this at net.core.somaxconn.
    request_queue_size = 1024


class ControlServer:
    """The Unix socket the shims inside fake VMs send their requests to.

    A ``socketserver`` with a thread per request: an sshd restart waits for the banner,
    and twenty machines booting at once must not queue behind one another. Requests
    come only from the machines of one cloud, a handful per machine.

    Args:
        path: where to listen (a short path: Unix socket paths are limited to 107 bytes).
        handler: ``handler(marker, root, command, args) -> message``; raises
            ``FakeVMError`` to refuse.
    """

    def __init__(self, path: str,
                 handler: Callable[[str, str, str, list[str]], str]) -> None:
        self.path = path
        serve = self._serve

        class Request(socketserver.StreamRequestHandler):
            timeout = 10  # a shim that connects and says nothing must not hold a thread

            def handle(self) -> None:
                serve(self.rfile, self.wfile, handler)

        self._server = _ControlSocketServer(path, Request)
        # close() waits for the requests in flight (each bounded by its own timeouts).
        self._server.daemon_threads = False
        self._server.block_on_close = True
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fakevm-ctl", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, finish the requests in flight, remove the socket (idempotent)."""
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # removed already

    @staticmethod
    def _serve(rfile: Any, wfile: Any,
               handler: Callable[[str, str, str, list[str]], str]) -> None:
        try:
            request = json.loads(rfile.readline(65536))
            reply = {"message": handler(str(request.get("vm", "")),
                                        str(request.get("root", "")),
                                        str(request.get("cmd", "")),
                                        [str(a) for a in request.get("args", [])])}
        except FakeVMError as exc:
            reply = {"error": str(exc)}
        except (OSError, ValueError) as exc:
            reply = {"error": f"bad request: {exc}"}
        try:
            wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError as exc:
            log.debug("control reply lost: %s", exc)


def control_request(path: str, command: str, *args: str, marker: str = "", root: str = "",
                    timeout: float = 60.0) -> str:
    """Send one request to the ``ControlServer`` at ``path`` (what a shim does).

    Args:
        path: the server's socket.
        command, args: the request.
        marker, root: the machine asking (empty for a client outside every machine).
        timeout: seconds for the whole exchange.

    Returns:
        The server's message.

    Raises:
        FakeVMError: the server refused the request (with its reason) or did not answer.
    """
    request = {"vm": marker, "root": root, "cmd": command, "args": list(args)}
    deadline = time.monotonic() + timeout
    try:
        with _connect_unix(path, deadline) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as answer:
                reply = json.loads(answer.readline(65536) or b"{}")
    except (OSError, ValueError) as exc:
        raise FakeVMError(f"{command}: the local cloud at {path} did not answer: {exc}"
                          ) from None
    if reply.get("error"):
        raise FakeVMError(f"{command}: {reply['error']}")
    return str(reply.get("message", ""))


def _connect_unix(path: str, deadline: float) -> socket.socket:
    """Connect to a Unix socket by ``deadline``, waiting while its backlog is full (a
    socket with a timeout is refused at once with EAGAIN then, not made to wait)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # a short pause: the server accepts in its own thread
            continue
        except BaseException:
            sock.close()
            raise
        return sock


# --- processes -------------------------------------------------------------------------

def find_processes(markers: set[str],
                   started: Iterable[tuple[str, psutil.Process]] = ()
                   ) -> dict[str, list[psutil.Process]]:
    """Live processes by marker.

    Two sources: every process whose environment carries one of ``markers`` in
    ``VMEXEC_FAKEVM`` (one scan of the process table; catches daemonised processes), and
    ``started`` — ``(marker, process)`` pairs the harness knows, with all their
    descendants. The second matters because sshd rewrites its own environment block
    (setproctitle), so no sshd process can be found by its environment.
    """
    found: dict[str, dict[int, psutil.Process]] = {m: {} for m in markers}
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            marker = proc.environ().get(MARKER_ENV)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
        if marker in found:
            found[marker][proc.pid] = proc
    for marker, parent in started:
        if marker not in found:
            continue
        try:
            if not parent.is_running():
                continue
            family = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            found[marker].setdefault(proc.pid, proc)
    return {m: list(procs.values()) for m, procs in found.items()}


def stop_machines(vms: Iterable[FakeVM]) -> None:
    """Stop many machines at once, with one scan of the process table for all of them."""
    grace = 0.0
    started: list[tuple[str, psutil.Process]] = []
    stopping = []
    for vm in vms:
        begun = vm.begin_stop()
        if begun is not None:
            stopping.append(vm)
            grace = max(grace, begun[0])
            started += [(vm.marker, p) for p in begun[1]]
    if not stopping:
        return
    groups = find_processes({vm.marker for vm in stopping}, started)
    stop_processes([p for procs in groups.values() for p in procs], grace)
    for vm in stopping:
        vm.reap()
        vm.state = "stopped"
        vm.stopped.set()
        log.debug("fake VM %s stopped", vm.id)


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> int:
    count = 0
    for proc in procs:
        try:
            proc.send_signal(sig)
            count += 1
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied as exc:
            log.warning("cannot signal %s: %s", proc.pid, exc)
    return count


def stop_processes(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``procs`` (continuing frozen ones), SIGKILL those alive after ``grace``."""
    if grace > 0:
        _signal_all(procs, signal.SIGTERM)
        _signal_all(procs, signal.SIGCONT)
        procs = _wait_dead(procs, grace)
    _signal_all(procs, signal.SIGKILL)
    left = _wait_dead(procs, 5.0)
    if left:
        log.warning("processes that survived SIGKILL: %s", [p.pid for p in left])


def _wait_dead(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until ``procs`` are gone or zombies; return those still alive at the deadline.

    A zombie counts as dead: orphans are reaped by init on its own schedule (slowly on
    some containers' init), and a zombie holds no socket, port or file.
    """
    deadline = time.monotonic() + timeout
    alive = procs
    while True:
        alive = [p for p in alive if _running(p)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return alive
        # Reaps our own children at once; for others this is a bounded poll, as Linux
        # offers no portable wait on a process that is not our child.
        psutil.wait_procs(alive, timeout=min(0.05, left))


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- small helpers ---------------------------------------------------------------------

def _keygen(path: Path) -> None:
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
