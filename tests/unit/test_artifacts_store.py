"""Publish and load through file://, pvc:// (a mounted path) and s3:// (a real S3 server on loopback)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
from support.artifacts import make_model, s3_keys

import kiln_artifacts as ka
from kiln_artifacts.storage import resolve


def corrupt(uri: str, rel: str, data: bytes | None) -> None:
    """Change one stored file behind the library's back (None: delete it)."""
    loc = resolve(uri)
    key = loc.child(rel)
    if data is None:
        loc.fs.rm_file(key)
    else:
        loc.fs.pipe_file(key, data)


def test_round_trip(store, tmp_path, cache):
    src = make_model(tmp_path / "src")
    dest = f"{store}/runs/tj-1"
    lineage = {"producer": {"kind": "TrainingJob", "namespace": "team-a", "name": "tj-1", "uid": "u-1"}}
    art = ka.publish(
        src, dest, format="hf-transformers", task="text-classification", metrics={"acc": 0.5}, lineage=lineage
    )
    assert art.uri == dest
    assert art.manifest.lineage.producer.name == "tj-1"

    loaded = ka.load(dest)
    assert loaded.digest == art.digest
    assert sorted(loaded.files) == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    for rel in loaded.files:
        assert loaded.read_bytes(rel) == (src / rel).read_bytes()
    assert ka.read_manifest(dest).metrics == {"acc": 0.5}
    assert [a.uri for a in ka.list_artifacts(store)] == [dest]
    if store.startswith("s3://"):
        assert loaded.root.parent == cache  # downloaded into the cache, keyed by digest
        assert loaded.root.name == art.digest.removeprefix("sha256:")
        assert ka.load(dest).root == loaded.root  # a second load reuses the verified copy

    # The same files again: the same artifact (idempotent); different files: refused, artifacts are immutable.
    assert ka.publish(src, dest, format="hf-transformers").digest == art.digest
    (src / "config.json").write_text("{}")
    with pytest.raises(ka.ArtifactExistsError, match=f"already holds artifact {art.digest}; artifacts are immutable"):
        ka.publish(src, dest, format="hf-transformers")
    assert ka.load(dest).digest == art.digest


@pytest.mark.parametrize(
    ("rel", "data", "message"),
    [
        ("model.safetensors", b"x" * 300_000, "file model.safetensors: sha256 mismatch: manifest"),
        ("model.safetensors", b"short", "file model.safetensors: has 5 bytes, the manifest says 300000 (truncated"),
        ("tokenizer/vocab.txt", None, "file tokenizer/vocab.txt: missing"),
        ("extra.py", b"import os", "file extra.py: present but not listed in the manifest"),
    ],
)
def test_load_detects_corruption_naming_the_file(store, tmp_path, rel, data, message, cache):
    dest = f"{store}/runs/tj-1"
    ka.publish(make_model(tmp_path / "src"), dest, format="hf-transformers")
    corrupt(dest, rel, data)
    if rel == "extra.py" and dest.startswith("s3://"):
        ka.load(dest)  # S3 downloads only the listed files: an extra object is never read
        return
    with pytest.raises(ka.IntegrityError) as e:
        ka.load(dest)
    assert message in str(e.value)
    assert e.value.path == rel
    assert str(e.value).startswith(dest)


def test_lazy_load_verifies_big_files_on_first_use(tmp_path):
    dest = f"file://{tmp_path}/store/a"
    ka.publish(make_model(tmp_path / "src"), dest, format="hf-transformers")
    # Same size, different bytes: only hashing notices.
    Path(tmp_path / "store/a/model.safetensors").write_bytes(b"y" * 300_000)
    loaded = ka.load(dest, verify="lazy", lazy_threshold=10_000)
    assert loaded.unverified == {"model.safetensors"}
    assert loaded.read_bytes("config.json")  # small files were verified eagerly
    with pytest.raises(ka.IntegrityError, match=r"file model\.safetensors: sha256 mismatch"):
        loaded.path("model.safetensors")
    with pytest.raises(ka.IntegrityError, match="file nope: not part of this artifact"):
        loaded.path("nope")


def test_lazy_load_still_checks_sizes_eagerly(tmp_path):
    dest = f"file://{tmp_path}/store/a"
    ka.publish(make_model(tmp_path / "src"), dest, format="hf-transformers")
    Path(tmp_path / "store/a/model.safetensors").write_bytes(b"y" * 10)
    with pytest.raises(ka.IntegrityError, match="has 10 bytes, the manifest says 300000"):
        ka.load(dest, verify="lazy")


def test_tampered_manifest_and_pinned_digest(tmp_path):
    dest = f"file://{tmp_path}/store/a"
    art = ka.publish(make_model(tmp_path / "src"), dest, format="hf-transformers")
    with pytest.raises(ka.IntegrityError, match=f"holds artifact {art.digest}, expected sha256:0+ \\(pinned digest\\)"):
        ka.load(dest, expected_digest="sha256:" + "0" * 64)
    manifest = tmp_path / "store/a/kiln-manifest.json"
    data = json.loads(manifest.read_text())
    data["files"][0]["sha256"] = "0" * 64  # someone "fixes" a hash without updating the digest
    manifest.write_text(json.dumps(data))
    with pytest.raises(ka.InvalidManifestError, match="digest: does not match the file list"):
        ka.load(dest)


def test_nothing_visible_without_a_manifest(store, tmp_path, cache):
    dest = f"{store}/runs/partial"
    loc = resolve(dest)
    loc.fs.mkdirs(loc.path, exist_ok=True)
    loc.fs.pipe_file(loc.child("model.safetensors"), b"half a model")
    with pytest.raises(
        ka.ArtifactNotFoundError, match=re.escape("kiln-manifest.json missing; an unfinished publish never has one")
    ):
        ka.load(dest)
    assert ka.list_artifacts(store) == []
    with pytest.raises(ka.PublishConflictError, match="not an artifact"):
        ka.publish(make_model(tmp_path / "src"), dest, format="hf-transformers")


def test_bad_publish_inputs_are_named(tmp_path):
    src = make_model(tmp_path / "src")
    with pytest.raises(ka.InvalidURIError, match='dest: invalid URI "http://x/y": unsupported scheme "http"'):
        ka.publish(src, "http://x/y", format="onnx")
    with pytest.raises(ka.ReadOnlyStoreError, match="hf:// is a read-only source"):
        ka.publish(src, "hf://org/name", format="onnx")
    with pytest.raises(ka.InvalidNameError, match="needs a folder of its own, not the root"):
        ka.publish(src, "s3://bucket", format="onnx")
    with pytest.raises(ka.InvalidNameError, match=re.escape('names starting with ".kiln" are reserved')):
        ka.publish(src, f"file://{tmp_path}/.kiln-staging/x", format="onnx")
    with pytest.raises(ka.InvalidManifestError, match='kind: "weights" is not one of'):
        ka.publish(src, f"file://{tmp_path}/out", format="onnx", kind="weights")
    with pytest.raises(ka.InvalidNameError, match='source "s3://bucket/x": must be a local folder'):
        ka.publish("s3://bucket/x", f"file://{tmp_path}/out", format="onnx")
    assert ka.publish(f"file://{src}", f"file://{tmp_path}/ok", format="onnx").uri == f"file://{tmp_path}/ok"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ka.InvalidNameError, match="has no files"):
        ka.publish(tmp_path / "empty", f"file://{tmp_path}/out", format="onnx")
    (src / "kiln-manifest.json").write_text("{}")
    with pytest.raises(
        ka.InvalidNameError, match=re.escape('source file "kiln-manifest.json": kiln-manifest.json and names')
    ):
        ka.publish(src, f"file://{tmp_path}/out", format="onnx")
    assert not (tmp_path / "out").exists()  # nothing was written for any of these


def test_s3_credentials_only_from_the_environment(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(
        ka.CredentialsError, match="S3 credentials missing: set AWS_SECRET_ACCESS_KEY in the environment"
    ):
        ka.publish(make_model(tmp_path / "src"), f"{s3_bucket}/a", format="onnx")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ka.CredentialsError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        ka.load(f"{s3_bucket}/a")


@pytest.mark.parametrize("same_files", [False, True])
def test_concurrent_publishes_of_the_same_name(store, tmp_path, cache, same_files):
    """Publishers race for one destination: one artifact results, complete, from exactly one of them."""
    n = 5
    sources = [make_model(tmp_path / f"src{i}", seed=0 if same_files else i) for i in range(n)]
    dest = f"{store}/runs/race"
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ka.publish(sources[i], dest, format="hf-transformers")
        except ka.ArtifactError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, ka.Artifact)]
    loaded = ka.load(dest)
    assert len(winners) >= 1, results
    assert {w.digest for w in winners} == {loaded.digest}
    if same_files and not store.startswith("s3://"):
        assert len(winners) == n, results  # identical content: every local publisher gets the one artifact
    for r in results:
        if not isinstance(r, ka.Artifact):
            # A loser learns why: another artifact got there first, or (S3) another publisher holds the lock.
            assert isinstance(r, ka.ArtifactExistsError | ka.PublishConflictError), r
    winner = next(i for i in range(n) if isinstance(results[i], ka.Artifact))
    for rel in loaded.files:
        assert loaded.read_bytes(rel) == (sources[winner] / rel).read_bytes()
    if store.startswith("s3://"):
        assert ".kiln-lock.json" not in {k.rsplit("/", 1)[-1] for k in s3_keys(store)}


def test_delete_is_immediate_and_complete(store, tmp_path, cache):
    dest = f"{store}/runs/a"
    art = ka.publish(make_model(tmp_path / "src"), dest, format="onnx")
    with pytest.raises(ka.ArtifactExistsError, match="not deleted"):
        ka.delete(dest, expected_digest="sha256:" + "0" * 64)
    ka.delete(dest, expected_digest=art.digest)
    with pytest.raises(ka.ArtifactNotFoundError):
        ka.read_manifest(dest)
    with pytest.raises(ka.ArtifactNotFoundError):
        ka.delete(dest)
    loc = resolve(dest)
    assert not loc.fs.exists(loc.child("model.safetensors"))


def make_hf_cache(root: Path, repo: str, commit: str, files: dict[str, bytes]) -> None:
    """The on-disk layout huggingface_hub leaves after a download (refs, snapshots), with no network."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    for rel, data in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(data)


def test_hf_source_offline_through_huggingface_hub(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    files = {"config.json": b'{"model_type": "bert"}', "model.safetensors": os.urandom(1000)}
    make_hf_cache(tmp_path / "hub", "org/tiny-bert", commit, files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ka.load("hf://org/tiny-bert", cache_dir=tmp_path / "hub")
    assert loaded.uri == f"hf://org/tiny-bert@{commit}"  # resolved to the commit: reproducible
    assert loaded.manifest.format == "hf-transformers"
    assert loaded.manifest.lineage.source == loaded.uri
    assert loaded.read_bytes("model.safetensors") == files["model.safetensors"]
    # Import it into a store: the published artifact has the same digest as the source.
    art = ka.publish(
        loaded.root, f"file://{tmp_path}/store/base", format="hf-transformers", lineage=loaded.manifest.lineage
    )
    assert art.digest == loaded.digest
    assert ka.load(f"hf://org/tiny-bert@{commit}", cache_dir=tmp_path / "hub").digest == loaded.digest
    with pytest.raises(
        ka.ArtifactNotFoundError, match=re.escape("hf://org/not-cached: not found in the local Hugging")
    ):
        ka.load("hf://org/not-cached", cache_dir=tmp_path / "hub")
