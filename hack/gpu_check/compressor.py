"""Stage 3, the compressor: the models the trainer stage trained (or trains here, if it did not), exported by the
real program (``python -m kiln_compressor``) with its ONNX Runtime CPU parity check; the fp16 conversion (the
compressor's ``float16`` step) against fp32 on ONNX Runtime; fp16 against fp32 on CUDA through torch; and, where
the importable onnxruntime has the CUDA execution provider, the compressor's GPU target (fp16 against fp32 latency
on CUDA, placement audit). Without it the compressor must refuse a GPU target with exit 4, and the check records
why the ONNX Runtime CUDA path cannot run here.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from . import data
from .common import (
    ORT_GPU_WHEEL_MIB,
    TRAVEL_LIMIT_MIB,
    Check,
    Context,
    Skip,
    Stage,
    percentile,
    python_cmd,
    read_json,
    require,
    run,
)

TITLE = "Compressor: export, fp16, parity on ONNX Runtime and torch, the CUDA execution provider"


def run_stage(ctx: Context) -> Stage:
    stage = Stage(ctx, "compressor", TITLE)
    models: dict[str, tuple[str, str]] = {}
    for kind in ("image", "text"):
        with stage.check(f"{kind}: the trained model") as c:
            require("onnx", "onnxruntime", "onnxscript", *(("transformers", "tokenizers") if kind == "text" else ()))
            models[kind] = trained_model(ctx, kind, c)
        if kind not in models:
            continue
        model, dataset = models[kind]
        with stage.check(f"{kind}: export and ONNX Runtime CPU parity (compressor, fp32)") as c:
            _export(ctx, c, kind, model, dataset)
        with stage.check(f"{kind}: fp16 conversion against fp32 on ONNX Runtime CPU") as c:
            _fp16_onnx(ctx, c, kind, model, dataset)
        with stage.check(f"{kind}: fp16 against fp32 through torch on {'CUDA' if ctx.cuda else 'CPU'}") as c:
            _fp16_torch(ctx, c, model, dataset)
        with stage.check(f"{kind}: ONNX Runtime CUDA, fp16 against fp32 (compressor, GPU target)") as c:
            if not ctx.ort_cuda:
                raise Skip(ort_cuda_missing(ctx))
            _gpu_target(ctx, c, kind, model, dataset)
    if not ctx.ort_cuda and "image" in models:
        with stage.check("GPU target without the CUDA execution provider: refused with exit 4") as c:
            _gpu_target_refused(ctx, c, *models["image"])
    return stage


def ort_cuda_missing(ctx: Context) -> str:
    """Why the ONNX Runtime CUDA path cannot run here, with the size that keeps onnxruntime-gpu from travelling."""
    if not ctx.cuda:
        return "no CUDA"
    wheel = ctx.environment.get("ortGpuWheel") or {}
    return (
        f"onnxruntime has no CUDAExecutionProvider (the CPU build); the onnxruntime-gpu wheel is "
        f"{wheel.get('wheelMiB', ORT_GPU_WHEEL_MIB)} MiB, more than the {TRAVEL_LIMIT_MIB} MiB that may travel with "
        "the checkout: the ONNX Runtime CUDA path needs the real server image (or KILN_ORT_GPU_WHEEL)"
    )


def trained_model(ctx: Context, kind: str, c: Check) -> tuple[str, str]:
    """(model uri, dataset uri): the trainer stage's bf16 model (its default precision), any of its others, or,
    when that stage did not publish one, a short fp32 run of the trainer made here."""
    dataset = data.image_dataset(ctx)[0] if kind == "image" else data.text_dataset(ctx)
    for precision in ("bf16", "fp32", "fp16"):
        folder = ctx.work / "models" / f"{kind}-{precision}"
        if (folder / "kiln-manifest.json").is_file():
            c.figures.update(model=f"the trainer stage's {precision} run", uri=f"file://{folder}")
            return f"file://{folder}", dataset
    folder = ctx.work / "models" / f"{kind}-compressor"
    shutil.rmtree(folder, ignore_errors=True)
    s = ctx.sizes
    args = ["--dataset-uri", dataset, "--output-uri", f"file://{folder}", "--precision", "fp32", "--seed", "42"]
    if kind == "image":
        args += [
            "--max-steps",
            str(s.image_steps),
            "--batch-size",
            str(s.image_batch),
            "--learning-rate",
            str(s.image_lr),
        ]
    else:
        base, _ = data.text_base(ctx)
        args += ["--model-uri", base, "--max-steps", str(s.text_steps), "--batch-size", str(s.text_batch)]
        args += ["--learning-rate", str(s.text_lr), "--extra", f"maxSeqLength={s.text_seq}"]
    tlog = ctx.work / "models" / f"{kind}-compressor.json"
    ran = run(
        ctx, python_cmd("kiln_trainer", *args, "--termination-log", str(tlog)), f"compressor-train-{kind}", cap=120
    )
    if ran.code != 0:
        raise RuntimeError(
            f"the trainer could not make a {kind} model (exit {ran.code}): {read_json(tlog).get('message')}"
        )
    c.figures.update(model="trained here (the trainer stage published none)", uri=f"file://{folder}")
    return f"file://{folder}", dataset


def _compress(
    ctx: Context, name: str, model: str, dataset: str, steps: list[dict[str, Any]], *, gpu: bool
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Run the compressor: (run, termination message, report). The output is published to work/onnx/<name>."""
    s = ctx.sizes
    out = ctx.work / "onnx" / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = {"recipe": {"steps": steps}, "gates": {"maxAccuracyDrop": 0.02}}
    args = ["--source-uri", model, "--evaluation-uri", dataset, "--output-uri", f"file://{out}"]
    args += [
        "--evaluation-samples",
        str(s.eval_samples),
        "--batch-sizes",
        "1,32",
        "--sequence-lengths",
        str(s.text_seq),
    ]
    args += ["--iterations", str(s.bench_iterations), "--warmup", "3", "--threads", str(s.threads)]
    args += ["--report-file", str(out.parent / f"{name}-report.json")]
    args += ["--termination-log", str(out.parent / f"{name}-termination.json")]
    if gpu:
        args += ["--device", "gpu", "--execution-provider", "CUDAExecutionProvider", "--precision", "fp16"]
    env = ctx.child_env(
        KILN_COMPRESSION_SPEC=json.dumps(spec), KILN_COMPRESSOR_CACHE=str(ctx.work / "compressor-cache")
    )
    ran = run(ctx, python_cmd("kiln_compressor", *args), f"compressor-{name}", cap=240 if ctx.cuda else 60, env=env)
    return ran, read_json(out.parent / f"{name}-termination.json"), read_json(out.parent / f"{name}-report.json")


def _latency(latency: list[dict[str, Any]], batch: int) -> float | None:
    return next((float(r["p50Ms"]) for r in latency if r.get("batchSize") == batch), None)


def _export(ctx: Context, c: Check, kind: str, model: str, dataset: str) -> None:
    ran, message, rep = _compress(ctx, f"{kind}-fp32", model, dataset, [{"export": {}}], gpu=False)
    if not c.expect(ran.code == 0, f"compressor exit {ran.code}: {message.get('message') or ran.tail(500)}"):
        return
    summary = rep.get("summary") or {}
    export = next((st["facts"] for st in rep.get("steps", []) if st["step"].startswith("export")), {})
    latency = (summary.get("candidate") or {}).get("latency") or []
    c.figures.update(
        exporter=export.get("exporter"),
        parityMaxAbsDiff=export.get("parityMaxAbsDiff"),
        parityTolerance=export.get("parityTolerance"),
        agreement=summary.get("agreement"),
        maxLogitDiff=summary.get("maxLogitDiff"),
        accuracyDrop=summary.get("accuracyDrop"),
        p50MsBatch1=_latency(latency, 1),
        p50MsBatch32=_latency(latency, 32),
        sizeBytes=(summary.get("candidate") or {}).get("sizeBytes"),
        artifact=(message.get("artifact") or {}).get("uri"),
        seconds=ran.seconds,
    )
    c.expect(export.get("parityMaxAbsDiff", 1) <= export.get("parityTolerance", 0), "export parity within tolerance")
    c.expect((summary.get("agreement") or 0) >= 0.99, "top-1 agreement of ONNX Runtime with torch >= 0.99")


def _eval_inputs(ctx: Context, model: str, dataset: str) -> tuple[Any, Any, Any]:
    """(source, evaluation x, labels) with the compressor's own loaders."""
    from kiln_compressor import models

    source = models.resolve_model(model, "source.uri")
    ev = models.load_data(dataset, "evaluation.dataset.uri", source)
    if not source.text:
        source.image_shape = models.image_shape(ev)
    n = ctx.sizes.eval_samples
    return source, ev.x[:n], ev.y[:n]


def _compare(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    return {
        "maxAbsDiff": float(np.max(np.abs(a - b))),
        "agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "logitScale": float(np.max(np.abs(a))),
    }


def _fp16_onnx(ctx: Context, c: Check, kind: str, model: str, dataset: str) -> None:
    from kiln_compressor import onnx_steps

    fp32 = ctx.work / "onnx" / f"{kind}-fp32" / "model.onnx"
    if not c.expect(fp32.is_file(), "the fp32 export of the previous check"):
        return
    fp16 = ctx.work / "onnx" / f"{kind}-fp16-cpu.onnx"
    facts = onnx_steps.float16(fp32, fp16, {"keepIOTypes": True, "blockList": []})
    source, x, _ = _eval_inputs(ctx, model, dataset)
    seq = ctx.sizes.text_seq
    logits = [
        onnx_steps.onnx_logits(onnx_steps.session(p, "CPUExecutionProvider", ctx.sizes.threads), source, x, seq)
        for p in (fp32, fp16)
    ]
    cmp = _compare(*logits)
    c.figures.update(
        provider="CPUExecutionProvider",
        nodesKeptFp32=facts.get("nodesKeptFp32"),
        fp32Bytes=fp32.stat().st_size,
        fp16Bytes=fp16.stat().st_size,
        sizeRatio=round(fp16.stat().st_size / fp32.stat().st_size, 4),
        samples=len(x),
        **cmp,
    )
    # Weights go fp16 (a large model about halves; a tiny one less, its graph and fp32 IO weigh more).
    c.expect(fp16.stat().st_size < 0.9 * fp32.stat().st_size, "fp16 weights: the model is smaller")
    c.expect(cmp["agreement"] >= 0.98, f"top-1 agreement fp16/fp32 >= 0.98 (got {cmp['agreement']:.4f})")
    c.expect(cmp["maxAbsDiff"] <= 0.05 * max(1.0, cmp["logitScale"]), "fp16 logits within 5 % of the logit scale")


def _fp16_torch(ctx: Context, c: Check, model: str, dataset: str) -> None:
    import numpy as np
    import torch

    from kiln_compressor import models

    torch.set_num_threads(ctx.sizes.threads)
    device = torch.device("cuda" if ctx.cuda else "cpu")
    source, x, _ = _eval_inputs(ctx, model, dataset)
    net = models.build_torch(source).to(device)
    seq = ctx.sizes.text_seq

    def args_of(xs: Any, dtype: Any) -> list[Any]:
        f = models.feeds(source, xs, seq)
        out = [torch.from_numpy(f[n]).to(device) for n in source.input_names]
        return [t.to(dtype) if t.is_floating_point() else t for t in out]

    def logits(m: Any, dtype: Any) -> Any:
        with torch.inference_mode():
            return np.concatenate(
                [m(*args_of(x[i : i + 64], dtype)).float().cpu().numpy() for i in range(0, len(x), 64)]
            )

    def p50(m: Any, dtype: Any, batch: int) -> float:
        xs = x[:batch] if len(x) >= batch else np.concatenate([x] * (batch // len(x) + 1))[:batch]
        a = args_of(xs, dtype)
        times = []
        with torch.inference_mode():
            for i in range(ctx.sizes.bench_iterations + 3):
                t = time.perf_counter()
                m(*a)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append((time.perf_counter() - t) * 1000)
        return round(percentile(times, 50), 4)

    ref = logits(net, torch.float32)
    lat32 = {b: p50(net, torch.float32, b) for b in (1, 32)}
    half = net.half()
    got = logits(half, torch.float16)
    lat16 = {b: p50(half, torch.float16, b) for b in (1, 32)}
    cmp = _compare(ref, got)
    c.figures.update(
        device=device.type,
        samples=len(x),
        fp32P50MsBatch1=lat32[1],
        fp16P50MsBatch1=lat16[1],
        fp32P50MsBatch32=lat32[32],
        fp16P50MsBatch32=lat16[32],
        **cmp,
    )
    c.expect(cmp["agreement"] >= 0.98, f"top-1 agreement fp16/fp32 >= 0.98 (got {cmp['agreement']:.4f})")
    c.expect(cmp["maxAbsDiff"] <= 0.05 * max(1.0, cmp["logitScale"]), "fp16 logits within 5 % of the logit scale")


def _gpu_target(ctx: Context, c: Check, kind: str, model: str, dataset: str) -> None:
    ran, message, rep = _compress(ctx, f"{kind}-fp16", model, dataset, [{"export": {}}, {"float16": {}}], gpu=True)
    if not c.expect(ran.code == 0, f"compressor exit {ran.code}: {message.get('message') or ran.tail(500)}"):
        return
    summary = rep.get("summary") or {}
    src = (summary.get("source") or {}).get("latency") or []
    cand = (summary.get("candidate") or {}).get("latency") or []
    placement = next((g for g in summary.get("gates") or [] if g.get("name") == "placement"), {})
    c.figures.update(
        provider="CUDAExecutionProvider",
        fp32P50MsBatch1=_latency(src, 1),
        fp16P50MsBatch1=_latency(cand, 1),
        fp32P50MsBatch32=_latency(src, 32),
        fp16P50MsBatch32=_latency(cand, 32),
        speedup=summary.get("speedup"),
        agreement=summary.get("agreement"),
        maxLogitDiff=summary.get("maxLogitDiff"),
        nodesByProvider=summary.get("nodesByProvider"),
        cpuFallbackNodes=len(summary.get("cpuFallbackNodes") or []),
        gpuMemoryBytes=(summary.get("candidate") or {}).get("gpuMemoryBytes"),
        artifact=(message.get("artifact") or {}).get("uri"),
    )
    c.expect(placement.get("passed") is True, f"placement gate: {placement.get('message')}")
    c.expect((summary.get("agreement") or 0) >= 0.98, "top-1 agreement of fp16 on CUDA with torch fp32 >= 0.98")


def _gpu_target_refused(ctx: Context, c: Check, model: str, dataset: str) -> None:
    ran, message, _ = _compress(ctx, "image-gpu-refused", model, dataset, [{"export": {}}, {"float16": {}}], gpu=True)
    c.figures.update(exitCode=ran.code, reason=message.get("reason"), message=message.get("message"))
    c.expect(ran.code == 4, f"exit 4 (Infrastructure), got {ran.code}")
    c.expect("CUDAExecutionProvider" in (message.get("message") or ""), "the message names the missing provider")
