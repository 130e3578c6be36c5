"""The packaging rules of the foundation issue, checked where they can silently regress."""

import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ML = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers")


def test_operator_package_does_not_shadow_the_standard_library():
    code = "import operator, kiln_operator; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == Path(sysconfig.get_paths()["stdlib"])


def test_kopf_is_pinned_exactly_and_ml_libraries_are_extras():
    deps = PYPROJECT["project"]["dependencies"]
    kopf = [d for d in deps if d.startswith("kopf")]
    assert len(kopf) == 1
    assert "==" in kopf[0]
    assert tuple(int(x) for x in kopf[0].split("==")[1].split("#")[0].strip().split(".")[:2]) >= (1, 44)
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in deps}
    assert not names & set(ML)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"trainer", "compressor", "server"} <= set(extras)
    assert any(d.startswith("torch==") for d in extras["trainer"])


def test_every_image_has_a_dockerfile():
    images = {p.name for p in (REPO / "images").iterdir() if p.is_dir()}
    assert images == {"operator", "trainer", "compressor", "server"}
    for name in images:
        assert (REPO / "images" / name / "Dockerfile").is_file(), name


def test_kwok_config_keeps_the_default_stages():
    # Naming any Stage drops kwok's defaults; without pod-delete, pods hang Terminating forever.
    docs = list(yaml.safe_load_all((REPO / "hack/kwok/kwokctl.yaml").read_text()))
    stages = {d["metadata"]["name"] for d in docs if d["kind"] == "Stage"}
    assert {"node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"} <= stages
