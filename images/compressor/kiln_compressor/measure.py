"""Measurements: the metric, agreement and logit difference on held-out data; latency over the benchmark grid,
session start time, peak memory and which execution provider ran each node."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .models import Source
from .onnx_steps import HEAVY_OPS, session


def metric_value(metric: str, logits: Any, labels: Any, reference: Any | None) -> float:
    """accuracy, macro f1, or top1Agreement with the reference logits (the source's)."""
    import numpy as np

    pred = logits.argmax(-1)
    if metric == "top1Agreement":
        return float(np.mean(pred == reference.argmax(-1))) if reference is not None else 1.0
    if metric == "f1":
        scores = []
        for c in np.unique(np.concatenate([labels, pred])):
            tp = np.sum((pred == c) & (labels == c))
            fp, fn = np.sum((pred == c) & (labels != c)), np.sum((pred != c) & (labels == c))
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return float(np.mean(scores))
    return float(np.mean(pred == labels))


def compare(metric: str, source_logits: Any, candidate_logits: Any, labels: Any) -> dict[str, float]:
    import numpy as np

    return {
        "sourceMetric": metric_value(metric, source_logits, labels, None),
        "metric": metric_value(metric, candidate_logits, labels, source_logits),
        "agreement": float(np.mean(source_logits.argmax(-1) == candidate_logits.argmax(-1))),
        "maxLogitDiff": float(np.max(np.abs(source_logits - candidate_logits))),
    }


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process, from /proc (0, 0 where there is none)."""
    cur = peak = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return cur, peak


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def grid_inputs(source: Source, names: Sequence[str], batch: int, length: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    if source.text:
        vocab = int(source.config.get("vocab_size", 1000))
        f = {"input_ids": rng.integers(1000 if vocab > 2000 else 1, vocab, size=(batch, length), dtype=np.int64)}
        f["attention_mask"] = np.ones((batch, length), dtype=np.int64)
        f["token_type_ids"] = np.zeros((batch, length), dtype=np.int64)
        return {n: f[n] for n in names}
    shape = source.image_shape or (1, 8, 8)
    return {"pixel_values": rng.standard_normal((batch, *shape), dtype=np.float32)}


class _Runner:
    """Runs a session; on CUDA with IO binding (inputs copied to the device once, outputs left there)."""

    def __init__(self, sess: Any, provider: str) -> None:
        self.sess = sess
        self.gpu = provider != "CPUExecutionProvider" and sess.get_providers()[0] != "CPUExecutionProvider"

    def prepare(self, feed: dict[str, Any]) -> Any:
        if not self.gpu:
            return feed
        import onnxruntime as ort

        binding = self.sess.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output("logits", "cuda", 0)
        return binding

    def run(self, prepared: Any) -> None:
        if self.gpu:
            self.sess.run_with_iobinding(prepared)
            prepared.synchronize_outputs()
        else:
            self.sess.run(["logits"], prepared)


def benchmark(
    models: Sequence[tuple[Path, Source]],
    provider: str,
    batch_sizes: Sequence[int],
    lengths: Sequence[int],
    iterations: int,
    warmup: int,
    threads: int,
) -> list[dict[str, Any]]:
    """Latency p50/p95/p99 and throughput per cell, session start and peak memory, for each model.

    The models are timed interleaved (one run of each in turn, per cell), so that a machine shared with other
    work, clock changes and cache effects weigh on all of them alike; ratios between them are what is compared.
    Peak memory is the growth of this process's resident set (and of GPU memory, where there is one) from before
    the session is created to after a run of the largest cell, measured for each model alone before the timing."""
    import numpy as np

    runners, out = [], []
    largest = (max(batch_sizes), max(lengths))
    for path, source in models:
        reset = _reset_peak()
        base, _ = _rss()
        gpu_before = _gpu_used()
        t0 = time.perf_counter()
        sess = session(path, provider, threads)
        start_s = time.perf_counter() - t0
        runner = _Runner(sess, provider)
        names = tuple(i.name for i in sess.get_inputs())
        runner.run(runner.prepare(grid_inputs(source, names, *largest)))
        cur, peak = _rss()
        gpu_after = _gpu_used()
        result: dict[str, Any] = {
            "sessionStartSeconds": round(start_s, 4),
            "peakMemoryBytes": max(0, (peak if reset else max(peak, cur)) - base),
            "providers": sess.get_providers(),
            "latency": [],
        }
        if gpu_before is not None and gpu_after is not None:
            result["gpuMemoryBytes"] = max(0, gpu_after - gpu_before)
        runners.append((runner, names, source))
        out.append(result)
    for b in batch_sizes:
        for length in lengths if models[0][1].text else (0,):
            prepared = [r.prepare(grid_inputs(src, names, b, length)) for r, names, src in runners]
            for _ in range(warmup):
                for (r, _n, _s), p in zip(runners, prepared, strict=True):
                    r.run(p)
            times = np.empty((len(runners), iterations))
            for i in range(iterations):
                for k, ((r, _n, _s), p) in enumerate(zip(runners, prepared, strict=True)):
                    t = time.perf_counter()
                    r.run(p)
                    times[k, i] = time.perf_counter() - t
            for k, result in enumerate(out):
                ms = times[k] * 1000
                result["latency"].append(
                    {
                        "batchSize": b,
                        "sequenceLength": length,
                        "p50Ms": round(float(np.percentile(ms, 50)), 4),
                        "p95Ms": round(float(np.percentile(ms, 95)), 4),
                        "p99Ms": round(float(np.percentile(ms, 99)), 4),
                        "throughput": round(float(b / times[k].mean()), 2),
                    }
                )
    return out


def _gpu_used() -> int | None:
    """Device memory in use (all processes) through torch's CUDA runtime, when a GPU is present."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    except Exception:
        return None


def placement(path: Path, source: Source, provider: str, threads: int, work: Path) -> dict[str, Any]:
    """Which provider ran each node (ORT's profiler), and the heavy nodes a GPU target left on the CPU."""
    sess = session(path, provider, threads, profile_dir=work)
    names = tuple(i.name for i in sess.get_inputs())
    sess.run(["logits"], grid_inputs(source, names, 2, 16))
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    nodes: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args:
            name = e["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            nodes[name] = (args["provider"], args.get("op_name", ""))
    by_provider: dict[str, int] = {}
    for prov, _ in nodes.values():
        by_provider[prov] = by_provider.get(prov, 0) + 1
    fallback = []
    if provider != "CPUExecutionProvider":
        fallback = sorted(n for n, (prov, op) in nodes.items() if prov == "CPUExecutionProvider" and op in HEAVY_OPS)
    return {"nodesByProvider": by_provider, "cpuFallbackNodes": fallback[:256]}
