#!/usr/bin/env bash
# README's main command: the images, the local cluster with its real node, the CRDs, the operator (its Deployment,
# or with KILN_OPERATOR=host a process here) with its artifact store, and the sample pipeline run for real: the
# digits published, a model trained, compressed, promoted and served, then asked for a prediction through its
# Service. Stop it all with hack/down.sh. With KILN_REAL_NODE=0 (no real node, no images): the simulated cluster,
# the operator as a process here and the samples for real clusters, reconciled but not run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
hack/venv.sh
if [ "${KILN_REAL_NODE:-1}" != 0 ]; then
  hack/images.sh build  # the four images, built here (no registry to pull from); cached after the first run
fi
kubeconfig=$(hack/cluster.sh up)
eval "$(hack/cluster.sh env)"
state=${KWOK_WORKDIR:-$repo/.kwok}
echo "[up] installing the CRDs" >&2
kubectl apply -f crds/ >&2
kubectl wait --for=condition=Established --timeout=60s -f crds/ >&2
real=1
if [ "${KILN_REAL_NODE:-1}" = 0 ]; then
  real=0
  KILN_OPERATOR=host
fi
store=
if [ $real = 1 ]; then
  # The artifact store: one directory on the real node, claimed as kiln-store by the operator and by the sample's
  # namespace (a shared file system's volumes, as NFS would give them).
  hack/real-node.sh share kiln-store kiln-system kiln-demo
  store=$state/clusters/${KILN_CLUSTER_NAME:-kiln}/real-node/volumes/shared
fi
if [ "${KILN_OPERATOR:-cluster}" = cluster ]; then
  # As an install runs it: the Deployment from manifests/, from the image built here, on the real node, with its
  # ServiceAccount token, in the restricted namespace kiln-system.
  echo "[up] installing the operator from manifests/overlays/local (manifests/ plus its artifact store; image" \
    "kiln/operator:0.1.0, built by hack/images.sh)" >&2
  kubectl apply -k manifests/overlays/local >&2
  echo "[up] waiting for the operator's pod (kubectl -n kiln-system rollout status deployment/kiln-operator)" >&2
  kubectl -n kiln-system rollout status deployment/kiln-operator --timeout=180s >&2
else
  # KILN_OPERATOR=host (development): the operator runs here, outside the cluster, but with exactly the identity and
  # RBAC an install gives it: the ServiceAccount, ClusterRole and binding from manifests/ (not its Deployment).
  echo "[up] installing the operator's ServiceAccount and RBAC from manifests/" >&2
  kubectl kustomize manifests/ | .venv/bin/python -c '
import sys, yaml
keep = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
print(yaml.safe_dump_all(d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] in keep))' | kubectl apply -f - >&2
  if [ -f "$state/operator.pid" ] && kill -0 "$(cat "$state/operator.pid")" 2>/dev/null; then
    echo "[up] operator already running (pid $(cat "$state/operator.pid"))" >&2
  else
    sa_kubeconfig=$state/operator.kubeconfig
    rm -f "$sa_kubeconfig"
    server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
    KUBECONFIG=$sa_kubeconfig kubectl config set-cluster kiln --server="$server" \
      --certificate-authority="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')" \
      --embed-certs >/dev/null
    KUBECONFIG=$sa_kubeconfig kubectl config set-credentials kiln-operator \
      --token="$(kubectl create token kiln-operator -n kiln-system --duration=24h)" >/dev/null
    KUBECONFIG=$sa_kubeconfig kubectl config set-context kiln --cluster=kiln --user=kiln-operator >/dev/null
    KUBECONFIG=$sa_kubeconfig kubectl config use-context kiln >/dev/null
    echo "[up] starting the operator as system:serviceaccount:kiln-system:kiln-operator (log: $state/operator.log)" >&2
    if [ -n "$store" ]; then
      # The store as the operator's pod would mount it: $KILN_PVC_ROOT/kiln-store.
      export KILN_PVC_ROOT=$store KILN_ARTIFACT_ROOT=pvc://kiln-store/artifacts
    fi
    KUBECONFIG=$sa_kubeconfig nohup .venv/bin/python -m kiln_operator --all-namespaces \
      --liveness=http://127.0.0.1:8080/healthz --metrics=127.0.0.1:9090 > "$state/operator.log" 2>&1 &
    echo $! > "$state/operator.pid"
  fi
fi
if [ $real = 1 ]; then
  echo "[up] applying the sample pipeline (kubectl apply -k manifests/overlays/local-samples: namespace kiln-demo)" >&2
  kubectl apply -k manifests/overlays/local-samples >&2
  .venv/bin/python hack/pipeline.py wait kiln-demo --timeout "${KILN_PIPELINE_TIMEOUT:-900}"
  kubectl get kiln -n kiln-demo >&2
  KILN_PVC_ROOT=$store .venv/bin/python hack/pipeline.py predict kiln-demo
else
  echo "[up] applying the samples for real clusters (no real node: reconciled, not run)" >&2
  kubectl apply -k manifests/samples >&2
  for r in trainingjob/classifier modelcompression/classifier-int8 modeldeployment/classifier; do
    kubectl wait "$r" --for=jsonpath='{.status.observedGeneration}'=1 --timeout=120s >&2
  done
  kubectl get kiln >&2
fi
if [ "${KILN_OPERATOR:-cluster}" = cluster ]; then
  logs="kubectl -n kiln-system logs -f deployment/kiln-operator"
else
  logs="curl -s 127.0.0.1:9090/metrics | grep kiln_;  tail -f $state/operator.log"
fi
cat >&2 <<MSG
[up] done. The cluster and the operator keep running:
  export KUBECONFIG=$kubeconfig PATH=$(dirname "$(command -v kubectl)"):\$PATH
  kubectl get kiln -A;  kubectl get pods -A -o wide;  $logs
  hack/down.sh     # stop the operator and delete the cluster
MSG
