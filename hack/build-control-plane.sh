#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok and kwokctl from the
# Go module proxy (nothing else is downloaded) into $KILN_BIN_DIR, outside the checkout.
# Idempotent: a binary that already reports the pinned version is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
KILN_CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
BIN=${KILN_BIN_DIR:-$KILN_CACHE/bin}
SRC=$KILN_CACHE/src
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$BIN" "$SRC"
log() { printf '[control-plane %(%H:%M:%S)T] %s\n' -1 "$*"; }
reports() { # reports BINARY EXPECTED ARGS...: true when BINARY's output of ARGS contains EXPECTED
  local b=$1 want=$2 out; shift 2
  # Capture first: `| grep -q` under pipefail fails at random when grep exits early (SIGPIPE).
  [ -x "$BIN/$b" ] && out=$("$BIN/$b" "$@" 2>&1) && [[ $out == *"$want"* ]]
}
progress() { # progress WHAT COMMAND...: run COMMAND, saying every 30 s that it still runs
  local what=$1 t0=$SECONDS pid; shift
  "$@" & pid=$!
  while ! wait_tick "$pid"; do log "  ... $what: $((SECONDS - t0)) s"; done
  wait "$pid"
}
wait_tick() { # true once PID has exited (within 30 s), false if it still runs
  local i
  for i in $(seq 30); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  return 1
}
start=$SECONDS

# --- Kubernetes: wrapper module with a replace line per staging module, generated from the proxy's go.mod.
k8s_ok=1
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  reports "$c" "Kubernetes v$K8S_VERSION" --version || k8s_ok=0
done
reports kubectl "v$K8S_VERSION" version --client || k8s_ok=0
if [ $k8s_ok = 1 ]; then
  log "kubernetes v$K8S_VERSION: up to date"
else
  log "kubernetes v$K8S_VERSION: building (cold: 20-40 min on 2 cores)"
  d=$SRC/k8s-$K8S_VERSION; mkdir -p "$d"; cd "$d"
  [ -f go.mod ] || go mod init local/k8sbins >/dev/null
  stg="v0.${K8S_VERSION#1.}"; minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  log "resolving k8s.io/kubernetes@v$K8S_VERSION"
  modfile=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  for m in $(awk '$1 ~ /^k8s\.io\// && $2=="v0.0.0" {print $1}' "$modfile"); do
    go mod edit -replace="$m=$m@$stg"
  done
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    log "go get -tool $c"
    go get -tool "k8s.io/kubernetes/cmd/$c@v$K8S_VERSION"
  done
  ldf="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ldf+=" -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    log "go build $c"
    progress "$c" go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$ldf" -o "$BIN/$c" "k8s.io/kubernetes/cmd/$c"
  done
fi

# --- etcd: wrapper module, no replace needed (server/go.mod pins its siblings).
if reports etcd "etcd Version: $ETCD_VERSION" --version; then
  log "etcd v$ETCD_VERSION: up to date"
else
  log "etcd v$ETCD_VERSION: building"
  d=$SRC/etcd-$ETCD_VERSION; mkdir -p "$d"; cd "$d"
  [ -f go.mod ] || go mod init local/etcdbin >/dev/null
  go get -tool "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  progress etcd go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
fi

# --- kwok and kwokctl: plain go install, version stamped as release builds do.
if reports kwokctl "$KWOK_VERSION" --version && reports kwok "$KWOK_VERSION" --version; then
  log "kwok v$KWOK_VERSION: up to date"
else
  log "kwok v$KWOK_VERSION: building"
  progress kwok env GOBIN="$BIN" go install -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=v$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=v$K8S_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION"
fi
log "control plane binaries ready in $BIN ($((SECONDS - start)) s)"
