"""The boot script every machine runs (EC2 user-data) and the keys it installs.

Owns:

* ``FleetKeys`` — per fleet (ephemeral, or kept between runs for a named fleet), an
  ed25519 *client* key (to log in) and an ed25519
  *host* key (for the machines' sshd), both generated here on the client. The host key
  goes to the machines inside the user-data and its public half into a fleet-private
  known_hosts file, so the very first SSH connection is already pinned: no
  trust-on-first-use, no AutoAddPolicy. (All machines of a fleet share the host key: the
  launch template carries one user-data for every machine, which is what keeps launches
  batched. A machine of the fleet could impersonate another machine of the same fleet,
  nothing else.)
* ``render_userdata(spec)`` — the bash script (< 16 KB, the EC2 limit): the files in
  ``scripts/`` (``boot.sh``, and ``deadman.sh``/``notice.sh`` which it installs) under a
  generated header of shell variables; the scripts are linted with shellcheck.
* ``agent_command()`` / ``probe_command()`` — what the client runs over SSH, so the
  local-cloud harness can run exactly the same.

Every path in the script is under ``${VMEXEC_ROOT:-}`` so a harness can run it in a
directory on one computer; on a real machine the variable is unset. The script:

1. writes ``$VMEXEC_ROOT/var/log/vmexec-boot.log`` (all output), and on any failure
   ``$VMEXEC_ROOT/var/lib/vmexec/failed`` with the reason;
2. starts a dead-man loop first (so that even a hung boot ends): it powers the machine
   off (``${VMEXEC_POWEROFF:-shutdown -h now}``; the instance then terminates) when
   nothing was *heard from a client* for the grace period, and after ``max_lifetime``
   (``DEFAULT_MAX_LIFETIME``, 12 hours, unless told otherwise). "Heard" is the newest
   of: the boot (``var/lib/vmexec/heartbeat``), a client session setting the machine
   up (``opt/vmexec/client/active``) and a frame arriving at the agent
   (``opt/vmexec/client/heard``, touched by the agent on receipt only). A running
   agent alone is not liveness: an agent blocked writing to a client that stopped
   reading (a suspended laptop) must not keep the machine on (issue 12). The loop and
   the notice poller run as root from ``usr/local/lib/vmexec/`` (``SCRIPTS_DIR``),
   which the login user — and so task code — cannot write;
3. installs the host key in ``$VMEXEC_ROOT/etc/ssh/`` and the client's public key in the
   login user's ``authorized_keys``, then restarts sshd
   (``${VMEXEC_SSHD_RELOAD:-systemctl restart sshd}``);
4. finds ``python3.X`` of the client's minor version (else installs it with dnf or apt,
   else ``uv python install``), creates ``$VMEXEC_ROOT/opt/vmexec/venv`` and installs
   vmexec (wheel URLs from the spec, else ``vmexec==<version>``), cloudpickle, psutil and
   the user's ``packages`` — from ``index_url`` / ``find_links`` when given (mirrors,
   offline installs);
5. touches ``$VMEXEC_ROOT/var/lib/vmexec/ready``.

No AWS credential ever appears in the script: it is built only from the spec's fields
(keys generated here, package names, URLs), never from the boto3 session.

Imports ``cryptography`` for key generation (not paramiko, which only
``vmexec.transports.ssh`` imports); no boto3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import sys
import tempfile
from importlib import resources
from typing import Mapping, Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vmexec._version import __version__
from vmexec.errors import ConfigError

__all__ = [
    "USERDATA_LIMIT",
    "NOTICE_FILE",
    "HEARD_FILE",
    "SCRIPTS_DIR",
    "DEFAULT_MAX_LIFETIME",
    "BootSpec",
    "FleetKeys",
    "named_fleet_directory",
    "render_userdata",
    "script_text",
    "agent_command",
    "keep_active_command",
    "probe_command",
    "READY",
    "FAILED",
    "WAITING",
]

#: EC2 refuses user-data larger than this (before base64).
USERDATA_LIMIT = 16 * 1024

#: First line the probe prints: the boot finished, failed, or is still running.
READY, FAILED, WAITING = "VMEXEC-READY", "VMEXEC-FAILED", "VMEXEC-WAITING"

#: Where the boot script's poller writes EC2's spot interruption notice (the JSON of
#: ``/latest/meta-data/spot/instance-action``), relative to ``$VMEXEC_ROOT``; the agent
#: watches it (``EC2Provider.agent_options``).
NOTICE_FILE = "var/lib/vmexec/spot-interruption"

#: Touched by the agent (the login user) when frames from its client arrive, relative to
#: ``$VMEXEC_ROOT``; the dead-man loop reads its age.
HEARD_FILE = "opt/vmexec/client/heard"

#: Where the scripts that run as root live, relative to ``$VMEXEC_ROOT``: owned by root
#: and not writable by the login user (``opt/vmexec`` is handed to that user for the
#: environment install, so a script there could be rewritten by task code).
SCRIPTS_DIR = "usr/local/lib/vmexec"

#: Seconds after boot at which a machine powers itself off whatever happens, unless the
#: fleet sets ``max_lifetime``: a forgotten fleet costs at most this much.
DEFAULT_MAX_LIFETIME = 12 * 3600

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOGIN_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _openssh_public(key: Ed25519PrivateKey, comment: str) -> str:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return f"{public.decode('ascii')} {comment}"


def _openssh_private(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode("ascii")


class FleetKeys:
    """The fleet's keys on disk, in a private directory (mode 0700).

    An unnamed fleet's keys are ephemeral: a new temporary directory, removed by
    ``remove()`` at teardown. A named fleet keeps its keys in ``directory`` (see
    ``named_fleet_directory``) so that a later run can log in to the machines it left
    warm; they are loaded from there when present, else generated and written there.

    Attributes:
        directory: where the keys are.
        client_key: path of the client's private key (0600), for ``open_ssh_transport``.
        client_public: the client's public key line (goes to authorized_keys).
        host_private: the machines' host private key (OpenSSH format, goes in user-data).
        host_public: the machines' host public key line.
        known_hosts: path of the known_hosts file pinning ``host_public`` for every
            address (this file is used for this fleet's connections only).
        persistent: whether the keys outlive this run (a named fleet's).
    """

    def __init__(self, fleet_id: str, directory: Optional[str] = None) -> None:
        self.persistent = directory is not None
        if directory is None:
            self.directory = tempfile.mkdtemp(prefix=f"vmexec-{fleet_id}-")
        else:
            self.directory = directory
            os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.client_key = os.path.join(self.directory, "client_ed25519")
        self.known_hosts = os.path.join(self.directory, "known_hosts")
        host_file = os.path.join(self.directory, "host_ed25519")
        if self.persistent and os.path.exists(self.client_key) and os.path.exists(host_file):
            client = _load_private(self.client_key)
            host = _load_private(host_file)
        else:
            client = Ed25519PrivateKey.generate()
            host = Ed25519PrivateKey.generate()
            _write_private(self.client_key, client)
            if self.persistent:
                _write_private(host_file, host)
        self.client_public = _openssh_public(client, f"vmexec-{fleet_id}-client")
        self.host_private = _openssh_private(host)
        self.host_public = _openssh_public(host, f"vmexec-{fleet_id}-host")
        with open(self.client_key + ".pub", "w", encoding="ascii") as f:
            f.write(self.client_public + "\n")
        key_type, key_data = self.host_public.split()[:2]
        with open(self.known_hosts, "w", encoding="ascii") as f:
            # Any address: machines get addresses only at launch, and this file serves
            # this fleet's machines alone.
            f.write(f"* {key_type} {key_data}\n")

    def remove(self) -> None:
        """Delete ephemeral keys from disk (idempotent); a named fleet's stay."""
        if not self.persistent:
            shutil.rmtree(self.directory, ignore_errors=True)

    def destroy(self) -> None:
        """Delete the keys whatever the fleet (its machines are all gone)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def named_fleet_directory(fleet_id: str) -> str:
    """Where a named fleet's keys live between runs: ``$VMEXEC_FLEETS_DIR/<fleet id>``,
    by default ``$XDG_CACHE_HOME/vmexec/fleets/<fleet id>`` (``~/.cache`` without XDG)."""
    base = os.environ.get("VMEXEC_FLEETS_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        base = os.path.join(cache, "vmexec", "fleets")
    return os.path.join(base, fleet_id)


def _write_private(path: str, key: Ed25519PrivateKey) -> None:
    # Replace, never follow or reuse a file someone else may have created there.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(_openssh_private(key))


def _load_private(path: str) -> Ed25519PrivateKey:
    if os.stat(path).st_mode & 0o077:
        raise ConfigError(f"{path} is readable by other users: a named fleet's keys must be "
                          f"private (chmod 600 {path}), or delete the folder to start afresh")
    with open(path, "rb") as f:
        key = serialization.load_ssh_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an ed25519 key: delete {os.path.dirname(path)} "
                          "to start the named fleet afresh")
    return key


@dataclasses.dataclass(frozen=True)
class BootSpec:
    """Everything the boot script needs; nothing else goes into user-data.

    Attributes:
        fleet_id: the fleet, for log lines.
        client_public_key: OpenSSH public key line allowed to log in.
        host_private_key: OpenSSH private host key (ed25519) for sshd.
        host_public_key: its public line.
        login_user: the account that gets the key (``ec2-user`` on Amazon Linux).
        python: the client's ``major.minor``, e.g. ``"3.11"``.
        vmexec_version: installed as ``vmexec==<version>`` when no wheel URL is given.
        wheel_urls: wheels to install (vmexec built from the client's copy, ...).
        packages: extra pip requirements.
        index_url: a package index (mirror) instead of PyPI.
        find_links: wheel folders/URLs; without ``index_url`` the install is offline
            (``--no-index``).
        heartbeat_grace: seconds without an agent, before the first agent ran (boot and
            install), after which the machine powers off.
        agent_grace: seconds without an agent *after* one ran (its client is gone: it
            was killed, or lost its network) after which the machine powers off.
        max_lifetime: seconds after boot at which it powers off anyway
            (``DEFAULT_MAX_LIFETIME`` unless given; 0: never, which nothing in vmexec
            passes).
        env: extra ``export`` lines at the top (the harness's settings, mirrors' tokens
            are NOT meant for this: user-data is readable on the machine).
        environment_script: bash from ``vmexec.environment`` (``install_script`` or
            ``bootstrap_script``) that replaces step 4's pip install: a uv venv with the
            client's environment; ``wheel_urls``/``packages`` are then unused.
    """

    fleet_id: str
    client_public_key: str
    host_private_key: str
    host_public_key: str
    login_user: str = "ec2-user"
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    vmexec_version: str = __version__
    wheel_urls: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    index_url: Optional[str] = None
    find_links: tuple[str, ...] = ()
    heartbeat_grace: int = 1800
    agent_grace: int = 300
    max_lifetime: int = DEFAULT_MAX_LIFETIME
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    environment_script: str = ""

    def __post_init__(self) -> None:
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ConfigError(f"boot_env: {name!r} is not a valid environment variable "
                                  "name ([A-Za-z_][A-Za-z0-9_]*)")
        if not _LOGIN_USER.match(self.login_user):
            raise ConfigError(f"ssh_user: {self.login_user!r} is not a valid user name")
        if not re.match(r"^\d+\.\d+$", self.python):
            raise ConfigError(f"python version must look like '3.11', not {self.python!r}")


def _q(value: str) -> str:
    return shlex.quote(value)


def _words(values: Sequence[str]) -> str:
    return " ".join(_q(v) for v in values)


def script_text(name: str) -> str:
    """The text of ``scripts/<name>`` (package data next to this module)."""
    return resources.files(__package__).joinpath("scripts", name).read_text("utf-8")


def _compact(text: str) -> str:
    """``text`` without its shebang, comment-only and blank lines: user-data is limited
    to 16 KB, and the comments are for readers of the files, not for the machine.
    (The scripts have no multi-line strings or here-documents, where this would cut.)"""
    return "\n".join(line for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")) + "\n"


# The scripts boot.sh writes onto the machine (into SCRIPTS_DIR), carried inside the
# user-data: EC2 passes one script, and the machine must not fetch pieces from anywhere.
_EMBEDDED = ("deadman.sh", "notice.sh")
_EMBED_END = "VMEXEC_SCRIPT_END"


def _function(name: str, body: str, comment: str) -> str:
    return f"{name}() {{  # {comment}\n{body.rstrip()}\n}}"


def _embedded_scripts() -> str:
    """``embedded_script NAME``: prints the package's ``scripts/NAME`` (quoted here-docs,
    so the shell expands nothing in them)."""
    cases = []
    for name in _EMBEDDED:
        text = "#!/bin/bash\n" + _compact(script_text(name))
        if f"\n{_EMBED_END}\n" in f"\n{text}":
            raise AssertionError(f"scripts/{name} contains the line {_EMBED_END}")
        cases.append(f"    {name}) cat <<'{_EMBED_END}'\n{text.rstrip()}\n{_EMBED_END}\n      ;;")
    body = '  case "$1" in\n' + "\n".join(cases) + '\n    *) return 1;;\n  esac'
    return _function("embedded_script", body, "scripts/$1 of vmexec.providers.ec2")


def render_userdata(spec: BootSpec) -> str:
    """The boot script for ``spec`` (see the module docstring for what it does).

    ``scripts/boot.sh`` under a generated header: the ``boot_env`` exports, the spec's
    values as shell variables (quoted), ``embedded_script`` (the scripts boot.sh
    installs) and, with ``environment_script``, ``install_environment``. The scripts
    themselves are files of this package, checked by shellcheck; no value is formatted
    into their text.

    Args:
        spec: what to install; its fields are shell-quoted into the header.

    Returns:
        The script text (bash), smaller than ``USERDATA_LIMIT``.

    Raises:
        ConfigError: the script would exceed 16 KB (too many packages or URLs).
    """
    exports = "\n".join(f"export {name}={_q(value)}" for name, value in spec.env.items())
    pip_options: list[str] = []
    if spec.index_url:
        pip_options += ["--index-url", spec.index_url]
    elif spec.find_links:
        pip_options.append("--no-index")  # find_links alone: an offline install
    for link in spec.find_links:
        pip_options += ["--find-links", link]
    vmexec_requirement = list(spec.wheel_urls) or [f"vmexec=={spec.vmexec_version}"]
    requirements = [*vmexec_requirement, "cloudpickle", "psutil", *spec.packages]
    values = {
        "FLEET_ID": _q(spec.fleet_id),
        "LOGIN_USER": _q(spec.login_user),
        "PYTHON_VERSION": _q(spec.python),
        "HOST_PRIVATE_KEY": _q(spec.host_private_key.strip()),
        "HOST_PUBLIC_KEY": _q(spec.host_public_key.strip()),
        "CLIENT_PUBLIC_KEY": _q(spec.client_public_key.strip()),
        "HEARTBEAT_GRACE": str(int(spec.heartbeat_grace)),
        "AGENT_GRACE": str(int(spec.agent_grace)),
        "MAX_LIFETIME": str(int(spec.max_lifetime)),
        "SCRIPTS_DIR": _q(SCRIPTS_DIR),
        "NOTICE_FILE": _q(NOTICE_FILE),
        "HEARD_FILE": _q(HEARD_FILE),
        "PIP_OPTIONS": f"({_words(pip_options)})",
        "REQUIREMENTS": f"({_words(requirements)})",
    }
    parts = [
        "#!/bin/bash",
        f"# vmexec boot script for fleet {spec.fleet_id}: values from vmexec, then "
        "vmexec/providers/ec2/scripts/boot.sh.",
        exports or "# (no boot_env)",
        *(f"{name}={value}" for name, value in values.items()),
        _embedded_scripts(),
    ]
    if spec.environment_script.strip():
        # vmexec.environment's step (e.g. scripts/prepare-ssh-install.sh), which
        # replaces boot.sh's pip install.
        parts.append(_function("install_environment", spec.environment_script,
                               "step 4, from vmexec.environment"))
    script = "\n".join(parts) + "\n" + _compact(script_text("boot.sh"))
    size = len(script.encode("utf-8"))
    if size >= USERDATA_LIMIT:
        raise ConfigError(
            f"the boot script is {size} bytes, over EC2's 16 KB user-data limit: pass fewer "
            "packages= (e.g. one requirements file served by index_url=/find_links=) or "
            "shorter boot_env=")
    return script


_ROOT = "${VMEXEC_ROOT:-}"
_HEARD_ENV = "VMEXEC_CLIENT_HEARD"  # vmexec.agent.main.HEARD_FILE_ENV (a leaf: not imported)


def agent_command(root: str = _ROOT, agent_grace: Optional[int] = None,
                  note_start: bool = False) -> str:
    """The remote command that starts the agent from the machine's environment.

    Args:
        root: where the boot script put everything; by default the remote shell expands
            ``$VMEXEC_ROOT`` (unset on a real machine, set by a harness's sshd).
        agent_grace: tell the machine's dead-man switch to power off this many seconds
            after the agent ends (a named fleet's keepalive: a reused machine was booted
            by an earlier client with that client's setting).
        note_start: tell the dead-man switch that an agent starts (it also watches the
            process list, but may miss an agent that lives less than its interval).
    """
    agent = f"{root}/opt/vmexec/venv/bin/python -m vmexec.agent"
    # The agent touches this file when client frames arrive: the dead-man's liveness.
    notes = [f"{_HEARD_ENV}=\"{root}/{HEARD_FILE}\"; export {_HEARD_ENV}"]
    if note_start:  # first: the new grace must not apply to the time before this start
        notes.append(f"touch \"{root}/opt/vmexec/client/agent-started\" "
                     f"\"{root}/opt/vmexec/client/active\" 2>/dev/null")
    if agent_grace is not None:
        notes.append(f"printf '%s\\n' {int(agent_grace)} >\"{root}/opt/vmexec/client/"
                     "agent-grace\" 2>/dev/null")
    return "; ".join([*notes, f"exec {agent}"])


def keep_active_command(command: str, root: str = _ROOT, every: int = 5) -> str:
    """``command`` (sh), with the dead-man switch told that a client is active meanwhile.

    A machine being set up for a client (an install over SSH that takes minutes) runs no
    agent; without this, a machine reused near the end of its keepalive could power off
    under it. The toucher stops within ``every`` seconds of the session's shell: a lost
    connection cannot keep the machine alive.
    """
    active = f"{root}/opt/vmexec/client/active"
    return (f"(while kill -0 $$ 2>/dev/null && touch \"{active}\" 2>/dev/null; "
            f"do sleep {int(every)}; done) >/dev/null 2>&1 & vx_active=$!; "
            f"{command}; vx_status=$?; kill $vx_active 2>/dev/null; exit $vx_status")


def probe_command(wait_seconds: int, tail_bytes: int = 4000, root: str = _ROOT) -> str:
    """A remote command that reports the boot's outcome, waiting up to ``wait_seconds``.

    ``scripts/probe.sh`` under ``sh -c`` (any POSIX login shell): it prints ``READY``
    and the machine's ``$VMEXEC_ROOT`` (empty on a real machine); or ``FAILED``
    followed by the reason and the end of the boot log; or, if the boot is still running
    when the wait ends, ``WAITING`` and the end of the log. The client reads the first
    line.
    """
    where = f'"{_ROOT}"' if root == _ROOT else _q(root)  # expanded by the login shell
    return (f"sh -c {_q(_compact(script_text('probe.sh')))} vmexec-probe "
            f"{int(wait_seconds)} {int(tail_bytes)} {where}")
