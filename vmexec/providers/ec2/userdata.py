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
* ``render_userdata(spec)`` — the bash script (< 16 KB, the EC2 limit).
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


# The static part of the script. {placeholders} are filled by render_userdata with
# shell-quoted values; literal braces are doubled.
_SCRIPT = r"""#!/bin/bash
# vmexec boot script for fleet {fleet} (generated by vmexec/providers/ec2/userdata.py).
{exports}
set -u
umask 022
R="${{VMEXEC_ROOT:-}}"
STATE="$R/var/lib/vmexec"
LOG="$R/var/log/vmexec-boot.log"
VENV="$R/opt/vmexec/venv"
BIN="$R/{scripts_dir}"
mkdir -p "$STATE" "$R/var/log" "$R/etc/ssh" "$R/opt/vmexec" "$BIN"
# Root's scripts: in a directory only root can write (task code runs as the login user).
chmod 755 "$BIN"
rm -f "$STATE/ready" "$STATE/failed"
exec >>"$LOG" 2>&1
step() {{ echo "[vmexec-boot $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }}
fail() {{ step "FAILED: $*"; printf '%s\n' "$*" >"$STATE/failed"; exit 1; }}
step "fleet {fleet}: boot script started (VMEXEC_ROOT='$R')"
date +%s >"$STATE/boot-time"
touch "$STATE/heartbeat"

# 1. Dead-man: power off when nothing was heard from a client for GRACE seconds (AFTER
#    seconds once an agent has run), or after MAXLIFE.
rm -f "$BIN/deadman.sh"
cat >"$BIN/deadman.sh" <<'DEADMAN'
#!/bin/bash
R="${{VMEXEC_ROOT:-}}"; STATE="$R/var/lib/vmexec"; LOG="$R/var/log/vmexec-boot.log"
GRACE={grace}; MAXLIFE={max_lifetime}; INTERVAL="${{VMEXEC_DEADMAN_INTERVAL:-30}}"
AFTER="${{VMEXEC_DEADMAN_AFTER_AGENT:-{agent_grace}}}"; seen_agent=0
# The agent's command line, in a file: as a grep argument it would match grep itself.
printf '%s\n' "$R/opt/vmexec/venv/bin/python -m vmexec.agent" >"$STATE/agent-pattern"
echo $$ >"$STATE/deadman.pid"  # a harness stops the loop by this pid
start=$(cat "$STATE/boot-time" 2>/dev/null || date +%s)
agent_running() {{
  if command -v pgrep >/dev/null 2>&1; then  # one process, not two per /proc entry
    pgrep -f -- "$(cat "$STATE/agent-pattern")" >/dev/null
    return
  fi
  for f in /proc/[0-9]*/cmdline; do
    tr '\0' ' ' <"$f" 2>/dev/null | grep -qF -f "$STATE/agent-pattern" && return 0
  done
  return 1
}}
while true; do
  now=$(date +%s)
  if [ "$MAXLIFE" -gt 0 ] && [ $((now - start)) -ge "$MAXLIFE" ]; then
    why="max_lifetime of ${{MAXLIFE}}s reached"; break
  fi
  # A running agent only tells which grace applies; it is not liveness: an agent
  # blocked writing to a suspended client runs on. Liveness is a frame *received*.
  running=0
  if agent_running; then
    running=1
    if [ "$seen_agent" = 0 ]; then seen_agent=1; touch "$STATE/agent-seen"; fi
  fi
  last=$(stat -c %Y "$STATE/heartbeat" 2>/dev/null || echo "$start")
  # The client notes each agent it starts (one too short-lived for this loop to see
  # still counts), and keeps "active" fresh while it probes, installs and starts one
  # (a reused machine must not power off under a client that is setting it up).
  [ -e "$R/opt/vmexec/client/agent-started" ] && seen_agent=1
  active=$(stat -c %Y "$R/opt/vmexec/client/active" 2>/dev/null || echo 0)
  [ "$active" -gt "$last" ] && last="$active"
  # The agent touches "heard" when frames arrive from its client (never by itself).
  heard=$(stat -c %Y "$R/{heard_file}" 2>/dev/null || echo 0)
  [ "$heard" -gt "$last" ] && last="$heard"
  limit="$GRACE"
  if [ "$seen_agent" = 1 ]; then
    limit="$AFTER"
    # A named fleet's later client sets its own keepalive for the machines it reuses.
    g=$(cat "$R/opt/vmexec/client/agent-grace" 2>/dev/null)
    case "$g" in ''|*[!0-9]*) ;; *) limit="$g";; esac
  fi
  if [ "$running" = 1 ]; then
    # While an agent runs, its idle client may be quiet this long (the agent says so).
    q=$(cat "$R/opt/vmexec/client/silence" 2>/dev/null)
    case "$q" in ''|*[!0-9]*) ;; *) [ "$q" -gt "$limit" ] && limit="$q";; esac
  fi
  if [ $((now - last)) -gt "$limit" ]; then
    why="nothing heard from a client for ${{limit}}s"; break
  fi
  sleep "$INTERVAL"
done
echo "[vmexec-deadman $(date -u +%Y-%m-%dT%H:%M:%SZ)] powering off: $why" >>"$LOG"
printf '%s\n' "$why" >"$STATE/poweroff"
eval "${{VMEXEC_POWEROFF:-shutdown -h now}}"
DEADMAN
chmod 755 "$BIN/deadman.sh"
step "dead-man switch: off after {max_lifetime}s (max_lifetime), or when no client is heard"
if [ -z "$R" ] && command -v systemd-run >/dev/null 2>&1; then
  systemd-run --unit=vmexec-deadman --property=Restart=always "$BIN/deadman.sh" \
    || fail "cannot start the dead-man timer (systemd-run)"
else
  nohup "$BIN/deadman.sh" >/dev/null 2>&1 &
fi

# 1b. Spot interruption notices: EC2 announces a reclaim two minutes ahead in the
# instance metadata (IMDSv2); the agent reads the file this loop writes. A harness
# (VMEXEC_ROOT set) writes the file itself unless it names a metadata URL.
IMDS="${{VMEXEC_IMDS_URL:-}}"
if [ -z "$IMDS" ] && [ -z "$R" ]; then IMDS="http://169.254.169.254"; fi
if [ -n "$IMDS" ] && [ "$IMDS" != none ] && command -v curl >/dev/null 2>&1; then
  rm -f "$BIN/notice.sh"
  cat >"$BIN/notice.sh" <<'NOTICE'
#!/bin/bash
IMDS="$1"; OUT="$2"
while [ ! -e "$OUT" ]; do
  token=$(curl -s -f -m 2 --noproxy '*' -X PUT "$IMDS/latest/api/token" \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
  if body=$(curl -s -f -m 2 --noproxy '*' -H "X-aws-ec2-metadata-token: $token" \
      "$IMDS/latest/meta-data/spot/instance-action"); then
    printf '%s\n' "$body" >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
  fi
  sleep 5
done
NOTICE
  chmod 755 "$BIN/notice.sh"
  nohup "$BIN/notice.sh" "$IMDS" "$R/{notice_file}" >/dev/null 2>&1 &
fi

# 2. SSH: the client's pinned host key and its login key.
step "installing the fleet's SSH host key and client key"
KEY="$R/etc/ssh/ssh_host_ed25519_key"
(umask 077 && printf '%s\n' {host_private} >"$KEY") || fail "cannot write $KEY"
printf '%s\n' {host_public} >"$KEY.pub"
chmod 600 "$KEY"
USER_NAME={login_user}
HOME_DIR="${{VMEXEC_HOME:-$R/home/$USER_NAME}}"
mkdir -p "$HOME_DIR/.ssh" && chmod 700 "$HOME_DIR/.ssh" || fail "cannot create $HOME_DIR/.ssh"
printf '%s\n' {client_public} >>"$HOME_DIR/.ssh/authorized_keys" \
  || fail "cannot write $HOME_DIR/.ssh/authorized_keys"
chmod 600 "$HOME_DIR/.ssh/authorized_keys"
if [ "$(id -u)" = 0 ] && id "$USER_NAME" >/dev/null 2>&1; then
  chown -R "$USER_NAME" "$HOME_DIR/.ssh"
fi
# Written by the client's sessions as they start agents (agent_command).
mkdir -p "$R/opt/vmexec/client" || fail "cannot create $R/opt/vmexec/client"
if [ "$(id -u)" = 0 ]; then chown "$USER_NAME" "$R/opt/vmexec/client" 2>/dev/null; fi
if [ -n "${{VMEXEC_SSHD_RELOAD:-}}" ]; then
  eval "$VMEXEC_SSHD_RELOAD" || fail "sshd reload failed: $VMEXEC_SSHD_RELOAD"
else
  systemctl restart sshd || systemctl restart ssh || fail "cannot restart sshd"
fi

# 3. Python {python}, as on the client (pickled code does not cross minor versions).
PY=""
if command -v python{python} >/dev/null 2>&1; then PY=$(command -v python{python}); fi
if [ -z "$PY" ] && command -v dnf >/dev/null 2>&1; then
  step "installing python{python} with dnf"
  dnf install -y python{python} python{python}-pip && PY=$(command -v python{python})
fi
if [ -z "$PY" ] && command -v apt-get >/dev/null 2>&1; then
  step "installing python{python} with apt-get"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
    python{python} python{python}-venv && PY=$(command -v python{python})
fi
# Only a uv the image already has: nothing unpinned or unchecked is downloaded and run
# as root here (no download piped into a shell).
if [ -z "$PY" ] && command -v uv >/dev/null 2>&1; then
  step "installing Python {python} with the image's uv"
  uv python install {python} && PY=$(uv python find {python})
fi
[ -n "$PY" ] || fail "no Python {python} (tried python{python}, dnf, apt-get, the image's uv): use an image that has it (ami=)"
step "using $PY ($($PY --version 2>&1))"

# 4. The environment.
{environment_step}

touch "$STATE/heartbeat" "$STATE/ready"
step "ready in $(( $(date +%s) - $(cat "$STATE/boot-time") ))s"
"""


# Step 4 without environment sync (environment=None): the image's Python, pip.
_PIP_STEP = "\n".join([
    '"$PY" -m venv "$VENV" || fail "cannot create the virtual environment $VENV with $PY"',
    'PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)',
    'step "installing vmexec and packages"',
    '"${{PIP[@]}}" install {pip_options} {requirements} \\',
    '  || fail "pip install failed (see $LOG): check index_url=/find_links= and packages="',
    '"$VENV/bin/python" -c "import vmexec.agent, cloudpickle, psutil" \\',
    '  || fail "the installed environment cannot import vmexec.agent"',
])


def render_userdata(spec: BootSpec) -> str:
    """The boot script for ``spec`` (see the module docstring for what it does).

    Args:
        spec: what to install; its fields are shell-quoted into the script.

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
    if spec.environment_script:
        # vmexec.environment's install script (or the bootstrap that fetches it): uv,
        # the client's locked requirements and wheels, env-hash for the skew guard.
        environment_step = f'step "installing the environment"\n{spec.environment_script}'
    else:
        environment_step = _PIP_STEP.format(pip_options=_words(pip_options),
                                            requirements=_words(requirements))
    script = _SCRIPT.format(
        fleet=spec.fleet_id,
        exports=exports or "# (no boot_env)",
        grace=int(spec.heartbeat_grace),
        agent_grace=int(spec.agent_grace),
        max_lifetime=int(spec.max_lifetime),
        host_private=_q(spec.host_private_key.strip()),
        host_public=_q(spec.host_public_key.strip()),
        client_public=_q(spec.client_public_key.strip()),
        login_user=_q(spec.login_user),
        python=spec.python,
        notice_file=NOTICE_FILE,
        heard_file=HEARD_FILE,
        scripts_dir=SCRIPTS_DIR,
        pip_options=_words(pip_options),
        environment_step=environment_step,
    )
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

    It prints ``READY`` and the machine's ``$VMEXEC_ROOT`` (empty on a real machine);
    or ``FAILED`` followed by the reason and the end of the boot log; or, if the boot is
    still running when the wait ends, ``WAITING`` and the end of the log. The client
    reads the first line.
    """
    state = f"{root}/var/lib/vmexec"
    log = f"{root}/var/log/vmexec-boot.log"
    script = (
        f'touch "{root}/opt/vmexec/client/active" 2>/dev/null; '
        f'i=0; while [ "$i" -lt {int(wait_seconds)} ]; do '
        f'if [ -e "{state}/ready" ]; then echo "{READY} {root}"; exit 0; fi; '
        f'if [ -e "{state}/failed" ]; then echo {FAILED}; cat "{state}/failed"; '
        f'echo "--- end of {log}:"; tail -c {int(tail_bytes)} "{log}" 2>/dev/null; exit 0; fi; '
        f'sleep 1; i=$((i+1)); done; '
        f'echo {WAITING}; tail -c {int(tail_bytes)} "{log}" 2>/dev/null; exit 0'
    )
    # The login shell may be any sh; the probe is POSIX sh.
    return f"sh -c {_q(script)}"
