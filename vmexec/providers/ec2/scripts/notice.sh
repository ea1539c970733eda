#!/bin/bash
# vmexec spot-interruption poller: EC2 announces a reclaim two minutes ahead in the
# instance metadata (IMDSv2); this copies the notice to OUT, where the agent looks.
#
# Usage: notice.sh IMDS_URL OUT
# Written by boot.sh into a directory only root can write; stops once OUT exists.
IMDS="$1"; OUT="$2"
while [ ! -e "$OUT" ]; do
  token=$(curl -s -f -m 2 --noproxy '*' -X PUT "$IMDS/latest/api/token" \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
  if body=$(curl -s -f -m 2 --noproxy '*' -H "X-aws-ec2-metadata-token: $token" \
      "$IMDS/latest/meta-data/spot/instance-action"); then
    printf '%s\n' "$body" >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
  fi
  sleep 5
done
