#!/usr/bin/env bash
# Fetches a real Prometheus server for the canary analysis tests (tests/support/prometheus.py): Debian's
# `prometheus` package, downloaded with `apt-get download` and unpacked with `dpkg -x` into
# $KILN_CACHE/prometheus, outside the checkout. Nothing is installed system-wide and no root is needed.
# Idempotent: a cached binary that runs, or a `prometheus` already on PATH, is kept as it is.
set -euo pipefail
KILN_CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
DEST=$KILN_CACHE/prometheus
BIN=$DEST/usr/bin/prometheus
log() { printf '[prometheus] %s\n' "$*" >&2; }
runs() { # runs BINARY: true when BINARY reports a Prometheus version
  local out
  # Capture first: `| grep -q` under pipefail fails at random when grep exits early (SIGPIPE).
  [ -x "$1" ] && out=$("$1" --version 2>&1) && [[ $out == *"prometheus, version"* ]]
}

if runs "$BIN"; then
  log "cached: $("$BIN" --version 2>&1 | head -n1) ($BIN)"
  exit 0
fi
if on_path=$(command -v prometheus) && runs "$on_path"; then
  log "on PATH: $("$on_path" --version 2>&1 | head -n1) ($on_path)"
  exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kiln-prometheus.XXXXXX")
staging=
trap 'rm -rf "$tmp" ${staging:+"$staging"}' EXIT
# As root, apt downloads as its sandbox user _apt, which must own the folder (or apt warns and goes unsandboxed).
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
cd "$tmp"
log "apt-get download prometheus"
if ! apt-get download -qq prometheus >&2; then
  # Only root can refresh the package lists; another user gets the first error, which says what is missing.
  [ "$(id -u)" = 0 ] || { log "FAIL: apt-get download prometheus (try: sudo apt-get update)"; exit 1; }
  log "apt-get update, then download again"
  apt-get update -qq >&2
  apt-get download -qq prometheus >&2
fi
deb=$(ls "$tmp"/prometheus_*.deb)
log "unpacking $(basename "$deb") into $DEST"
# Unpack beside the destination, then swap it in: an interrupted run never leaves a half-written cache behind.
mkdir -p "$KILN_CACHE"
staging=$(mktemp -d "$KILN_CACHE/.prometheus.XXXXXX")
dpkg -x "$deb" "$staging"
rm -rf "$DEST"
mv "$staging" "$DEST"
if ! runs "$BIN"; then
  log "FAIL: $BIN does not run: $("$BIN" --version 2>&1 | head -n3 || true)"
  exit 1
fi
log "ready: $("$BIN" --version 2>&1 | head -n1) ($BIN)"
