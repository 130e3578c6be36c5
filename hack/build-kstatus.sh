#!/usr/bin/env bash
# Builds hack/kstatus (a small program that prints kstatus' reading of Kubernetes objects, as Flux computes it, or
# Argo CD's through a Lua health check) from
# the Go module proxy (nothing else is downloaded) into $KILN_BIN_DIR, outside the checkout. tests/unit/test_kstatus.py
# runs it on the statuses the state machines write.
# Version: KSTATUS_VERSION in hack/versions.env (sigs.k8s.io/cli-utils), which hack/kstatus/go.mod must require.
# Idempotent: a binary that reports the pinned version and this checkout's source digest is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=kstatus
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
start=$SECONDS
src=$here/kstatus
v=v$KSTATUS_VERSION
# The binary names the digest of the sources it was built from: an edited program is rebuilt, an unchanged one not.
digest=$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-12)

if reports kstatus "sigs.k8s.io/cli-utils $v (source $digest)" --version; then
  log "kstatus (cli-utils $v): up to date"
else
  # Read-only module mode: the build must not edit the checked-in go.mod or go.sum (go-build.sh's default is -mod=mod).
  export GOFLAGS=-mod=readonly
  have=$(cd "$src" && go list -m -f '{{.Version}}' sigs.k8s.io/cli-utils)
  if [ "$have" != "$v" ]; then
    log "ERROR: hack/kstatus/go.mod requires sigs.k8s.io/cli-utils $have, hack/versions.env pins $v"
    log "  (cd hack/kstatus && go get sigs.k8s.io/cli-utils@$v && go mod tidy)"
    exit 1
  fi
  log "kstatus (cli-utils $v): building (about 15-60 s, longer on an empty Go module cache)"
  log "go mod download"
  progress "go mod download" env -C "$src" go mod download
  log "go build"
  progress kstatus env -C "$src" go build -trimpath -ldflags "-s -w -X main.source=$digest" -o "$BIN/kstatus.tmp" .
  mv "$BIN/kstatus.tmp" "$BIN/kstatus"
  if ! reports kstatus "sigs.k8s.io/cli-utils $v (source $digest)" --version; then
    log "ERROR: $BIN/kstatus does not report cli-utils $v (source $digest)"
    exit 1
  fi
fi
log "$("$BIN/kstatus" --version) in $BIN ($((SECONDS - start)) s)"
