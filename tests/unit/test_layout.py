"""The packaging rules (package layout, pinned dependencies, a Dockerfile per image), checked where they can
silently regress."""

import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ML = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers")


def test_operator_package_does_not_shadow_the_standard_library():
    code = "import operator, kiln_operator; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == Path(sysconfig.get_paths()["stdlib"])


def _name(requirement: str) -> str:
    return Requirement(requirement.split("#")[0]).name.lower().replace("_", "-")


def resolved(*extras: str) -> set[str]:
    """The distribution names that ``pip install kiln[extras]`` brings: pyproject's own requirements, expanded through
    its ``kiln[...]`` references and, for what this environment has installed, through each package's metadata."""
    project = PYPROJECT["project"]
    todo = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    seen: set[str] = set()
    while todo:
        req = Requirement(todo.pop().split("#")[0])
        name = req.name.lower().replace("_", "-")
        if name == "kiln":
            todo += [r for e in req.extras for r in project["optional-dependencies"][e]]
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (onnxruntime-gpu): its own requirements are not known
        for r in requires:
            dep = Requirement(r)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in [*req.extras, ""]):
                todo.append(r)
    return seen


def test_kopf_is_pinned_exactly_in_the_operator_extra_and_ml_libraries_are_not_the_operators():
    extras = PYPROJECT["project"]["optional-dependencies"]
    kopf = [d for d in extras["operator"] if _name(d) == "kopf"]
    assert len(kopf) == 1
    assert "==" in kopf[0]
    assert tuple(int(x) for x in kopf[0].split("==")[1].split("#")[0].strip().split(".")[:2]) >= (1, 44)
    assert not {_name(d) for d in PYPROJECT["project"]["dependencies"]} & {"kopf"}  # the base goes into every image
    assert not resolved("operator") & set(ML)
    assert {"trainer", "compressor", "server"} <= set(extras)
    assert any(d.startswith("torch==") for d in extras["trainer"])


@pytest.mark.parametrize("extra", ["artifacts", "samples", "trainer", "compressor", "server"])
def test_workload_extras_do_not_pull_kopf(extra: str):
    assert "kopf" not in resolved(extra)
    assert "kopf" in resolved("operator")


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


def test_simulated_pods_get_addresses_apart_from_services_that_this_machine_routes_locally():
    import ipaddress
    import re

    docs = list(yaml.safe_load_all((REPO / "hack/kwok/kwokctl.yaml").read_text()))
    (config,) = [d for d in docs if d["kind"] == "KwokctlConfiguration"]
    (kwok,) = [p for p in config["componentsPatches"] if p["name"] == "kwok-controller"]
    args = {a["key"]: a["value"] for a in kwok["extraArgs"]}
    routes = dict(re.findall(r"^(SERVICE_CIDR|SIM_POD_CIDR)=(\S+)", (REPO / "hack/local-routes.sh").read_text(), re.M))
    pods, services = ipaddress.ip_network(args["cidr"]), ipaddress.ip_network(routes["SERVICE_CIDR"])
    assert pods == ipaddress.ip_network(routes["SIM_POD_CIDR"])
    assert not pods.overlaps(services)
    assert ipaddress.ip_address(config["options"]["kubeApiserverCertSANs"][0]) == services[1]  # the kubernetes Service
    # kwok plays only the annotated nodes: a real node's status has one writer, its kubelet.
    assert args["manage-all-nodes"] == "false"
    assert args["manage-nodes-with-annotation-selector"] == "kwok.x-k8s.io/node=fake"
    nodes = list(yaml.safe_load_all((REPO / "hack/kwok/nodes.yaml").read_text()))
    assert all(n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake" for n in nodes)
