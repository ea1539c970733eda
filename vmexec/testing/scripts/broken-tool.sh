#!/bin/sh
# What python, pip and uv are on a machine whose boot must fail
# (LocalCloud.fail_boot): every call fails, so the boot script's own error path runs.
me=$(basename "$0")
echo "$me: cannot execute: this machine's Python is broken" \
  "(fault injected by LocalCloud.fail_boot)" >&2
exit 127
