"""The server image's Dockerfile and entrypoint, checked where they can silently regress (no Docker here)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from support.server import server_env

from kiln_server.config import Config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "images/server/Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_runtime_stage_is_gpu_capable_non_root_and_read_only_friendly():
    ins = _instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 2
    assert all(f.startswith("${CUDA_IMAGE}") for f in froms)
    base = next(rest for op, rest in ins if op == "ARG" and rest.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    runtime = ins[[i for i, (op, _) in enumerate(ins) if op == "FROM"][1] :]
    users = [rest for op, rest in runtime if op == "USER"]
    assert users == ["65532:65532"]
    env = " ".join(rest for op, rest in runtime if op == "ENV")
    for setting in ("HOME=/tmp", "TMPDIR=/tmp", "KILN_ARTIFACT_CACHE=/tmp/", "KILN_SERVER_TRT_CACHE_DIR=/tmp/"):
        assert setting in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # nothing written next to the code at run time
    assert "MALLOC_ARENA_MAX=2" in env  # bench.server --arenas: less RSS, the same throughput
    # the user is set after the last RUN (package installation needs root), before the entrypoint
    last_run = max(i for i, (op, _) in enumerate(runtime) if op == "RUN")
    assert next(i for i, (op, _) in enumerate(runtime) if op == "USER") > last_run
    assert ("ENTRYPOINT", '["python", "-m", "kiln_server"]') in runtime
    exposed = next(rest for op, rest in runtime if op == "EXPOSE").split()
    assert exposed == [str(Config.port), str(Config.grpc_port), str(Config.metrics_port)]


def test_dockerfile_installs_the_server_extra_with_onnxruntime_gpu_only():
    assert '".[server]"' in DOCKERFILE
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    assert any(d.startswith("onnxruntime-gpu==") for d in extras)
    assert not any(re.match(r"onnxruntime[=<>]", d) for d in extras)  # never both ORT wheels in one env


def test_entrypoint_runs_the_server_program():
    p = subprocess.run(
        [sys.executable, "-m", "kiln_server", "--model-uri", "file:///x", "--port", "70000"],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "--port: must be a port number" in p.stderr
