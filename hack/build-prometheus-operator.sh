#!/usr/bin/env bash
# Builds the Prometheus Operator (github.com/prometheus-operator/prometheus-operator, cmd/operator) from the Go module
# proxy (nothing else is downloaded) into $KILN_BIN_DIR, and copies the release's CustomResourceDefinitions
# (example/prometheus-operator-crd/, the monitoring.coreos.com CRDs the release ships) into
# $KILN_CACHE/prometheus-operator-<version>/crds, both outside the checkout. tests/integration/
# test_prometheus_operator.py applies those CRDs to the local cluster, applies Kiln's ServiceMonitor, PodMonitor and
# PrometheusRule against them (strict field validation), and runs this operator to turn them into Prometheus
# configuration. Version: PROMETHEUS_OPERATOR_VERSION in hack/versions.env. Idempotent: CRDs already copied and a
# binary that already reports the pinned version are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=prometheus-operator
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
start=$SECONDS
m=github.com/prometheus-operator/prometheus-operator
v=v$PROMETHEUS_OPERATOR_VERSION
crds=$KILN_CACHE/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crds
# The release requires its nested module pkg/client at its own version through a replace to ./pkg/client, which a
# module zip does not contain; the Go module proxy answers 404 for pkg/client v0.94.x, so the wrapper module takes
# the newest release of it that the proxy serves. Its generated clientset covers every call cmd/operator makes
# (the build fails otherwise); the API types themselves (pkg/apis/monitoring) are the release's own.
client_fallback=v0.93.0

log "resolving $m@$v"
info=$(go mod download -json "$m@$v")
dir=$(python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])' <<<"$info")
revision=$(python3 -c 'import json,sys;print(json.load(sys.stdin).get("Origin",{}).get("Hash","unknown")[:12])' <<<"$info")

# --- The CRDs: every file of the release's example/prometheus-operator-crd (the operator looks for all of its kinds
# at start and the Prometheus it reconciles reads ServiceMonitors, PodMonitors, Probes, ScrapeConfigs and rules).
if [ -d "$crds" ] && diff -rq "$dir/example/prometheus-operator-crd" "$crds" >/dev/null 2>&1; then
  log "CRDs $v: up to date ($crds)"
else
  log "CRDs $v: copying into $crds"
  # Copy beside the destination, then swap it in: an interrupted run never leaves half the CRDs behind.
  mkdir -p "$(dirname "$crds")"
  staging=$(mktemp -d "$(dirname "$crds")/.crds.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  cp "$dir"/example/prometheus-operator-crd/monitoring.coreos.com_*.yaml "$staging/"
  chmod -R u+w "$staging"  # the module cache is read-only
  rm -rf "$crds"
  mv "$staging" "$crds"
  trap - EXIT
fi
log "CRDs: $(find "$crds" -name '*.yaml' | wc -l) files in $crds"

# --- The operator binary, from a wrapper module (go install module@version refuses a module with replace lines).
if reports prometheus-operator "version $PROMETHEUS_OPERATOR_VERSION " --version; then
  log "prometheus-operator $v: up to date"
else
  log "prometheus-operator $v: building (about 6 min on 2 cores on an empty Go build cache, seconds on a warm one)"
  d=$SRC/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION
  mkdir -p "$d"
  (
    cd "$d"
    [ -f go.mod ] || go mod init local/prometheus-operator-bin >/dev/null
    if go mod download "$m/pkg/client@$v" 2>/dev/null; then
      go mod edit -dropreplace="$m/pkg/client@$v"
    else
      log "the module proxy does not serve $m/pkg/client@$v: using $client_fallback"
      go mod edit -replace="$m/pkg/client@$v=$m/pkg/client@$client_fallback"
    fi
    log "go get -tool $m/cmd/operator@$v"
    go get -tool "$m/cmd/operator@$v"
    # Version stamped as the release Makefile does (GO_BUILD_LDFLAGS, github.com/prometheus/common/version), so
    # --version names it.
    p=github.com/prometheus/common/version
    ldf="-s -w -X $p.Version=$PROMETHEUS_OPERATOR_VERSION -X $p.Revision=$revision -X $p.Branch=$v"
    ldf+=" -X $p.BuildUser=kiln -X $p.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"
    progress prometheus-operator go build -trimpath -ldflags "$ldf" -o "$BIN/prometheus-operator.tmp" "$m/cmd/operator"
    mv "$BIN/prometheus-operator.tmp" "$BIN/prometheus-operator"
  )
  if ! reports prometheus-operator "version $PROMETHEUS_OPERATOR_VERSION " --version; then
    log "ERROR: $BIN/prometheus-operator does not report $v"
    exit 1
  fi
fi
log "$("$BIN/prometheus-operator" --version 2>&1 | head -1) in $BIN ($((SECONDS - start)) s)"
