#!/usr/bin/env bash
# Builds helm (helm.sh/helm/v4) from the Go module proxy (nothing else is downloaded) into $KILN_BIN_DIR, outside the
# checkout. tests/unit/test_chart.py lints and renders charts/kiln with it and compares the result with
# `kubectl kustomize manifests/`; tests/integration/test_helm.py installs, upgrades and uninstalls the chart.
# Version: HELM_VERSION in hack/versions.env. Idempotent: a binary that already reports the pinned version is not
# rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=helm
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
start=$SECONDS
m=helm.sh/helm/v4
v=v$HELM_VERSION

# --- A wrapper module, as for kube-rbac-proxy: `go install module@version` reads the module's version list (for
# deprecation notices), which the proxy here may refuse; `go get -tool` of one exact version does not.
if reports helm "$v" version --short; then
  log "helm $v: up to date"
else
  log "helm $v: building (about 5 min on 2 cores with cold Go caches, seconds with warm ones)"
  d=$SRC/helm-$HELM_VERSION
  mkdir -p "$d"
  (
    cd "$d"
    [ -f go.mod ] || go mod init local/helm-bin >/dev/null
    log "go get -tool $m/cmd/helm@$v"
    go get -tool "$m/cmd/helm@$v"
    # Version stamped as helm's Makefile does for a tagged release (internal/version: version, no "unreleased"
    # metadata, a clean tree), so `helm version` names it. The module proxy serves no git history, so gitCommit
    # stays empty rather than made up.
    ldf="-s -w -X $m/internal/version.version=$v -X $m/internal/version.metadata="
    ldf+=" -X $m/internal/version.gitTreeState=clean"
    progress helm go build -trimpath -ldflags "$ldf" -o "$BIN/helm.tmp" "$m/cmd/helm"
    mv "$BIN/helm.tmp" "$BIN/helm"
  )
  if ! reports helm "$v" version --short; then
    log "ERROR: $BIN/helm does not report $v"
    exit 1
  fi
fi
log "helm $("$BIN/helm" version --short 2>&1 | head -1) in $BIN ($((SECONDS - start)) s)"
