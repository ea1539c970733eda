#!/bin/bash
# Step 4 of boot.sh when the fleet syncs its environment (install_environment there):
# the boot script only prepares. It records which Python it found and hands
# /opt/vmexec to the login user; the install itself comes over SSH afterwards (its
# presigned URLs must never be in user-data, which every process on the machine can
# read). Runs inside boot.sh: R, STATE, PY, USER_NAME and fail come from there.
echo "$PY" > "$STATE/python"
chown -R "$USER_NAME" "$R/opt/vmexec" || fail "cannot hand $R/opt/vmexec to $USER_NAME"
