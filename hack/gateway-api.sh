#!/usr/bin/env bash
# Prints the path of the Gateway API's standard HTTPRoute CRD, fetched from the Go module proxy (the version pinned
# in versions.env); the ModelDeployment tests install it to check the weighted routes the operator writes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
echo "[gateway-api] sigs.k8s.io/gateway-api@v$GATEWAY_API_VERSION from the Go module proxy" >&2
dir=$(go mod download -json "sigs.k8s.io/gateway-api@v$GATEWAY_API_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
crd="$dir/config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"
test -f "$crd"
echo "$crd"
