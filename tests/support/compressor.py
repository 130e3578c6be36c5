"""Small real models and data for the compressor tests and bench/compressor.py, made with the trainer.

- text: the packaged MiniLM fine-tuned by the trainer on a synthetic labelled set (no real labelled text set is
  packaged), and that set as a jsonl dataset artifact;
- image: KilnCNN trained by the trainer on the packaged digits (idx dataset artifact).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "fine", "brilliant"]
BAD = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bland", "boring"]
THINGS = ["film", "meal", "book", "hotel", "concert", "service", "show", "trip"]
OPENERS = ["the", "our", "that", "this", "my"]


def env(tmp: Path, threads: int = 1) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        KILN_TERMINATION_LOG=str(tmp / "termination-log"),
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TMPDIR=str(tmp),  # what a killed run leaves behind stays in the test's folder
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KILN_TRAINING_SPEC", "KILN_COMPRESSION_SPEC", "KILN_OUTPUT_URI"):
        e.pop(name, None)
    return e


def text_dataset(folder: Path, n: int, seed: int) -> Path:
    """train/test jsonl with two classes: the sentiment word decides the label."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("test", n // 2)):
        lines = []
        for _ in range(count):
            label = rng.randrange(2)
            word = rng.choice(GOOD if label else BAD)
            text = f"{rng.choice(OPENERS)} {rng.choice(THINGS)} was {word}"
            lines.append(json.dumps({"text": text, "label": label}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"format": "jsonl", "classes": ["negative", "positive"]}))
    return folder


def run(cmd: list[str], tmp: Path, timeout: float = 300, threads: int = 1) -> tuple[int, dict[str, Any], str]:
    log = tmp / "termination-log"
    log.unlink(missing_ok=True)
    p = subprocess.run(cmd, env=env(tmp, threads), capture_output=True, text=True, timeout=timeout)
    message = json.loads(log.read_text()) if log.exists() else {}
    return p.returncode, message, p.stdout + p.stderr


def train_text_model(root: Path, threads: int = 1) -> tuple[str, str]:
    """(model uri, dataset uri): MiniLM fine-tuned by the trainer for one short epoch."""
    import kiln_artifacts as ka
    from kiln_artifacts import samples

    root.mkdir(parents=True, exist_ok=True)
    data = text_dataset(root / "text-data", 160, seed=3)
    dataset = ka.publish(data, f"file://{root}/text-dataset", kind="dataset", format="jsonl").uri
    base = samples.publish_minilm(f"file://{root}/minilm").uri
    out = root / "text-model"
    code, message, log = run(
        [sys.executable, "-m", "kiln_trainer", "--dataset-uri", dataset, "--model-uri", base,
         "--output-uri", f"file://{out}", "--learning-rate", "2e-4", "--batch-size", "16", "--max-steps", "10",
         "--precision", "fp32", "--extra", "maxSeqLength=16", "--eval-every-steps", "1000"],
        root, threads=threads,
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"trainer failed ({code}): {message} {log[-3000:]}")
    return f"file://{out}", dataset


def train_image_model(root: Path, threads: int = 1, steps: int = 80) -> tuple[str, str]:
    """(model uri, dataset uri): KilnCNN trained by the trainer on the packaged digits."""
    from kiln_artifacts import samples

    root.mkdir(parents=True, exist_ok=True)
    dataset = samples.publish_dataset("digits", f"file://{root}/digits").uri
    out = root / "image-model"
    code, message, log = run(
        [sys.executable, "-m", "kiln_trainer", "--dataset-uri", dataset, "--output-uri", f"file://{out}",
         "--learning-rate", "0.003", "--batch-size", "32", "--max-steps", str(steps), "--precision", "fp32",
         "--eval-every-steps", "1000"],
        root, threads=threads,
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"trainer failed ({code}): {message} {log[-3000:]}")
    return f"file://{out}", dataset


def compressor_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln_compressor", *args]


def spec(source: str, dataset: str, steps: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """A ModelCompression spec as the controller passes it (small benchmark grid for tests)."""
    s: dict[str, Any] = {
        "source": {"uri": source},
        "image": "kiln/compressor:test",
        "target": {"device": "cpu", "executionProvider": "CPUExecutionProvider", "precision": "fp32"},
        "recipe": {"steps": steps or [{"export": {}}]},
        "evaluation": {"dataset": {"uri": dataset}},
        "benchmark": {"batchSizes": [1, 4], "sequenceLengths": [16], "iterations": 10, "warmup": 2},
    }
    for key, value in extra.items():
        s[key] = value
    return s


def shared_root(tmp_path_factory: Any) -> Path:
    """One folder per test session (pytest's base temp), so models, data and the step cache are made once even
    when several test modules ask for them."""
    root = Path(tmp_path_factory.getbasetemp()) / "kiln-compressor-shared"
    root.mkdir(exist_ok=True)
    return root


def text_model(tmp_path_factory: Any) -> tuple[str, str]:
    root = shared_root(tmp_path_factory) / "text"
    if not (root / "text-model" / "kiln-manifest.json").exists():
        return train_text_model(root)
    return f"file://{root}/text-model", f"file://{root}/text-dataset"


def image_model(tmp_path_factory: Any) -> tuple[str, str]:
    root = shared_root(tmp_path_factory) / "image"
    if not (root / "image-model" / "kiln-manifest.json").exists():
        return train_image_model(root)
    return f"file://{root}/image-model", f"file://{root}/digits"


def compress(tmp: Path, s: dict[str, Any], *args: str, cache: Path | None = None) -> tuple[int, dict[str, Any]]:
    """Run the compressor in this process (no second torch import): (exit code, termination message)."""
    from kiln_compressor.pipeline import main

    tmp.mkdir(parents=True, exist_ok=True)
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(s))
    log = tmp / "termination-log"
    log.unlink(missing_ok=True)
    argv = ["--spec", str(spec_file), "--termination-log", str(log), "--threads", "1"]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    code = main([*argv, *args])
    return code, json.loads(log.read_text())


def output_names(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
