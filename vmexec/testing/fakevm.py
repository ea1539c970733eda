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
* the shims first on every ``PATH`` in the machine (``vmexec.testing.vmhost``), so
  that a power-off becomes a request to the harness;
* faults: killing the machine (abruptly, or freezing it silently), replacing its sshd by
  a socket that never answers, breaking its Python so the boot script fails, writing a
  spot interruption notice;
* stopping: every process of the machine is found and killed
  (``vmexec.testing.processes``).

The parts it is made with are re-exported here: ``FakeVMHost`` (what every machine of
one cloud shares, ``vmexec.testing.vmhost``), ``ControlServer`` / ``control_request``
(the Unix socket the shims talk to, ``vmexec.testing.control``) and the process
helpers (``vmexec.testing.processes``).

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
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import psutil

from vmexec.testing.control import ControlServer, control_request
from vmexec.testing.processes import (
    find_processes,
    signal_all,
    stop_machines,
    stop_processes,
)
from vmexec.testing.sshd import COMMON_CONFIG, reap, tail, wait_banner
from vmexec.testing.vmhost import MARKER_ENV, FakeVMError, FakeVMHost, keygen

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

# An address nothing listens on: the machines' proxy, so the internet is unreachable.
_NO_INTERNET_PROXY = "http://127.0.0.1:9"


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
                keygen(key)
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
        count = signal_all(procs, signal.SIGSTOP if silent else signal.SIGKILL)
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
        reason = wait_banner(proc, self.spec.host, self.spec.port, SSHD_START_TIMEOUT)
        if reason == "exited":
            raise FakeVMError(
                f"sshd of {self.id} exited with status {proc.returncode}; its log says:\n"
                f"{tail(log_path.read_text(errors='replace'))}")
        if reason is not None:
            raise FakeVMError(f"sshd of {self.id} did not answer on {self.spec.host}:"
                              f"{self.spec.port} within {SSHD_START_TIMEOUT:g}s ({reason})")

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
        reap(proc)

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
