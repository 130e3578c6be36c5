"""The run's results: ``gpu-check.json`` (everything) and ``gpu-check.md`` (a Markdown table of every check)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .common import fmt

# The figures worth a column in the table, in order; the JSON has all of them.
HEADLINE = (
    "effectivePrecision",
    "trainerSamplesPerSecond",
    "plainSamplesPerSecond",
    "trainerOverPlain",
    "trainerLossFirst",
    "trainerLossLast",
    "plainLossLast",
    "trainerPeakCudaBytes",
    "plainPeakCudaBytes",
    "trainerPeakRssBytes",
    "evalAccuracy",
    "stoppedAtStep",
    "exitCode",
    "resumedMaxAbsDiff",
    "uninterruptedRunToRunMaxAbsDiff",
    "bitForBit",
    "ranks",
    "backend",
    "samplesPerSecond",
    "oneRankSamplesPerSecond",
    "twoOverOne",
    "stopFlagAllReduce",
    "allGatherObject",
    "ddpStep",
    "maxAbsDiff",
    "sizeRatio",
    "exporter",
    "parityMaxAbsDiff",
    "agreement",
    "maxLogitDiff",
    "p50MsBatch1",
    "p50MsBatch32",
    "cpuP50MsBatch1",
    "cpuP50MsBatch32",
    "fp32P50MsBatch1",
    "fp16P50MsBatch1",
    "fp32P50MsBatch32",
    "fp16P50MsBatch32",
    "speedup",
    "cpuFallbackNodes",
    "providers",
    "ready",
    "reason",
    "wheelMiB",
)


def write(out: Path, doc: dict[str, Any]) -> None:
    """Both files, each written whole then renamed: a reader (or a killed run) never leaves half a file."""
    _atomic(out / "gpu-check.json", json.dumps(doc, indent=2, default=str) + "\n")
    _atomic(out / "gpu-check.md", markdown(doc))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    torch = env.get("torch") or {}
    ort = env.get("onnxruntime") or {}
    device = torch.get("device") or ("CPU only" if not torch.get("cuda") else "CUDA")
    lines = [
        f"# Kiln GPU check ({doc.get('mode')})",
        "",
        f"- started {doc.get('startedAt')}, {doc.get('seconds')} s of {doc.get('limitSeconds')} s; "
        f"result: **{doc.get('result')}**",
        f"- machine: {device}; {env.get('cpus')} CPUs; Python {env.get('python')}; torch {torch.get('version')} "
        f"(CUDA {torch.get('cudaVersion')}, NCCL {torch.get('ncclVersion')}); onnxruntime {ort.get('version')} "
        f"({', '.join(ort.get('providers') or [])})",
    ]
    wheel = env.get("ortGpuWheel") or {}
    if wheel.get("found"):
        lines.append(f"- onnxruntime-gpu wheel: {wheel['found']} ({wheel.get('wheelMiB')} MiB), unpacked for this run")
    elif wheel:
        lines.append(f"- onnxruntime-gpu: {wheel.get('note')}")
    lines += ["", "| stage | result | seconds | limit (s) |", "|---|---|---|---|"]
    for s in doc.get("stages", []):
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds')} | {s.get('limitSeconds')} |")
    lines += ["", "| stage | check | result | figures |", "|---|---|---|---|"]
    for s in doc.get("stages", []):
        for c in s.get("checks", []):
            result = c["status"] + (f": {c['detail']}" if c.get("detail") else "")
            figures = c.get("figures") or {}
            shown = [f"{k}={fmt(figures[k])}" for k in HEADLINE if k in figures and not isinstance(figures[k], dict)]
            lines.append(f"| {s['name']} | {_cell(c['name'])} | {_cell(result[:300])} | {_cell(', '.join(shown))} |")
        if s.get("error"):
            lines.append(f"| {s['name']} | (stage) | {_cell(s['error'][:300])} | |")
    notes = [f"- {s['name']}: {n}" for s in doc.get("stages", []) for n in s.get("notes", [])]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"
