#!/usr/bin/env bash
# Local Kubernetes control plane for Kiln: kube-apiserver, etcd, kube-controller-manager, kube-scheduler and
# kwok-controller from locally built binaries (hack/build-control-plane.sh), run by `kwokctl --runtime binary`.
#   hack/cluster.sh up      build if needed, create (or reuse) the cluster, add the nodes, wait until usable
#   hack/cluster.sh down    delete the cluster and make sure none of its processes is left
#   hack/cluster.sh env     print the exports (KUBECONFIG, PATH) for a shell: eval "$(hack/cluster.sh env)"
# Settings: KILN_CLUSTER_NAME (default kiln), KWOK_WORKDIR (default <repo>/.kwok), KILN_BIN_DIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/hack/versions.env"
BIN=${KILN_BIN_DIR:-${KILN_CACHE:-$HOME/.cache/kiln}/bin}
NAME=${KILN_CLUSTER_NAME:-kiln}
export KWOK_WORKDIR=${KWOK_WORKDIR:-$repo/.kwok}
export PATH=$BIN:$PATH KWOK_KUBECTL_BINARY=$BIN/kubectl KWOK_KUBE_VERSION=v$K8S_VERSION  # kwokctl probes with kubectl: never download it
dir=$KWOK_WORKDIR/clusters/$NAME
KUBECONFIG_PATH=$dir/kubeconfig.yaml
log() { printf '[cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
k() { kubectl --kubeconfig "$KUBECONFIG_PATH" "$@"; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or time runs out
  local until=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= until)); then log "timed out waiting for $what"; return 1; fi
    sleep 1
  done
}

leftovers() { pgrep -f -- "$dir/" || true; }

down() {
  # The real node first, while the API server still answers: its pods are deleted, its host changes undone.
  if [ -d "$dir/real-node" ]; then "$repo/hack/real-node.sh" down || true; fi
  if [ -d "$dir" ]; then
    log "deleting cluster $NAME ($dir)"
    kwokctl delete cluster --name "$NAME" >&2 || true
  fi
  local pids; pids=$(leftovers)
  if [ -n "$pids" ]; then
    log "killing leftover processes: $pids"
    kill $pids 2>/dev/null || true
    wait_for 20 "leftover processes to exit" test -z "$(leftovers)" || kill -9 $(leftovers) 2>/dev/null || true
  fi
  rm -rf "$dir"
  "$repo/hack/local-routes.sh" release "$dir"
}

up() {
  "$repo/hack/build-control-plane.sh" >&2
  if [ "${KILN_REAL_NODE:-1}" != 0 ]; then "$repo/hack/build-node.sh" >&2; fi
  if [ -f "$KUBECONFIG_PATH" ] && k get --raw /readyz >/dev/null 2>&1; then
    log "cluster $NAME is already up"
    "$repo/hack/local-routes.sh" claim "$dir"
  else
    down
    # Before anything can connect: simulated pod IPs and Service IPs stay on this machine.
    "$repo/hack/local-routes.sh" claim "$dir"
    log "creating cluster $NAME in $KWOK_WORKDIR (kubernetes v$K8S_VERSION, etcd v$ETCD_VERSION, kwok v$KWOK_VERSION)"
    kwokctl create cluster --name "$NAME" --runtime binary -c "$repo/hack/kwok/kwokctl.yaml" \
      --kubeconfig "" --wait 120s \
      --extra-args "kube-apiserver=kubelet-client-certificate=$dir/pki/admin.crt" \
      --extra-args "kube-apiserver=kubelet-client-key=$dir/pki/admin.key" \
      --extra-args "kube-apiserver=kubelet-preferred-address-types=InternalIP,Hostname" \
      --extra-args "kube-apiserver=enable-admission-plugins=PodNodeSelector,PodTolerationRestriction" \
      --kube-apiserver-binary "$BIN/kube-apiserver" \
      --kube-controller-manager-binary "$BIN/kube-controller-manager" \
      --kube-scheduler-binary "$BIN/kube-scheduler" \
      --etcd-binary "$BIN/etcd" \
      --kwok-controller-binary "$BIN/kwok" >&2
  fi
  k apply -f "$repo/hack/kwok/nodes.yaml" >&2
  wait_for 120 "nodes Ready" k wait --for=condition=Ready node --all --timeout=5s
  # With a real node, ordinary pods run for real: the simulated CPU node takes only pods that tolerate it (tests
  # that need kwok's failure hooks). Without one, it is where CPU pods go.
  if [ "${KILN_REAL_NODE:-1}" != 0 ]; then
    k taint node kiln-cpu-0 kwok.x-k8s.io/node=fake:NoSchedule --overwrite >&2
  else
    k taint node kiln-cpu-0 kwok.x-k8s.io/node- >&2 2>/dev/null || true
  fi
  # The default ServiceAccount appears once kube-controller-manager runs; pods can't be created before.
  wait_for 120 "ServiceAccount default/default" k get serviceaccount default -n default
  # One real node (kubelet, containerd, kube-proxy, cluster DNS, default StorageClass) beside the simulated ones.
  if [ "${KILN_REAL_NODE:-1}" != 0 ]; then "$repo/hack/real-node.sh" up >&2; fi
  log "cluster $NAME ready: export KUBECONFIG=$KUBECONFIG_PATH"
}

case ${1:-} in
  up) up; echo "$KUBECONFIG_PATH" ;;
  down) down ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_PATH PATH=$BIN:\$PATH" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
