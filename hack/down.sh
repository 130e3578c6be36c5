#!/usr/bin/env bash
# Stops what hack/up.sh started: the operator, then the cluster.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
state=${KWOK_WORKDIR:-$repo/.kwok}
if [ -f "$state/operator.pid" ]; then
  pid=$(cat "$state/operator.pid")
  if kill "$pid" 2>/dev/null; then
    echo "[down] stopping the operator (pid $pid)" >&2
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$state/operator.pid"
fi
"$repo/hack/cluster.sh" down
