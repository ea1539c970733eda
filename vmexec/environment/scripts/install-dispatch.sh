# shellcheck shell=bash
# The end of the environment's install script: keep, update or install, by architecture.
# Before it: install-common.sh, vx_install_<arch> / vx_update_<arch> for each prepared
# architecture, and vx_archs (their names, space-separated) from install.py.
# shellcheck disable=SC2154  # vx_archs, vx_want, vx_base, ... come from the generated header
# The tokens' first words are the content hashes (the second, the capture time, differs
# between two clients of the same environment).
vx_have=$(cat "$vx_dir/env-hash" 2>/dev/null); vx_have_base=$(cat "$vx_dir/env-base" 2>/dev/null)
if [ "${vx_have%% *}" = "${vx_want%% *}" ] && [ -x "$vx_venv/bin/python" ]; then
  vx_log "environment $vx_token_short is already installed"
elif [ -n "$vx_have_base" ] && [ "$vx_have_base" = "$vx_base" ] && [ -x "$vx_venv/bin/python" ] \
    && declare -F "vx_update_$vx_arch" >/dev/null; then
  vx_log "only the local code changed since ${vx_have%% *}: reinstalling just that"
  "vx_update_$vx_arch"
else
  case " $vx_archs " in
    *" $vx_arch "*) "vx_install_$vx_arch";;
    *) vx_die "no environment was prepared for $vx_arch machines (prepared: $vx_archs)";;
  esac
fi
