#!/bin/sh
# vmexec boot probe: what the client runs over SSH (as `sh -c`) to learn how the boot
# went, waiting on the machine up to WAIT seconds for it to end.
#
# Usage: probe.sh WAIT TAIL_BYTES ROOT   (ROOT: the machine's $VMEXEC_ROOT, "" on EC2)
# Prints one first line the client reads (userdata.READY / FAILED / WAITING):
#   VMEXEC-READY <root>                     the boot finished;
#   VMEXEC-FAILED, the reason, the log's end  the boot script failed;
#   VMEXEC-WAITING, the log's end           still booting when the wait ended.
# Any POSIX sh: the login shell of an image may be anything.
wait_seconds="$1"; tail_bytes="$2"; root="$3"
state="$root/var/lib/vmexec"
log="$root/var/log/vmexec-boot.log"
# A client is setting the machine up: its dead-man switch must not power it off.
touch "$root/opt/vmexec/client/active" 2>/dev/null
i=0
while [ "$i" -lt "$wait_seconds" ]; do
  if [ -e "$state/ready" ]; then echo "VMEXEC-READY $root"; exit 0; fi
  if [ -e "$state/failed" ]; then
    echo VMEXEC-FAILED; cat "$state/failed"
    echo "--- end of $log:"; tail -c "$tail_bytes" "$log" 2>/dev/null; exit 0
  fi
  sleep 1; i=$((i+1))
done
echo VMEXEC-WAITING; tail -c "$tail_bytes" "$log" 2>/dev/null; exit 0
