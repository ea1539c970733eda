# shellcheck shell=bash
# The environment's bootstrap, for user-data: fetch the staged install script, check its
# sha256, run it in this shell (so the boot script's `fail` and $PY still apply).
# install.py's bootstrap_script() sends a header (vx_boot_name, vx_boot_url,
# vx_boot_sha256: shell-quoted), vx-get.sh, then this file.
# shellcheck disable=SC2154  # vx_boot_* come from the generated header
vx_boot="${VMEXEC_ROOT:-}/opt/vmexec/artifacts"
vx_boot_die() { if declare -F fail >/dev/null; then fail "$*"; fi; echo "$*" >&2; exit 1; }
mkdir -p "$vx_boot" || vx_boot_die "cannot create $vx_boot"
vx_get "$vx_boot_url" "$vx_boot/$vx_boot_name" \
  || vx_boot_die "cannot download the environment's install script (staged in S3)"
[ "$(sha256sum "$vx_boot/$vx_boot_name" | cut -d' ' -f1)" = "$vx_boot_sha256" ] \
  || vx_boot_die "the environment's install script is corrupted (sha256 mismatch)"
# shellcheck disable=SC1090  # the script just fetched
. "$vx_boot/$vx_boot_name"
