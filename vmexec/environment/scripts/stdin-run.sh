# shellcheck shell=sh
# Runs a script sent on stdin without putting it on a command line (install.stdin_command):
# reads exactly $1 bytes into a private temporary file (mode 0600, removed on exit) and
# runs it with bash. install.py sends the last line as `sh -c '<line>' sh <length>`.
vx_f=$(mktemp) || exit 1; trap 'rm -f "$vx_f"' EXIT; head -c "$1" >"$vx_f" && bash "$vx_f"
