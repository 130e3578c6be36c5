"""The manifest: its format, the artifact digest, and validation messages naming the field and the rule."""

from __future__ import annotations

import json

import pytest

from kiln_artifacts import FileEntry, InvalidManifestError, Lineage, Manifest, Producer, compute_digest, parse_manifest
from kiln_artifacts.manifest import DatasetRef, library_versions

A = "a" * 64
B = "b" * 64


def good() -> dict:
    files = [FileEntry("config.json", 10, A), FileEntry("model.safetensors", 2000, B)]
    return Manifest.build(
        files,
        kind="model",
        format="hf-transformers",
        task="text-classification",
        metrics={"eval_accuracy": 0.91, "loss": 0.23},
        lineage=Lineage(
            producer=Producer("TrainingJob", "team-a", "bert-sst2", "0b7c-uid"),
            image="ghcr.io/kiln/trainer@sha256:" + "c" * 64,
            parents=("sha256:" + "d" * 64,),
            dataset=DatasetRef("hf://stanfordnlp/sst2", "main"),
            hyperparameters={"lr": 2e-5, "epochs": 3, "schedule": {"warmup": 0.1}},
            libraries={"torch": "2.13.0", "transformers": "5.1.0"},
        ),
    ).to_dict()


def test_round_trip_and_format():
    data = good()
    m = parse_manifest(json.dumps(data))
    assert m.to_dict() == data
    assert data["manifestVersion"] == 1
    assert data["digest"].startswith("sha256:")
    assert [f["path"] for f in data["files"]] == ["config.json", "model.safetensors"]
    assert data["lineage"]["producer"] == {
        "kind": "TrainingJob",
        "namespace": "team-a",
        "name": "bert-sst2",
        "uid": "0b7c-uid",
    }
    assert m.size == 2010
    assert m.lineage.dataset == DatasetRef("hf://stanfordnlp/sst2", "main")


def test_digest_depends_on_files_only():
    files = [FileEntry("b", 1, A), FileEntry("a", 2, B)]
    d = compute_digest(files)
    assert d == compute_digest(list(reversed(files)))  # order-independent
    assert d != compute_digest([FileEntry("b", 1, A), FileEntry("a", 3, B)])  # size counts
    assert d != compute_digest([FileEntry("b", 1, B), FileEntry("a", 2, A)])  # content counts
    assert d != compute_digest([FileEntry("c", 1, A), FileEntry("a", 2, B)])  # names count
    m1 = Manifest.build(files, kind="model", format="onnx", metrics={"acc": 0.1})
    m2 = Manifest.build(files, kind="checkpoint", format="onnx", metrics={"acc": 0.9})
    assert m1.digest == m2.digest == d


def problems(data) -> list[str]:
    with pytest.raises(InvalidManifestError) as e:
        parse_manifest(data, where="s3://b/x/kiln-manifest.json")
    assert str(e.value).startswith("invalid manifest s3://b/x/kiln-manifest.json: ")
    return e.value.problems


def test_not_json_and_wrong_version():
    assert problems(b"{not json")[0].startswith("not valid JSON")
    assert problems(b"[]") == ["must be a JSON object, got list"]
    data = good()
    data["manifestVersion"] = 2
    assert problems(data) == ["manifestVersion: unsupported version 2 (this library reads 1)"]
    del data["manifestVersion"]
    assert problems(data) == ["manifestVersion: missing (this library reads 1)"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("kind"), "kind: required"),
        (lambda d: d.update(kind="weights"), 'kind: "weights" is not one of model, checkpoint, dataset'),
        (lambda d: d.update(format="HF Transformers"), 'format: "HF Transformers" must be a lowercase token'),
        (lambda d: d.update(task=7), "task: 7 must be null or a lowercase token"),
        (lambda d: d.update(createdAt="yesterday"), 'createdAt: "yesterday" must be an RFC 3339 timestamp'),
        (lambda d: d.update(files=[]), "files: must list at least one file"),
        (
            lambda d: d["files"][0].update(path="../etc/passwd"),
            "files[0].path \"../etc/passwd\": must not contain empty, '.' or '..' segments",
        ),
        (lambda d: d["files"][0].update(path="/abs"), 'files[0].path "/abs": must be relative (no leading "/")'),
        (
            lambda d: d["files"][0].update(path="kiln-manifest.json"),
            'files[0].path "kiln-manifest.json": kiln-manifest.json and names starting with ".kiln" are reserved',
        ),
        (lambda d: d["files"][1].update(path="config.json"), 'files[1].path: "config.json" is listed twice'),
        (lambda d: d["files"][0].update(size=-1), "files[0].size: must be a non-negative integer, got -1"),
        (lambda d: d["files"][0].update(size=True), "files[0].size: must be a non-negative integer, got True"),
        (
            lambda d: d["files"][1].update(sha256="XYZ"),
            "files[1].sha256: must be 64 lowercase hex characters, got 'XYZ'",
        ),
        (lambda d: d["files"][0].update(mode=420), "files[0]: unknown field(s) mode"),
        (lambda d: d.update(digest="md5:abc"), 'digest: "md5:abc" must be "sha256:" followed by 64 lowercase hex'),
        (lambda d: d.update(digest="sha256:" + "0" * 64), "digest: does not match the file list (computed sha256:"),
        (lambda d: d.update(metrics={"acc": "high"}), "metrics.acc: must be a finite number, got 'high'"),
        (lambda d: d.update(metrics={"acc": float("nan")}), "metrics.acc: must be a finite number, got nan"),
        (lambda d: d.update(extra=1), "extra: unknown field (manifest version 1 has:"),
        (
            lambda d: d["lineage"]["producer"].update(kind="trainingjob"),
            "lineage.producer.kind: must be a Kubernetes kind such as TrainingJob",
        ),
        (
            lambda d: d["lineage"]["producer"].update(namespace="Team_A"),
            "lineage.producer.namespace: must be a Kubernetes namespace name, got 'Team_A'",
        ),
        (
            lambda d: d["lineage"].update(parents=["abc"]),
            'lineage.parents: must be a list of artifact digests "sha256:<64 hex>"',
        ),
        (
            lambda d: d["lineage"].update(dataset={"revision": "x"}),
            "lineage.dataset: must be an object {uri, revision} with a non-empty uri",
        ),
        (
            lambda d: d["lineage"].update(hyperparameters={"lr": float("inf")}),
            "lineage.hyperparameters: must be plain JSON without NaN or infinity",
        ),
        (
            lambda d: d["lineage"].update(libraries={"torch": 2}),
            "lineage.libraries: must be an object of library name to version string",
        ),
        (lambda d: d["lineage"].update(image="has space"), "lineage.image: must be an image reference without spaces"),
        (lambda d: d["lineage"].update(owner="me"), "lineage.owner: unknown field"),
        (lambda d: d.update(annotations={"k": 1}), "annotations: must be an object of string keys"),
    ],
)
def test_each_rule_is_named(mutate, expected):
    data = good()
    mutate(data)
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_are_reported_at_once():
    data = good()
    data["kind"] = "weights"
    data["files"][0]["size"] = -1
    data["metrics"] = {"acc": "x"}
    found = problems(data)
    assert len(found) == 3, found


def test_a_file_cannot_also_be_a_folder():
    data = good()
    data["files"][1]["path"] = "config.json/inner"
    assert any('"config.json" is both a file and a folder' in p for p in problems(data))


def test_build_validates_metadata_too():
    with pytest.raises(InvalidManifestError, match=r"format: .* must be a lowercase token"):
        Manifest.build([FileEntry("a", 1, A)], kind="model", format="ONNX!")


def test_library_versions_reads_metadata_without_importing():
    versions = library_versions("fsspec", "surely-not-installed-package")
    assert versions["fsspec"] == "2026.9.0"
    assert "python" in versions
    assert "surely-not-installed-package" not in versions
