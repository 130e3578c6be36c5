#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok and kwokctl from the
# Go module proxy (nothing else is downloaded) into $KILN_BIN_DIR, outside the checkout.
# Idempotent: a binary that already reports the pinned version is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=control-plane
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
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
  build_kubernetes "$SRC/k8s-$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler kubectl
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
