#!/bin/bash
# vmexec boot script: what every machine of a fleet runs first (EC2 user-data).
#
# vmexec sends this file with a generated header above it (userdata.render_userdata):
# boot_env exports, then these values, shell-quoted —
#   FLEET_ID, LOGIN_USER, PYTHON_VERSION (the client's major.minor),
#   HOST_PRIVATE_KEY, HOST_PUBLIC_KEY, CLIENT_PUBLIC_KEY (the fleet's pinned keys),
#   HEARTBEAT_GRACE, AGENT_GRACE, MAX_LIFETIME (seconds, for deadman.sh),
#   SCRIPTS_DIR, NOTICE_FILE, HEARD_FILE (paths relative to $VMEXEC_ROOT),
#   PIP_OPTIONS, REQUIREMENTS (arrays: step 4 without environment sync) —
# and two functions: embedded_script NAME (prints scripts/NAME: deadman.sh, notice.sh)
# and, with environment sync, install_environment (step 4 instead of pip).
# Every path is under ${VMEXEC_ROOT:-} so that a harness can run it in a directory.
set -u
umask 022
R="${VMEXEC_ROOT:-}"
STATE="$R/var/lib/vmexec"
LOG="$R/var/log/vmexec-boot.log"
VENV="$R/opt/vmexec/venv"
BIN="$R/$SCRIPTS_DIR"
mkdir -p "$STATE" "$R/var/log" "$R/etc/ssh" "$R/opt/vmexec" "$BIN"
# Root's scripts: in a directory only root can write (task code runs as the login user).
chmod 755 "$BIN"
rm -f "$STATE/ready" "$STATE/failed"
exec >>"$LOG" 2>&1
step() { echo "[vmexec-boot $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }
fail() { step "FAILED: $*"; printf '%s\n' "$*" >"$STATE/failed"; exit 1; }
step "fleet $FLEET_ID: boot script started (VMEXEC_ROOT='$R')"
date +%s >"$STATE/boot-time"
touch "$STATE/heartbeat"

# 1. Dead-man: power off when nothing was heard from a client for HEARTBEAT_GRACE
#    seconds (AGENT_GRACE once an agent has run), or after MAX_LIFETIME.
rm -f "$BIN/deadman.sh"
embedded_script deadman.sh >"$BIN/deadman.sh" || fail "cannot write $BIN/deadman.sh"
chmod 755 "$BIN/deadman.sh"
step "dead-man switch: off after ${MAX_LIFETIME}s (max_lifetime), or when no client is heard"
DEADMAN=("$BIN/deadman.sh" "$HEARTBEAT_GRACE" "$MAX_LIFETIME" "$AGENT_GRACE" "$HEARD_FILE")
if [ -z "$R" ] && command -v systemd-run >/dev/null 2>&1; then
  systemd-run --unit=vmexec-deadman --property=Restart=always "${DEADMAN[@]}" \
    || fail "cannot start the dead-man timer (systemd-run)"
else
  nohup "${DEADMAN[@]}" >/dev/null 2>&1 &
fi

# 1b. Spot interruption notices: EC2 announces a reclaim two minutes ahead in the
# instance metadata (IMDSv2); the agent reads the file this loop writes. A harness
# (VMEXEC_ROOT set) writes the file itself unless it names a metadata URL.
IMDS="${VMEXEC_IMDS_URL:-}"
if [ -z "$IMDS" ] && [ -z "$R" ]; then IMDS="http://169.254.169.254"; fi
if [ -n "$IMDS" ] && [ "$IMDS" != none ] && command -v curl >/dev/null 2>&1; then
  rm -f "$BIN/notice.sh"
  embedded_script notice.sh >"$BIN/notice.sh" || fail "cannot write $BIN/notice.sh"
  chmod 755 "$BIN/notice.sh"
  nohup "$BIN/notice.sh" "$IMDS" "$R/$NOTICE_FILE" >/dev/null 2>&1 &
fi

# 2. SSH: the client's pinned host key and its login key.
step "installing the fleet's SSH host key and client key"
KEY="$R/etc/ssh/ssh_host_ed25519_key"
(umask 077 && printf '%s\n' "$HOST_PRIVATE_KEY" >"$KEY") || fail "cannot write $KEY"
printf '%s\n' "$HOST_PUBLIC_KEY" >"$KEY.pub"
chmod 600 "$KEY"
USER_NAME="$LOGIN_USER"
HOME_DIR="${VMEXEC_HOME:-$R/home/$USER_NAME}"
{ mkdir -p "$HOME_DIR/.ssh" && chmod 700 "$HOME_DIR/.ssh"; } || fail "cannot create $HOME_DIR/.ssh"
printf '%s\n' "$CLIENT_PUBLIC_KEY" >>"$HOME_DIR/.ssh/authorized_keys" \
  || fail "cannot write $HOME_DIR/.ssh/authorized_keys"
chmod 600 "$HOME_DIR/.ssh/authorized_keys"
if [ "$(id -u)" = 0 ] && id "$USER_NAME" >/dev/null 2>&1; then
  chown -R "$USER_NAME" "$HOME_DIR/.ssh"
fi
# Written by the client's sessions as they start agents (agent_command).
mkdir -p "$R/opt/vmexec/client" || fail "cannot create $R/opt/vmexec/client"
if [ "$(id -u)" = 0 ]; then chown "$USER_NAME" "$R/opt/vmexec/client" 2>/dev/null; fi
if [ -n "${VMEXEC_SSHD_RELOAD:-}" ]; then
  eval "$VMEXEC_SSHD_RELOAD" || fail "sshd reload failed: $VMEXEC_SSHD_RELOAD"
else
  systemctl restart sshd || systemctl restart ssh || fail "cannot restart sshd"
fi

# 3. Python $PYTHON_VERSION, as on the client (pickled code does not cross minor versions).
V="$PYTHON_VERSION"
PY=""
if command -v "python$V" >/dev/null 2>&1; then PY=$(command -v "python$V"); fi
if [ -z "$PY" ] && command -v dnf >/dev/null 2>&1; then
  step "installing python$V with dnf"
  dnf install -y "python$V" "python$V-pip" && PY=$(command -v "python$V")
fi
if [ -z "$PY" ] && command -v apt-get >/dev/null 2>&1; then
  step "installing python$V with apt-get"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
    "python$V" "python$V-venv" && PY=$(command -v "python$V")
fi
# Only a uv the image already has: nothing unpinned or unchecked is downloaded and run
# as root here (no download piped into a shell).
if [ -z "$PY" ] && command -v uv >/dev/null 2>&1; then
  step "installing Python $V with the image's uv"
  uv python install "$V" && PY=$(uv python find "$V")
fi
[ -n "$PY" ] || fail "no Python $V (tried python$V, dnf, apt-get, the image's uv): use an image that has it (ami=)"
step "using $PY ($($PY --version 2>&1))"

# 4. The environment: vmexec.environment's step when the fleet syncs one, else the
#    image's Python with pip (environment=None).
if declare -F install_environment >/dev/null; then
  step "installing the environment"
  install_environment
else
  "$PY" -m venv "$VENV" || fail "cannot create the virtual environment $VENV with $PY"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
  step "installing vmexec and packages"
  # ${a[@]+...}: an empty array is "unbound" to bash before 4.4 under set -u.
  "${PIP[@]}" install ${PIP_OPTIONS[@]+"${PIP_OPTIONS[@]}"} "${REQUIREMENTS[@]}" \
    || fail "pip install failed (see $LOG): check index_url=/find_links= and packages="
  "$VENV/bin/python" -c "import vmexec.agent, cloudpickle, psutil" \
    || fail "the installed environment cannot import vmexec.agent"
fi

touch "$STATE/heartbeat" "$STATE/ready"
step "ready in $(( $(date +%s) - $(cat "$STATE/boot-time") ))s"
