"""Real compression on CPU of KilnCNN trained by the trainer on the packaged digits: static and dynamic int8, the
report's numbers recomputed here, gates that pass and reject, auto mode, pruning, distillation, the step cache,
bad inputs (message + exit code, before any export) and a SIGKILL during publishing."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import numpy as np
from support.compressor import compress, compressor_cmd, env, image_model, shared_root, spec
from support.trainer import GRAY_SIGNALS, published_profile

import kiln_artifacts as ka
from kiln_artifacts import profile, samples
from kiln_artifacts.contract import ExitCode

STATIC = {"quantize": {"mode": "Static", "perChannel": True, "calibration": {"dataset": {"uri": ""}, "samples": 128}}}
INT8 = {"device": "cpu", "executionProvider": "CPUExecutionProvider", "precision": "int8"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, data = image_model(tmp_path_factory)
    return {"model": model, "data": data, "cache": shared_root(tmp_path_factory) / "cache"}


def static_steps(data: str) -> list[dict[str, Any]]:
    step = json.loads(json.dumps(STATIC))
    step["quantize"]["calibration"]["dataset"]["uri"] = data
    return [{"export": {}}, {"optimize": {}}, step]


@pytest.fixture(scope="module")
def static_run(image: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("static")
    out = tmp / "candidate"
    s = spec(image["model"], image["data"], static_steps(image["data"]), target=INT8, gates={"maxAccuracyDrop": 0.02})
    code, message = compress(tmp, s, "--output-uri", f"file://{out}", cache=image["cache"])
    return {"code": code, "message": message, "out": out}


def reference_logits(model_uri: str, images: np.ndarray) -> np.ndarray:
    """The source model's logits computed here, from its safetensors, without the compressor's code."""
    import torch
    from safetensors.torch import load_file

    from kiln_artifacts.models import KilnCNN

    folder = ka.load(model_uri).root
    config = json.loads((folder / "config.json").read_text())
    model = KilnCNN(config["num_classes"], config["in_channels"], config["width"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        x = torch.from_numpy(np.array(images)).float().unsqueeze(1) / 127.5 - 1
        return model.eval()(x).numpy()


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (images.astype(np.float32) / 127.5 - 1)[:, None]
    return sess.run(["logits"], {"pixel_values": x})[0]


def test_static_int8_is_published_with_manifest_lineage_and_contract(static_run: dict[str, Any], image: dict) -> None:
    assert static_run["code"] == ExitCode.SUCCEEDED, static_run["message"]
    msg = static_run["message"]
    art = ka.load(f"file://{static_run['out']}")
    assert msg["artifact"] == {"uri": art.uri, "digest": art.digest}
    assert msg["gatesPassed"] is True
    m = art.manifest
    assert (m.kind, m.format, m.task) == ("model", "onnx", "image-classification")
    assert set(art.files) == {"model.onnx", "kiln-model.json", "kiln-report.json", "kiln-profile.json"}
    assert m.lineage.parents == (ka.load(image["model"]).digest,)
    assert m.lineage.dataset.uri == image["data"]
    assert m.lineage.hyperparameters["recipe"][2]["quantize"]["mode"] == "Static"
    assert {"onnxruntime", "onnx", "torch"} <= set(m.lineage.libraries)
    info = json.loads(art.path("kiln-model.json").read_text())
    assert info == {"task": "image-classification", "labels": [str(i) for i in range(10)], "precision": "int8",
                    "imageShape": [1, 8, 8]}  # fmt: skip
    import onnx

    model = onnx.load(str(art.path("model.onnx")))
    (inp,) = model.graph.input
    assert inp.name == "pixel_values"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    # int8 weights: per-channel conv weights stored as int8 initializers
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in model.graph.initializer)
    prof = published_profile(art.uri, "image-classification", 359, GRAY_SIGNALS)
    assert prof.signals["prediction"].labels == tuple(info["labels"])
    assert {k: prof.source[k] for k in ("outputs", "candidate", "precision", "runtime", "split")} == {
        "outputs": "candidate", "candidate": "recipe", "precision": "int8", "runtime": "onnxruntime", "split": "test"
    }  # fmt: skip


def test_a_retry_finds_its_artifact_and_another_spec_is_refused(static_run: dict[str, Any], image: dict) -> None:
    """A Job retried after its first attempt published returns that artifact; another compression aimed at the
    same location is refused before any work."""
    out = static_run["out"]
    same = spec(
        image["model"], image["data"], static_steps(image["data"]), target=INT8, gates={"maxAccuracyDrop": 0.02}
    )
    code, message = compress(out.parent / "retry", same, "--output-uri", f"file://{out}", cache=out.parent / "c1")
    assert code == ExitCode.SUCCEEDED, message
    assert message["message"] == f"already published by an earlier attempt: file://{out}"
    assert message["artifact"] == static_run["message"]["artifact"]
    assert message["report"] == static_run["message"]["report"]
    other = spec(
        image["model"], image["data"], static_steps(image["data"]), target=INT8, gates={"maxAccuracyDrop": 0.5}
    )
    code, message = compress(out.parent / "other", other, "--output-uri", f"file://{out}", cache=out.parent / "c2")
    assert code == ExitCode.USER_ERROR
    assert message["message"].startswith(f"--output-uri file://{out}: already holds another artifact (sha256:")
    assert not (out.parent / "c1").exists()
    assert not (out.parent / "c2").exists()  # decided before any step ran


def test_report_numbers_recomputed_independently(static_run: dict[str, Any], image: dict) -> None:
    art = ka.load(f"file://{static_run['out']}")
    report = json.loads(art.path("kiln-report.json").read_text())
    s = report["summary"]
    x, y = samples.load_idx_dataset(ka.load(image["data"]).root, "test")
    src = reference_logits(image["model"], x)
    cand = onnx_logits(art.path("model.onnx"), x)
    assert s["source"]["metric"] == pytest.approx(float(np.mean(src.argmax(1) == y)), abs=1e-9)
    assert s["candidate"]["metric"] == pytest.approx(float(np.mean(cand.argmax(1) == y)), abs=1e-9)
    assert s["agreement"] == pytest.approx(float(np.mean(src.argmax(1) == cand.argmax(1))), abs=1e-9)
    assert s["maxLogitDiff"] == pytest.approx(float(np.abs(src - cand).max()), rel=1e-3, abs=1e-4)
    assert s["accuracyDrop"] == pytest.approx(s["source"]["metric"] - s["candidate"]["metric"], abs=1e-6)
    assert s["candidate"]["metric"] > 0.85
    assert s["accuracyDrop"] <= 0.02
    # The profile is the candidate's: its predictions, and the pixels a client sends (x / 127.5 - 1).
    prof = profile.Profile.read(art.path(profile.PROFILE_FILE))
    assert list(prof.signals["prediction"].counts) == np.bincount(cand.argmax(1), minlength=10).tolist()
    pixels = (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0))[:, None]
    expected = profile.build("image-classification", profile.image_features(pixels), labels=[])
    for name in ("channel0_mean", "channel0_std"):
        assert prof.signals[name] == expected.signals[name], name
    served = ("model.", "kiln-model", "kiln-profile")
    files = {p.name: p.stat().st_size for p in art.root.iterdir() if p.name.startswith(served)}
    assert s["candidate"]["sizeBytes"] == sum(files.values())
    assert s["source"]["sizeBytes"] == ka.load(image["model"]).manifest.size
    assert s["sizeRatio"] == pytest.approx(s["candidate"]["sizeBytes"] / s["source"]["sizeBytes"], rel=1e-5)
    assert files["model.onnx"] <= 0.3 * report["source"]["onnxFp32SizeBytes"]  # int8 weights: under 30 % of fp32
    ref = s["candidate"]["latency"][0]
    assert (ref["batchSize"], s["p95Ms"]) == (1, ref["p95Ms"])
    assert s["speedup"] == pytest.approx(s["source"]["latency"][0]["p95Ms"] / ref["p95Ms"], rel=1e-3)
    assert [(c["batchSize"], c["sequenceLength"]) for c in s["candidate"]["latency"]] == [(1, 0), (4, 0)]
    for c in s["candidate"]["latency"]:
        assert 0 < c["p50Ms"] <= c["p95Ms"] <= c["p99Ms"]
        assert c["throughput"] > 0
    assert s["nodesByProvider"]["CPUExecutionProvider"] > 0
    assert s["cpuFallbackNodes"] == []
    assert s["candidate"]["sessionStartSeconds"] > 0
    assert [g["name"] for g in s["gates"]] == ["maxAccuracyDrop"]
    assert s["gates"][0]["passed"]
    assert static_run["message"]["report"]["agreement"] == s["agreement"]
    steps = report["steps"]
    assert steps[0]["facts"]["parityMaxAbsDiff"] <= 1e-4
    assert steps[2]["facts"]["calibrationSamples"] == 128


def test_gates_reject_and_the_candidate_says_why(image: dict, tmp_path: Path) -> None:
    s = spec(
        image["model"], image["data"], static_steps(image["data"]), target=INT8,
        gates={"maxAccuracyDrop": 0.02, "maxSizeBytes": 1000, "maxP95LatencyMs": 1e-6, "minSpeedup": 1000},
    )  # fmt: skip
    code, message = compress(tmp_path, s, "--output-uri", f"file://{tmp_path}/out", cache=image["cache"])
    assert code == ExitCode.SUCCEEDED, message  # the verdict is the controller's to act on
    assert message["gatesPassed"] is False
    assert "gates FAILED: maxP95LatencyMs, minSpeedup, maxSizeBytes" in message["message"]
    gates = {g["name"]: g for g in message["report"]["gates"]}
    assert gates["maxAccuracyDrop"]["passed"] is True
    assert gates["maxSizeBytes"]["passed"] is False
    assert gates["maxSizeBytes"]["threshold"] == 1000
    assert gates["maxSizeBytes"]["message"].startswith(f"artifact {gates['maxSizeBytes']['value']} bytes > 1000")
    assert gates["minSpeedup"]["passed"] is False
    art = ka.load(f"file://{tmp_path}/out")
    assert art.manifest.annotations["kiln.dev/gates-passed"] == "false"


def test_dynamic_int8_and_the_step_cache(image: dict, tmp_path: Path) -> None:
    steps = [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]
    s = spec(image["model"], image["data"], steps, target=INT8)
    code, first = compress(tmp_path / "a", s, "--report-file", str(tmp_path / "a.json"), cache=image["cache"])
    assert code == ExitCode.SUCCEEDED, first
    code, second = compress(tmp_path / "b", s, "--report-file", str(tmp_path / "b.json"), cache=image["cache"])
    assert code == ExitCode.SUCCEEDED, second
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert r2["cache"] == {"hits": r1["cache"]["hits"] + r1["cache"]["misses"], "misses": 0}  # nothing redone
    assert all(st["cached"] for st in r2["steps"])
    assert r1["steps"][1]["facts"]["quantizedOps"].get("ConvInteger", 0) > 0
    assert r2["summary"]["candidate"]["metric"] == r1["summary"]["candidate"]["metric"]


def test_auto_picks_the_smallest_passing_candidate(image: dict, tmp_path: Path) -> None:
    s = spec(image["model"], image["data"], target=INT8, gates={"maxAccuracyDrop": 0.03})
    s["recipe"] = {"auto": {"objective": "Smallest", "maxCandidates": 3}}
    code, message = compress(tmp_path, s, "--report-file", str(tmp_path / "r.json"), cache=image["cache"])
    assert code == ExitCode.SUCCEEDED, message
    report = json.loads((tmp_path / "r.json").read_text())
    cands = report["auto"]["candidates"]
    assert [c["name"] for c in cands] == ["int8-static", "int8-static-per-channel", "int8-dynamic-optimized"]
    passing = [c for c in cands if c["passed"]]
    assert passing
    best = min(passing, key=lambda c: c["sizeBytes"])
    assert report["candidate"] == message["candidate"] == best["name"]
    assert report["precision"] == "int8"


def test_pruning_magnitude_and_structured(image: dict, tmp_path: Path) -> None:
    for method, sparsity in (("Magnitude", 0.5), ("Structured", 0.5)):
        steps = [{"export": {}}, {"prune": {"method": method, "sparsity": sparsity}}]
        s = spec(image["model"], image["data"], steps)
        code, message = compress(tmp_path / method, s, "--report-file", str(tmp_path / f"{method}.json"))
        assert code == ExitCode.SUCCEEDED, message
        report = json.loads((tmp_path / f"{method}.json").read_text())
        facts = report["steps"][0]["facts"]
        assert facts["method"] == method
        if method == "Magnitude":
            assert facts["zeroFraction"] == pytest.approx(0.5, abs=0.02)  # dense shapes, half the weights zero
            assert facts["parametersAfter"] == facts["parametersBefore"]
        else:  # channels removed for real: fewer parameters in the exported graph
            assert facts["parametersAfter"] < 0.5 * facts["parametersBefore"]
            assert report["summary"]["candidate"]["parameters"] < 0.5 * report["summary"]["source"]["parameters"]
        assert report["steps"][1]["facts"]["parityMaxAbsDiff"] <= 1e-4  # the pruned model exports faithfully


def test_distillation_into_a_smaller_student(image: dict, tmp_path: Path) -> None:
    from kiln_artifacts.models import KilnCNN
    from kiln_trainer.models import save_model

    student = KilnCNN(10, width=8)
    folder = tmp_path / "student-files"
    save_model(student, folder, [str(i) for i in range(10)], None)
    student_art = ka.publish(folder, f"file://{tmp_path}/student", format="safetensors", task="image-classification")
    steps = [{"export": {}}, {"distill": {"student": {"uri": student_art.uri}, "dataset": {"uri": image["data"]},
                                          "maxSteps": 150, "temperature": 2.0, "alpha": 0.5}}]  # fmt: skip
    s = spec(image["model"], image["data"], steps, gates={"maxAccuracyDrop": 0.15})
    out = tmp_path / "out"
    code, message = compress(tmp_path, s, "--output-uri", f"file://{out}")
    assert code == ExitCode.SUCCEEDED, message
    art = ka.load(f"file://{out}")
    assert art.manifest.lineage.parents == (ka.load(image["model"]).digest, student_art.digest)
    report = json.loads(art.path("kiln-report.json").read_text())
    facts = report["steps"][0]["facts"]
    assert facts["studentParameters"] < facts["teacherParameters"] / 4
    s_ = report["summary"]
    assert s_["candidate"]["parameters"] < s_["source"]["parameters"] / 4
    assert s_["candidate"]["metric"] > 0.6, s_  # learnt from the teacher in 150 steps (chance: 0.1)
    assert s_["gates"][0]["passed"] is (s_["accuracyDrop"] <= 0.15)


def test_bad_inputs_fail_early_with_their_field_and_exit_code(image: dict, tmp_path: Path) -> None:
    minilm = samples.publish_minilm(f"file://{tmp_path}/minilm").uri if _has_minilm() else None
    text_data = tmp_path / "text-data"
    from support.compressor import text_dataset

    text_dataset(text_data, 8, seed=1)
    cache = tmp_path / "cache"
    cases: list[tuple[dict[str, Any], int, str]] = [
        (
            spec(image["model"], f"file://{text_data}"),
            ExitCode.USER_ERROR,
            f"evaluation.dataset.uri file://{text_data}: holds text-classification data, the source model does "
            "image-classification",
        ),
        (
            spec(
                image["model"],
                image["data"],
                [
                    {"export": {}},
                    {"quantize": {"mode": "Static", "calibration": {"dataset": {"uri": f"file://{text_data}"}}}},
                ],
                target=INT8,
            ),
            ExitCode.USER_ERROR,
            "recipe.steps[1].quantize.calibration.dataset.uri file://",
        ),
        (
            spec(
                image["model"],
                image["data"],
                target={"device": "gpu", "executionProvider": "CUDAExecutionProvider", "precision": "fp32"},
            ),
            ExitCode.INFRASTRUCTURE,
            "target.executionProvider: CUDAExecutionProvider is not available",
        ),
        (
            spec(image["data"], image["data"]),
            ExitCode.USER_ERROR,
            f"source.uri {image['data']}: is a dataset artifact, not a model",
        ),
    ]
    pinned = spec(image["model"], image["data"])
    pinned["source"]["digest"] = "sha256:" + "0" * 64
    cases.append((pinned, ExitCode.USER_ERROR, "expected sha256:" + "0" * 64 + " (pinned digest)"))
    if minilm:
        cases.append(
            (spec(minilm, f"file://{text_data}"), ExitCode.USER_ERROR, f"source.uri {minilm}: task feature-extraction")
        )
    for i, (s, code_expected, text) in enumerate(cases):
        code, message = compress(tmp_path / f"case{i}", s, cache=cache)
        assert code == code_expected, message
        assert message["exitCode"] == code_expected
        assert text in message["message"], message
        assert "\n" not in message["message"]
    assert not cache.exists()  # rejected before anything was exported


def test_step_checks_fail_with_the_parity_exit_code(image: dict, tmp_path: Path) -> None:
    cases = [
        ([{"export": {"parityTolerance": 1e-12}}], "recipe export.parityTolerance: ONNX logits differ"),
        ([{"export": {}}, {"optimize": {"expectFusions": ["Attention"]}}], "recipe.steps[1].optimize.expectFusions: "
                                                                           "Attention did not appear"),
    ]  # fmt: skip
    for i, (steps, text) in enumerate(cases):
        code, message = compress(tmp_path / str(i), spec(image["model"], image["data"], steps))
        assert (code, message["reason"]) == (ExitCode.PARITY_CHECK, "ParityCheck"), message
        assert text in message["message"]


def test_sigkill_while_publishing_leaves_no_partial_artifact(image: dict, tmp_path: Path) -> None:
    """Killed at the first file copied into the store: nothing or a complete artifact is visible, never a part;
    the rerun reuses the cached steps and publishes."""
    s = spec(image["model"], image["data"], static_steps(image["data"]), target=INT8)
    (tmp_path / "spec.json").write_text(json.dumps(s))
    out = tmp_path / "store" / "candidate"
    args = ["--spec", str(tmp_path / "spec.json"), "--output-uri", f"file://{out}", "--threads", "1",
            "--cache-dir", str(image["cache"])]  # fmt: skip
    p = subprocess.Popen(compressor_cmd(*args), env=env(tmp_path), stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "publish: file" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "".join(seen[-20:])
    try:
        art = ka.load(f"file://{out}")  # complete and verified, if the commit got through before the kill
    except ka.ArtifactNotFoundError:
        assert not out.exists() or not any(out.iterdir())
    else:
        assert "model.onnx" in art.files
    assert len(ka.list_artifacts(f"file://{tmp_path}/store")) <= 1
    p2 = subprocess.run(compressor_cmd(*args, "--termination-log", str(tmp_path / "tl")), env=env(tmp_path),
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p2.returncode == 0, p2.stderr[-3000:]
    message = json.loads((tmp_path / "tl").read_text())
    assert ka.load(f"file://{out}").digest == message["artifact"]["digest"]


def _has_minilm() -> bool:
    try:
        samples.minilm_dir()
        return True
    except Exception:
        return False


def test_28x28_images_export_through_the_dynamo_fallback(tmp_path: Path) -> None:
    """KilnCNN on 28x28 (Fashion-MNIST's size) pools 14x14 to 4x4, which the TorchScript exporter cannot express:
    the export falls back to dynamo and still passes the parity check on other batch sizes."""
    from kiln_artifacts.models import KilnCNN
    from kiln_trainer.models import save_model

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 40), ("test", 24)):
        image_file, label_file = samples.IDX_FILES[split]
        samples.write_idx(data / image_file, (n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
        samples.write_idx(data / label_file, (n,), bytes(int(v) for v in rng.integers(0, 10, n)))
    (data / "dataset.json").write_text(json.dumps({"format": "idx", "classes": [str(i) for i in range(10)]}))
    dataset = ka.publish(data, f"file://{tmp_path}/dataset", kind="dataset", format="idx").uri
    save_model(KilnCNN(10, width=8), tmp_path / "model", [str(i) for i in range(10)], None)
    model = ka.publish(tmp_path / "model", f"file://{tmp_path}/m", format="safetensors", task="image-classification")
    out = tmp_path / "out"
    code, message = compress(tmp_path, spec(model.uri, dataset), "--output-uri", f"file://{out}")
    assert code == ExitCode.SUCCEEDED, message
    art = ka.load(f"file://{out}")
    facts = json.loads(art.path("kiln-report.json").read_text())["steps"][0]["facts"]
    assert facts["exporter"] == "torch.onnx (dynamo)"
    assert facts["parityMaxAbsDiff"] <= 1e-4
    assert json.loads(art.path("kiln-model.json").read_text())["imageShape"] == [1, 28, 28]
    assert message["report"]["agreement"] == 1.0
