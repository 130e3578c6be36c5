#!/usr/bin/env bash
# Creates .venv with the operator and its test tools (idempotent; re-installs when pyproject.toml changes).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
stamp=.venv/.kiln-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[venv] installing the operator and test tools into .venv" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >&2
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[test]' >&2
echo "$want" > "$stamp"
