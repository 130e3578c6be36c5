"""Compression figures: fp32 ONNX vs dynamic int8 vs static int8, for a text model and an image model, one run.

    .venv/bin/python -m bench.compressor                      # CPU (and fp16 vs fp32 on CUDA when present)
    .venv/bin/python -m bench.compressor --iterations 50 --threads 2

Run from the repository root: the models are made with the tests' own helpers (tests/support/compressor.py).

Models are made with the trainer first (cached in --workdir): the packaged MiniLM fine-tuned on a synthetic
labelled set (no real labelled text set is packaged, so its accuracy delta says little) and KilnCNN trained on
Fashion-MNIST (digits when the Debian package is absent). Every figure comes from the compressor itself
(``python -m kiln_compressor``'s report): each candidate is timed interleaved with the source's plain fp32 ONNX
export on the same execution provider, so the latency ratios compare runs made at the same moments of a
machine that may be shared. Targets (CPU): int8 model.onnx <= 30 % of fp32, p50 <= 60 % of fp32 ONNX,
accuracy drop <= 1 point; GPU: fp16 p50 <= 55 % of fp32 on CUDAExecutionProvider.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tests.support import compressor as support


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def image_model(work: Path, dataset: str, threads: int) -> tuple[str, str]:
    from kiln_artifacts import samples

    root = work / f"image-{dataset}"
    out = root / "image-model"
    data = root / dataset
    if not (out / "kiln-manifest.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        if not (data / "kiln-manifest.json").exists():
            samples.publish_dataset(dataset, f"file://{data}")
        steps = "300" if dataset == "fashion-mnist" else "100"
        code, message, log = support.run(
            [sys.executable, "-m", "kiln_trainer", "--dataset-uri", f"file://{data}", "--output-uri", f"file://{out}",
             "--learning-rate", "0.002", "--batch-size", "64", "--max-steps", steps, "--precision", "fp32",
             "--eval-every-steps", "100000"],
            root, threads=threads, timeout=900,
        )  # fmt: skip
        if code:
            raise SystemExit(f"trainer failed: {message} {log[-2000:]}")
    return f"file://{out}", f"file://{data}"


def text_model(work: Path, threads: int) -> tuple[str, str]:
    root = work / "text"
    if not (root / "text-model" / "kiln-manifest.json").exists():
        return support.train_text_model(root, threads=threads)
    return f"file://{root}/text-model", f"file://{root}/text-dataset"


def compress(work: Path, name: str, s: dict[str, Any], threads: int) -> dict[str, Any]:
    from kiln_compressor.pipeline import main

    tmp = work / "runs" / name
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.json").write_text(json.dumps(s))
    report = tmp / "report.json"
    t0 = time.monotonic()
    code = main(["--spec", str(tmp / "spec.json"), "--report-file", str(report), "--threads", str(threads),
                 "--cache-dir", str(work / "cache"), "--termination-log", str(tmp / "termination-log")])  # fmt: skip
    if code:
        raise SystemExit(f"{name}: compressor exit {code}: {(tmp / 'termination-log').read_text()}")
    r = json.loads(report.read_text())
    say(f"{name}: done in {time.monotonic() - t0:.0f}s (load {load()})")
    return r


def cell(measured: dict[str, Any], batch: int) -> dict[str, Any]:
    return next(c for c in measured["latency"] if c["batchSize"] == batch)


def rows_for(label: str, reports: dict[str, dict[str, Any]], batches: list[int]) -> list[dict[str, Any]]:
    """One row for the fp32 export (from the first run's source column), one per variant; every ratio is against
    the fp32 export timed interleaved in the same compressor run."""
    out = []
    first = next(iter(reports.values()))
    fs = first["summary"]
    fp32_size = first["source"]["onnxFp32SizeBytes"]
    base: dict[str, Any] = {
        "model": label,
        "variant": "fp32 ONNX" if "fp16" not in next(iter(reports)) else "fp32 ONNX (CUDA)",
        "model.onnx MB": round(fp32_size / 1e6, 2),
        "size ratio": 1.0,
        "accuracy": round(fs["source"]["metric"], 4),
        "acc delta (pt)": 0.0,
        "agreement": 1.0,
    }
    for b in batches:
        src = cell(fs["source"], b)
        base[f"p50 ms b{b}"] = src["p50Ms"]
        base[f"p95 ms b{b}"] = src["p95Ms"]
        base[f"p50 ratio b{b}"] = 1.0
        base[f"p95 ratio b{b}"] = 1.0
    out.append(base)
    for variant, r in reports.items():
        s = r["summary"]
        model_bytes = r["files"]["model.onnx"]
        row: dict[str, Any] = {
            "model": label,
            "variant": variant,
            "model.onnx MB": round(model_bytes / 1e6, 2),
            "size ratio": round(model_bytes / fp32_size, 3),
            "accuracy": round(s["candidate"]["metric"], 4),
            "acc delta (pt)": round(-100 * s["accuracyDrop"], 2),
            "agreement": round(s["agreement"], 4),
        }
        for b in batches:
            src, cand = cell(s["source"], b), cell(s["candidate"], b)
            row[f"p50 ms b{b}"] = cand["p50Ms"]
            row[f"p95 ms b{b}"] = cand["p95Ms"]
            row[f"p50 ratio b{b}"] = round(cand["p50Ms"] / src["p50Ms"], 3)
            row[f"p95 ratio b{b}"] = round(cand["p95Ms"] / src["p95Ms"], 3)
        out.append(row)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "kiln-bench-compressor"))
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--with-optimized-fp32", action="store_true", help="also the optimized fp32 ONNX (one more run)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1: steadier when shared)")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--calibration-samples", type=int, default=256)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"load average at start: {load()} ({os.cpu_count()} CPUs); onnxruntime {ort.__version__}, "
        f"providers {ort.get_available_providers()}")  # fmt: skip
    dataset = "fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "digits"
    say("models: fine-tuning MiniLM (text) and training KilnCNN (image) with the trainer, or reusing them")
    text_uri, text_data = text_model(work, args.threads)
    image_uri, image_data = image_model(work, dataset, args.threads)
    batches = [1, 32]
    bench = {"batchSizes": batches, "sequenceLengths": [args.sequence_length], "iterations": args.iterations,
             "warmup": args.warmup}  # fmt: skip
    int8 = {"device": "cpu", "executionProvider": "CPUExecutionProvider", "precision": "int8"}
    rows: list[dict[str, Any]] = []
    models = [("text MiniLM", text_uri, text_data), (f"image KilnCNN/{dataset}", image_uri, image_data)]
    for label, uri, data in models:
        text = label.startswith("text")
        cal = {"dataset": {"uri": data}, "samples": args.calibration_samples, "method": "MinMax"}
        # The fp32 ONNX row is the source column of the int8 runs (its plain export, timed alongside them).
        variants: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] = {
            "int8 dynamic": (
                [{"export": {}}, *([{"optimize": {}}] if text else []), {"quantize": {"mode": "Dynamic"}}],
                int8,
            ),
            "int8 static QDQ": (
                [{"export": {}}, {"quantize": {"mode": "Static", "perChannel": True, "calibration": cal}}],
                int8,
            ),
        }
        if args.with_optimized_fp32:
            variants["fp32 ONNX optimized"] = ([{"export": {}}, {"optimize": {}}], {"precision": "fp32"})
        reports = {}
        for variant, (steps, target) in variants.items():
            say(f"{label}: {variant}: {[next(iter(s)) for s in steps]}")
            s = support.spec(uri, data, steps, target={**int8, **target}, benchmark=bench)
            r = compress(work, f"{label.split()[0]}-{variant.replace(' ', '-')}", s, args.threads)
            reports[variant] = r
        rows += rows_for(label, reports, batches)
    gpu_rows: list[dict[str, Any]] = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # The fp16 candidate is timed interleaved with the fp32 export on CUDA: its ratios are fp16 / fp32.
        gpu = {"device": "gpu", "executionProvider": "CUDAExecutionProvider", "precision": "fp16"}
        for label, uri, data in models:
            say(f"{label}: fp16 on CUDAExecutionProvider")
            steps = [{"export": {}}, {"optimize": {}}, {"float16": {}}]
            s = support.spec(uri, data, steps, target=gpu, benchmark=bench)
            r = compress(work, f"{label.split()[0]}-fp16-cuda", s, args.threads)
            gpu_rows += rows_for(label, {"fp16 (CUDA)": r}, batches)
    print()
    say(f"all runs done in {time.monotonic() - started:.0f}s; load average at end: {load()}")
    print(f"\nCPU, ONNX Runtime CPUExecutionProvider, {args.threads} intra-op thread(s), text sequence length "
          f"{args.sequence_length}, {args.iterations} timed runs per cell; ratios against the fp32 ONNX export "
          "timed interleaved in the same run\n")  # fmt: skip
    print_table(rows)
    if gpu_rows:
        print("\nGPU, CUDAExecutionProvider (IO binding):\n")
        print_table(gpu_rows)
    else:
        print("\nGPU: no CUDAExecutionProvider here (onnxruntime-gpu and a GPU needed): fp16 row not measured.")
    print("\nTargets: int8 size ratio <= 0.30, int8 p50 ratio <= 0.60, accuracy delta >= -1 point; fp16 (CUDA) "
          "p50 ratio <= 0.55")  # fmt: skip
    for r in rows + gpu_rows:
        if r["variant"].startswith("int8"):
            checks = {
                "size": r["size ratio"] <= 0.30,
                "p50 b1": r["p50 ratio b1"] <= 0.60,
                "p50 b32": r["p50 ratio b32"] <= 0.60,
                "accuracy": r["acc delta (pt)"] >= -1.0,
            }
        elif r["variant"].startswith("fp16"):
            checks = {"p50 b1": r["p50 ratio b1"] <= 0.55, "p50 b32": r["p50 ratio b32"] <= 0.55}
        else:
            continue
        verdict = ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items())
        print(f"  {r['model']:<28} {r['variant']:<18} {verdict}")


if __name__ == "__main__":
    main()
