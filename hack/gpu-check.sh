#!/usr/bin/env bash
# Verifies every CUDA path of Kiln in one run (docs/gpu-check.md): the trainer in fp32/bf16/fp16 against a plain
# PyTorch loop, checkpoint/SIGTERM/resume, two ranks on one GPU, the compressor's export, fp16 and parity, and the
# server's execution provider and latency. Writes OUTDIR/gpu-check.json and OUTDIR/gpu-check.md.
#
#   hack/gpu-check.sh OUTDIR             on a GPU machine: within 8 minutes on one H100
#   hack/gpu-check.sh --dry-run OUTDIR   the same stages on the CPU with tiny sizes (a unit test runs it)
#
# Runs from a plain checkout with the machine's own Python ($PYTHON, default python3): no install step, no network.
# Further options (--only STAGES, --keep-work): hack/gpu-check.sh --help.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
roots="$repo/operator:$repo/images/trainer:$repo/images/compressor:$repo/images/server:$repo/hack"
export PYTHONPATH="$roots${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m gpu_check "$@"
