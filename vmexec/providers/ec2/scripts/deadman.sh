#!/bin/bash
# vmexec dead-man switch: powers the machine off when nothing was heard from a client
# for GRACE seconds (AFTER seconds once an agent has run), or MAXLIFE seconds after boot.
#
# Usage: deadman.sh GRACE MAXLIFE AFTER HEARD_FILE
#   HEARD_FILE is relative to $VMEXEC_ROOT (touched by the agent when frames arrive).
# Written by boot.sh into a directory only root can write, and run as root for the
# machine's whole life (systemd-run --property=Restart=always on a real machine).
# Environment: VMEXEC_ROOT, VMEXEC_DEADMAN_INTERVAL (seconds between checks, default 30),
# VMEXEC_DEADMAN_AFTER_AGENT (overrides AFTER), VMEXEC_POWEROFF (the power-off command).
R="${VMEXEC_ROOT:-}"; STATE="$R/var/lib/vmexec"; LOG="$R/var/log/vmexec-boot.log"
GRACE="$1"; MAXLIFE="$2"; INTERVAL="${VMEXEC_DEADMAN_INTERVAL:-30}"
AFTER="${VMEXEC_DEADMAN_AFTER_AGENT:-$3}"; HEARD="$R/$4"; seen_agent=0
# The agent's command line, in a file: as a grep argument it would match grep itself.
printf '%s\n' "$R/opt/vmexec/venv/bin/python -m vmexec.agent" >"$STATE/agent-pattern"
echo $$ >"$STATE/deadman.pid"  # a harness stops the loop by this pid
start=$(cat "$STATE/boot-time" 2>/dev/null || date +%s)
agent_running() {
  if command -v pgrep >/dev/null 2>&1; then  # one process, not two per /proc entry
    pgrep -f -- "$(cat "$STATE/agent-pattern")" >/dev/null
    return
  fi
  for f in /proc/[0-9]*/cmdline; do
    tr '\0' ' ' <"$f" 2>/dev/null | grep -qF -f "$STATE/agent-pattern" && return 0
  done
  return 1
}
while true; do
  now=$(date +%s)
  if [ "$MAXLIFE" -gt 0 ] && [ $((now - start)) -ge "$MAXLIFE" ]; then
    why="max_lifetime of ${MAXLIFE}s reached"; break
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
  heard=$(stat -c %Y "$HEARD" 2>/dev/null || echo 0)
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
    why="nothing heard from a client for ${limit}s"; break
  fi
  sleep "$INTERVAL"
done
echo "[vmexec-deadman $(date -u +%Y-%m-%dT%H:%M:%SZ)] powering off: $why" >>"$LOG"
printf '%s\n' "$why" >"$STATE/poweroff"
eval "${VMEXEC_POWEROFF:-shutdown -h now}"
