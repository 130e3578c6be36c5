"""The CRDs in crds/ are generated from kiln_operator.api and document themselves."""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln_operator.api import crds

REPO = Path(__file__).resolve().parents[2]
DOCS = {name: yaml.safe_load(text) for name, text in crds.render().items()}


def walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def root(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crds_dir_is_up_to_date():
    assert crds.main(["--check", str(REPO / "crds")]) == 0, "run: python -m kiln_operator.api.crds"


@pytest.mark.parametrize("name", [*DOCS])
def test_every_field_has_a_description(name: str):
    missing = [
        path
        for path, schema in walk(root(DOCS[name]), "")
        if path.startswith((".spec", ".status")) and not path.endswith(("{}", "[]")) and not schema.get("description")
    ]
    assert missing == []


@pytest.mark.parametrize("name", [*DOCS])
def test_every_rule_says_why(name: str):
    rules = [r for _, s in walk(root(DOCS[name]), "") for r in s.get("x-kubernetes-validations", [])]
    assert rules
    for r in rules:
        assert r["message"].strip(), r


@pytest.mark.parametrize("name", [*DOCS])
def test_printer_columns_point_at_declared_fields(name: str):
    declared = {path for path, _ in walk(root(DOCS[name]), "")}
    for column in DOCS[name]["spec"]["versions"][0]["additionalPrinterColumns"]:
        path = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"])  # conditions[?(@.type=="Ready")] -> conditions[]
        if path != ".metadata.creationTimestamp":
            assert path.split("[]")[0] in declared, column


def test_kinds_share_the_kiln_category_and_status_shape():
    for doc in DOCS.values():
        assert doc["spec"]["names"]["categories"] == ["kiln"]
        assert "status" in doc["spec"]["versions"][0]["subresources"]
        status = root(doc)["properties"]["status"]["properties"]
        assert {"observedGeneration", "conditions", "phase"} <= set(status)
        condition = status["conditions"]["items"]
        assert set(condition["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    scale = DOCS["kiln.dev_modeldeployments.yaml"]["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
