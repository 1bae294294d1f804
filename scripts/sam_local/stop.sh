#!/usr/bin/env bash
# Stops the dockerd that scripts/sam_local/setup.sh started (by the PID it recorded), and nothing else.
set -euo pipefail
state=$(cd "$(dirname "$0")/../.." && pwd)/.cache/sam_local
pidfile=$state/dockerd.pid
[ -s "$pidfile" ] || { echo "sam_local: no dockerd recorded in $pidfile" >&2; exit 0; }
pid=$(cat "$pidfile")
if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
  echo "sam_local: pid $pid is not a running dockerd; nothing to stop" >&2
  rm -f "$pidfile"
  exit 0
fi
echo "sam_local: stopping dockerd (pid $pid)" >&2
kill -TERM "$pid"
for _ in $(seq 150); do
  kill -0 "$pid" 2>/dev/null || { echo "sam_local: dockerd stopped" >&2; exit 0; }
  sleep 0.2
done
echo "sam_local: dockerd (pid $pid) still running after 30 s; sending SIGKILL" >&2
kill -KILL "$pid" 2>/dev/null || true
