#!/usr/bin/env bash
# Builds the real node's programs from the Go module proxy (nothing else is downloaded) into $KILN_BIN_DIR,
# outside the checkout: kubelet, kube-proxy, containerd (+ ctr and its runc shim, in containerd2/), crictl, CoreDNS,
# local-path-provisioner, and the pause binary (compiled from the k8s.io/kubernetes module's C source).
# Idempotent: a program that already reports its pinned version is not rebuilt.
# runc, the CNI plugins and the packet filter tools come from Debian (hack/real-node.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOG_PREFIX=node-build
# shellcheck source=lib/go-build.sh
. "$here/lib/go-build.sh"
built_from() { # built_from BINARY MODULE VERSION: true when `go install` built BINARY from MODULE@VERSION
  local out
  [ -x "$BIN/$1" ] && out=$(go version -m "$BIN/$1" 2>/dev/null) && [[ $out == *$'\tmod\t'"$2"$'\t'"$3"$'\t'* ]]
}
start=$SECONDS

# --- kubelet and kube-proxy: the control plane's recipe (wrapper module, a replace line per staging module), in a
# module of their own so that the control-plane build stays as it is; the Go build cache is shared.
if reports kubelet "Kubernetes v$K8S_VERSION" --version && reports kube-proxy "Kubernetes v$K8S_VERSION" --version; then
  log "kubelet, kube-proxy v$K8S_VERSION: up to date"
else
  t0=$SECONDS
  log "kubelet, kube-proxy v$K8S_VERSION: building (1-2 min after the control plane, 4-5 min on an empty build cache)"
  build_kubernetes "$SRC/k8s-node-$K8S_VERSION" kubelet kube-proxy
  log "kubelet, kube-proxy built in $((SECONDS - t0)) s"
fi

# --- containerd, ctr and the runc shim: a directory of their own, so that a Debian containerd beside them is never
# picked up by PATH; real-node.sh names each by its path. No replace directives: plain `go install` works.
ctrd=containerd2
if reports $ctrd/containerd "v$CONTAINERD_VERSION" --version && reports $ctrd/ctr "v$CONTAINERD_VERSION" --version &&
  reports $ctrd/containerd-shim-runc-v2 "v$CONTAINERD_VERSION" -v; then
  log "containerd v$CONTAINERD_VERSION: up to date"
else
  t0=$SECONDS
  log "containerd v$CONTAINERD_VERSION: building (about 2 min)"
  m=github.com/containerd/containerd/v2
  # btrfs, devmapper and zfs snapshotters are not used (overlayfs is); leaving them out keeps cgo out.
  progress containerd env GOBIN="$BIN/$ctrd" go install -trimpath -tags no_btrfs,no_devmapper,no_zfs \
    -ldflags "-s -w -X $m/version.Version=v$CONTAINERD_VERSION" \
    "$m/cmd/containerd@v$CONTAINERD_VERSION" "$m/cmd/ctr@v$CONTAINERD_VERSION" \
    "$m/cmd/containerd-shim-runc-v2@v$CONTAINERD_VERSION"
  log "containerd built in $((SECONDS - t0)) s"
fi

# --- crictl: removes pod sandboxes through the CRI at teardown (network teardown included).
if reports crictl "v$CRI_TOOLS_VERSION" --version; then
  log "crictl v$CRI_TOOLS_VERSION: up to date"
else
  t0=$SECONDS
  log "crictl v$CRI_TOOLS_VERSION: building"
  progress crictl env GOBIN="$BIN" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=v$CRI_TOOLS_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@v$CRI_TOOLS_VERSION"
  log "crictl built in $((SECONDS - t0)) s"
fi

# --- CoreDNS with its default plugin set (the module's plugin.cfg); its version is a constant in the source.
if reports coredns "CoreDNS-$COREDNS_VERSION" -version; then
  log "coredns v$COREDNS_VERSION: up to date"
else
  t0=$SECONDS
  log "coredns v$COREDNS_VERSION: building (2-5 min: the default plugins bring cloud SDKs)"
  progress coredns env GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@v$COREDNS_VERSION"
  log "coredns built in $((SECONDS - t0)) s"
fi

# --- local-path-provisioner: its --version is a constant (0.0.1), so the module version recorded in the binary is
# what is checked. No replace directives: plain `go install` works.
lpp=github.com/rancher/local-path-provisioner
if built_from local-path-provisioner "$lpp" "v$LOCAL_PATH_PROVISIONER_VERSION"; then
  log "local-path-provisioner v$LOCAL_PATH_PROVISIONER_VERSION: up to date"
else
  t0=$SECONDS
  log "local-path-provisioner v$LOCAL_PATH_PROVISIONER_VERSION: building"
  progress local-path-provisioner env GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "$lpp@v$LOCAL_PATH_PROVISIONER_VERSION"
  log "local-path-provisioner built in $((SECONDS - t0)) s"
fi

# --- pause: the pod sandbox's only process, from the C source in the k8s.io/kubernetes module (as upstream builds it:
# static, -Os). real-node.sh wraps it in the image kiln.local/pause:$PAUSE_VERSION.
if reports "pause-$PAUSE_VERSION" "v$PAUSE_VERSION" -v; then
  log "pause v$PAUSE_VERSION: up to date"
else
  for p in gcc libc6-dev; do
    dpkg -s "$p" >/dev/null 2>&1 && continue
    log "installing $p (Debian) to compile pause"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
  done
  k8sdir=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
  tag=$(awk '$1 == "TAG" {print $3}' "$k8sdir/build/pause/Makefile")
  if [ "$tag" != "$PAUSE_VERSION" ]; then
    log "WARNING: k8s.io/kubernetes v$K8S_VERSION builds pause $tag, versions.env pins $PAUSE_VERSION"
  fi
  log "pause v$PAUSE_VERSION: compiling build/pause/linux/pause.c"
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION" -o "$BIN/pause-$PAUSE_VERSION.tmp" "$k8sdir/build/pause/linux/pause.c"
  strip "$BIN/pause-$PAUSE_VERSION.tmp"
  mv "$BIN/pause-$PAUSE_VERSION.tmp" "$BIN/pause-$PAUSE_VERSION"
fi
log "node binaries ready in $BIN ($((SECONDS - start)) s)"
