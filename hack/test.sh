#!/usr/bin/env bash
# README's test command: lint, build the control plane if needed, then unit and integration tests.
# Extra arguments go to pytest, e.g. `hack/test.sh tests/unit` or `hack/test.sh -m "not integration"`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
hack/venv.sh
echo "[test] ruff" >&2
.venv/bin/ruff check . && .venv/bin/ruff format --check .
hack/build-control-plane.sh
hack/build-kstatus.sh  # kstatus' reading of the statuses the state machines write (tests/unit/test_kstatus.py)
# The ecosystem Kiln is tested against, each from the Go module proxy (its tests skip without it, except under CI):
hack/build-helm.sh                 # Helm, for the chart (tests/unit/test_chart.py, tests/integration/test_helm.py)
hack/build-kueue.sh                # Kueue's manager, CRDs and webhooks (tests/integration/test_kueue.py)
hack/build-prometheus-operator.sh  # its CRDs and operator (tests/integration/test_prometheus_operator.py)
# The real node beside the simulated ones, and Kiln's images for it (KILN_REAL_NODE=0: simulated nodes only).
if [ "${KILN_REAL_NODE:-1}" != 0 ]; then
  hack/build-node.sh
  hack/images.sh build
fi
hack/prometheus.sh  # a real Prometheus for the canary analysis tests (they skip without it, except under CI)
# Real labelled images for the artifact tests, from Debian (they skip without it, except under CI).
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[test] installing Debian's dataset-fashion-mnist" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >&2
  else
    echo "[test] dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)" >&2
  fi
fi

# The test cluster lives in a work directory of its own; whatever happens, nothing of it survives the run.
export KILN_TEST_WORKDIR=${KILN_TEST_WORKDIR:-$(mktemp -d /tmp/kiln-test.XXXXXX)}
# What the host looks like before the cluster: links, routes, rules, mounts, cgroups, runtime dirs and processes.
hack/real-node.sh snapshot >"$KILN_TEST_WORKDIR.host-before"
cleanup() {
  KWOK_WORKDIR=$KILN_TEST_WORKDIR KILN_CLUSTER_NAME=kiln-test hack/cluster.sh down || true
  rm -rf "$KILN_TEST_WORKDIR"
}
host_left() { # what the run left on this machine (empty when nothing)
  hack/real-node.sh snapshot | diff "$KILN_TEST_WORKDIR.host-before" - | grep '^[<>]' || true
}
trap cleanup EXIT

echo "[test] pytest $*" >&2
# pytest runs in the background so that a signal reaches us at once; we pass it on as SIGTERM, which the
# test session turns into an orderly teardown (cluster deleted), then the EXIT trap checks again.
.venv/bin/python -m pytest "$@" &
pytest_pid=$!
trap 'kill -TERM $pytest_pid 2>/dev/null || true' INT TERM
rc=0
wait $pytest_pid || rc=$?
while kill -0 $pytest_pid 2>/dev/null; do rc=0; wait $pytest_pid || rc=$?; done
if [ $rc -eq 5 ]; then echo "[test] FAIL: no tests ran" >&2; exit 1; fi
left=$(pgrep -f -- "$KILN_TEST_WORKDIR/" || true)
if [ -n "$left" ]; then
  echo "[test] FAIL: control-plane processes left behind: $(ps -o pid=,args= -p ${left//$'\n'/,} | cut -c1-120)" >&2
  exit 1
fi
cleanup
trap - EXIT
left=$(host_left)
rm -f "$KILN_TEST_WORKDIR.host-before"
if [ -n "$left" ]; then
  echo "[test] FAIL: the host is not as it was before the tests (< before, > after):" >&2
  echo "$left" >&2
  exit 1
fi
exit $rc
