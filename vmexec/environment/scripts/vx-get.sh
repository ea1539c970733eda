# shellcheck shell=bash
# vx_get URL FILE: download without the URL on any command line (`ps` shows every
# process's arguments to every user): it reaches curl (`-K -`) or Python on stdin.
# Part of the environment's install script and of its bootstrap (vmexec/environment/install.py).
vx_get() {  # url file
  if command -v curl >/dev/null 2>&1; then
    printf 'url = "%s"\n' "$1" | curl -fsS --retry 5 --retry-delay 1 --connect-timeout 20 -o "$2" -K -
  else
    printf '%s' "$1" | python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.stdin.read(), sys.argv[1])' "$2"
  fi
}
