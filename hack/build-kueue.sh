#!/usr/bin/env bash
# Builds Kueue's controller manager (sigs.k8s.io/kueue, cmd/kueue) from the Go module proxy into $KILN_BIN_DIR and
# copies the release's CRDs and webhook manifests beside it ($KILN_CACHE/kueue-<version>/), outside the checkout.
# hack/kueue.sh runs it against a local cluster. Version: KUEUE_VERSION in hack/versions.env.
# Idempotent: a binary that already reports the pinned version, with its manifests, is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=kueue
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
start=$SECONDS
m=sigs.k8s.io/kueue
v=v$KUEUE_VERSION
manifests=$KILN_CACHE/kueue-$KUEUE_VERSION

# The manager logs its version as JSON on start and has no --version flag; a stamp file beside the binary says which
# release it is (written last, so an interrupted build is rebuilt).
if [ -x "$BIN/kueue-manager" ] && [ "$(cat "$BIN/kueue-manager.version" 2>/dev/null)" = "$v" ] \
  && [ -f "$manifests/webhook/manifests.yaml" ]; then
  log "kueue $v: up to date"
else
  log "kueue $v: building (about 3-6 min on 2 cores with an empty Go build cache)"
  d=$SRC/kueue-$KUEUE_VERSION
  mkdir -p "$d"
  (
    cd "$d"
    [ -f go.mod ] || go mod init local/kueue-bin >/dev/null
    log "resolving $m@$v"
    dir=$(go mod download -json "$m@$v" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
    log "go get -tool $m/cmd/kueue@$v"
    go get -tool "$m/cmd/kueue@$v"
    ldf="-s -w -X $m/pkg/version.GitVersion=$v -X $m/pkg/version.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    progress kueue go build -trimpath -ldflags "$ldf" -o "$BIN/kueue-manager.tmp" "$m/cmd/kueue"
    # Staged, then swapped in: a half-copied manifest folder never looks complete.
    rm -rf "$manifests.tmp"
    mkdir -p "$manifests.tmp/crds" "$manifests.tmp/webhook"
    cp "$dir"/config/components/crd/bases/*.yaml "$manifests.tmp/crds/"
    cp "$dir/config/components/webhook/manifests.yaml" "$manifests.tmp/webhook/"
    cp -r "$dir/config/components/rbac" "$manifests.tmp/rbac"
    chmod -R u+w "$manifests.tmp"
    rm -rf "$manifests"
    mv "$manifests.tmp" "$manifests"
    mv "$BIN/kueue-manager.tmp" "$BIN/kueue-manager"
    echo "$v" >"$BIN/kueue-manager.version"
  )
fi
log "kueue $(cat "$BIN/kueue-manager.version") in $BIN, manifests in $manifests ($((SECONDS - start)) s)"
