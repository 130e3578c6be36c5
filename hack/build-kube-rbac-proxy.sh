#!/usr/bin/env bash
# Builds kube-rbac-proxy (github.com/brancz/kube-rbac-proxy, the ecosystem's authenticating sidecar) from the Go
# module proxy (nothing else is downloaded) into $KILN_BIN_DIR, outside the checkout. bench/auth.py runs it in front
# of the inference server to compare it with the server's own checks (bench/RESULTS.md, "Authentication").
# Version: KUBE_RBAC_PROXY_VERSION in hack/versions.env, the newest release the Go module proxy serves (v0.20.0 is
# refused). Idempotent: a binary that already reports the pinned version is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=kube-rbac-proxy
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
start=$SECONDS
m=github.com/brancz/kube-rbac-proxy
v=v$KUBE_RBAC_PROXY_VERSION

# --- A wrapper module: `go install module@version` refuses this release twice over (its go.mod has a replace
# directive, gopkg.in/square/go-jose.v2, and the proxy here answers 403 to the module's version list, which go install
# reads for deprecation notices); the same replace lines, copied from the release's go.mod, go into the wrapper.
if reports kube-rbac-proxy "$v" --version; then
  log "kube-rbac-proxy $v: up to date"
else
  log "kube-rbac-proxy $v: building (about 1-3 min on 2 cores, longer on an empty Go build cache)"
  d=$SRC/kube-rbac-proxy-$KUBE_RBAC_PROXY_VERSION
  mkdir -p "$d"
  (
    cd "$d"
    [ -f go.mod ] || go mod init local/kube-rbac-proxy-bin >/dev/null
    log "resolving $m@$v"
    modfile=$(go mod download -json "$m@$v" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
    # Single-line `replace a => b v` and `replace a v => b v` forms (the release has one such line).
    while read -r old new; do
      go mod edit -replace="$old=$new"
    done < <(python3 - "$modfile" <<'EOF'
import re, sys
for line in open(sys.argv[1]):
    m = re.match(r"^replace\s+(\S+)(?:\s+(\S+))?\s+=>\s+(\S+)(?:\s+(\S+))?\s*$", line)
    if m:
        old = m[1] + ("@" + m[2] if m[2] else "")
        new = m[3] + ("@" + m[4] if m[4] else "")
        print(old, new)
EOF
    )
    log "go get -tool $m/cmd/kube-rbac-proxy@$v"
    go get -tool "$m/cmd/kube-rbac-proxy@$v"
    # Version stamped as the release Makefile does (k8s.io/component-base/version), so --version names it.
    ldf="-s -w -X k8s.io/component-base/version.gitVersion=$v"
    ldf+=" -X k8s.io/component-base/version/verflag.programName=kube-rbac-proxy"
    ldf+=" -X k8s.io/component-base/version.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    progress kube-rbac-proxy go build -trimpath -ldflags "$ldf" -o "$BIN/kube-rbac-proxy.tmp" "$m/cmd/kube-rbac-proxy"
    mv "$BIN/kube-rbac-proxy.tmp" "$BIN/kube-rbac-proxy"
  )
  if ! reports kube-rbac-proxy "$v" --version; then
    log "ERROR: $BIN/kube-rbac-proxy does not report $v"
    exit 1
  fi
fi
log "$("$BIN/kube-rbac-proxy" --version 2>&1 | head -1) in $BIN ($((SECONDS - start)) s)"
