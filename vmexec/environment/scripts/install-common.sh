# shellcheck shell=bash
# The environment's install script, shared by every architecture: helpers, uv, Python.
#
# install.py's install_script() sends: a generated header of variable assignments (every
# value shell-quoted), vx-get.sh, this file, one vx_install_<arch> / vx_update_<arch>
# function per architecture, then install-dispatch.sh. The header sets:
#   vx_want, vx_base          the environment's token and base token (EnvSpec.base_hash)
#   vx_token_short            the token's first 16 characters, for messages
#   vx_python_version         the client's Python minor version ("3.11"), and its two
#   vx_python_major/_minor    numbers
#   vx_uv_version             the uv version to install when the image has none
#   vx_uv_lock_<arch>         its hash-pinned requirement for each arch (when resolved)
#   vx_index                  the package index options (a bash array)
#   vx_check, vx_check_names  what the finished environment must import (code, names)
#   vx_built_marker           the line prefix of a shared build (install.BUILT_MARKER)
# `fail` is the boot script's (it records the reason for the client); standalone,
# vx_die reports and exits. Paths are under ${VMEXEC_ROOT:-} (empty on a real machine).
# shellcheck disable=SC2154  # the vx_* values above come from the header
vx_root="${VMEXEC_ROOT:-}"
vx_dir="$vx_root/opt/vmexec"; vx_venv="$vx_dir/venv"; vx_art="$vx_dir/artifacts"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$vx_root/var/cache/vmexec/uv}" UV_NO_PROGRESS=1
mkdir -p "$vx_art" "$UV_CACHE_DIR"
vx_log() { echo "[vmexec-env $(date -u +%H:%M:%S)] $*"; }
vx_die() { if declare -F fail >/dev/null; then fail "$*"; fi; vx_log "FAILED: $*"; exit 1; }
vx_sha() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }
vx_fetch() {  # source name sha256
  local dest="$vx_art/$2"
  if [ -f "$dest" ] && [ "$(vx_sha "$dest")" = "$3" ]; then return 0; fi
  case "$1" in
    http://*|https://*) vx_get "$1" "$dest.part" || vx_die "cannot download $2 (staged artifact)";;
    file://*) cp "${1#file://}" "$dest.part" || vx_die "cannot copy ${1#file://}";;
    *) cp "$1" "$dest.part" || vx_die "cannot copy $1";;
  esac
  [ "$(vx_sha "$dest.part")" = "$3" ] || vx_die "$2: sha256 mismatch (corrupted download?)"
  mv "$dest.part" "$dest"
}
vx_arch=$(uname -m)
case "$vx_arch" in arm64) vx_arch=aarch64;; amd64) vx_arch=x86_64;; esac
vx_uv=$(command -v uv 2>/dev/null || true)
if [ -z "$vx_uv" ] && [ -x "$vx_dir/uv/bin/uv" ]; then vx_uv="$vx_dir/uv/bin/uv"; fi
if [ -z "$vx_uv" ]; then
  # uv $vx_uv_version exactly, and only a wheel whose sha256 the client resolved for this
  # architecture (pip --require-hashes): never whatever the index serves that day.
  vx_uv_lock="vx_uv_lock_$vx_arch"
  { [ -z "${!vx_uv_lock:-}" ] || printf '%s\n' "${!vx_uv_lock}"; } >"$vx_dir/uv-requirements.txt"
  [ -s "$vx_dir/uv-requirements.txt" ] || vx_die "no uv on the image, and no checksummed uv $vx_uv_version for $(uname -m) (the client could not resolve uv==$vx_uv_version with hashes from its package index): use an image with uv on PATH (ami=), or serve uv==$vx_uv_version wheels through index_url=/find_links="
  vx_log "installing uv $vx_uv_version (hash-checked)"
  { python3 -m venv "$vx_dir/uv" && "$vx_dir/uv/bin/python" -m pip install -q --require-hashes --only-binary :all: ${vx_index[@]+"${vx_index[@]}"} -r "$vx_dir/uv-requirements.txt"; } \
    || vx_die "cannot install uv $vx_uv_version with a matching sha256 (see the log): check index_url=/find_links="
  vx_uv="$vx_dir/uv/bin/uv"
fi
vx_python() {
  if [ -n "${PY:-}" ] && "$PY" -c "import sys; sys.exit(sys.version_info[:2] != ($vx_python_major, $vx_python_minor))" 2>/dev/null; then echo "$PY"; return 0; fi
  command -v "python$vx_python_version" 2>/dev/null && return 0
  "$vx_uv" python find "$vx_python_version" 2>/dev/null && return 0
  "$vx_uv" python install "$vx_python_version" >&2 && "$vx_uv" python find "$vx_python_version"
}
vx_pip() { "$vx_uv" pip install --python "$vx_venv/bin/python" "$@"; }
vx_compiler() {
  command -v cc >/dev/null 2>&1 && return 0
  vx_log "installing a compiler for local packages with compiled extensions"
  if command -v dnf >/dev/null 2>&1; then dnf install -y gcc "python$vx_python_version-devel"
  elif command -v apt-get >/dev/null 2>&1; then apt-get install -y gcc "python$vx_python_version-dev"
  fi
}
vx_build() {  # sdist-file built-url put-url built-sha256
  local out="$vx_art/built-$vx_arch-$1"
  rm -rf "$out" "$out.tar" && mkdir -p "$out"
  # A shared build is used only when its sha256 is the one the client learned from the
  # machine that built it: anyone else who can write to the bucket cannot slip one in.
  if [ -n "$2" ] && [ -n "$4" ] && vx_get "$2" "$out.tar" 2>/dev/null \
      && [ "$(vx_sha "$out.tar")" = "$4" ] && tar -xf "$out.tar" -C "$out" \
      && ls "$out"/*.whl >/dev/null 2>&1; then
    vx_log "$1: using the $vx_arch build another machine shared (sha256 verified)"
  else
    if [ -n "$4" ] && [ -f "$out.tar" ]; then
      vx_log "$1: the shared $vx_arch build is not the one recorded (sha256 differs): building here"
    fi
    rm -rf "$out" "$out.tar" && mkdir -p "$out"
    vx_compiler
    "$vx_uv" build --wheel --python "$vx_venv/bin/python" ${vx_index[@]+"${vx_index[@]}"} --out-dir "$out" \
      "$vx_art/$1" || vx_die "building $1 for $vx_arch failed (compiled extensions need a compiler and Python headers on the image: ami=)"
    # Shared once: the presigned PUT requires If-None-Match (S3 refuses to replace an
    # existing build). The client reads the sha256 printed here.
    if [ -n "$3" ] && command -v curl >/dev/null 2>&1; then
      if tar -cf "$out.tar" -C "$out" . && printf 'url = "%s"\n' "$3" \
          | curl -fsS -X PUT -H "If-None-Match: *" --upload-file "$out.tar" -K -; then
        echo "$vx_built_marker $1 $vx_arch $(vx_sha "$out.tar")"
      else
        vx_log "could not share the $vx_arch build of $1 (another machine may have shared it first)"
      fi
    fi
  fi
  vx_pip --no-deps "$out"/*.whl || vx_die "cannot install the build of $1"
}
vx_done() {
  "$vx_venv/bin/python" -c "$vx_check" || vx_die "the installed environment cannot import $vx_check_names"
  printf '%s\n' "$vx_want" >"$vx_dir/env-hash"
  printf '%s\n' "$vx_base" >"$vx_dir/env-base"
  vx_log "environment $vx_token_short installed in $vx_venv"
}
# A new venv of the client's Python minor version (requirements and auto modes).
vx_fresh_venv() {
  rm -rf "$vx_venv" "$vx_dir/env-hash" "$vx_dir/env-base"
  vx_py=$(vx_python) || vx_die "no Python $vx_python_version on the image and uv cannot install it: use an image with python$vx_python_version (ami=)"
  "$vx_uv" venv --quiet --python "$vx_py" "$vx_venv" || vx_die "uv venv failed with $vx_py"
}
# The client's conda environment, unpacked as the venv (conda-pack mode).
vx_unpack() {  # pack-file
  rm -rf "$vx_venv" "$vx_dir/env-hash" "$vx_dir/env-base" && mkdir -p "$vx_venv"
  tar -xzf "$vx_art/$1" -C "$vx_venv" || vx_die "cannot unpack the conda environment"
  "$vx_venv/bin/python" "$vx_venv/bin/conda-unpack" || vx_die "conda-unpack failed"
}
