#!/usr/bin/env bash
# Regenerates images/server/kiln_server/proto/open_inference_pb2.py(i) from open_inference.proto with grpcio-tools
# (in the test extra). Messages only: kiln_server/grpc_service.py registers the methods itself.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/images/server/kiln_server/proto}
cd "$repo/images/server/kiln_server/proto"
"${PYTHON:-$repo/.venv/bin/python}" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" open_inference.proto
