"""The GPU check's dry run (``hack/gpu-check.sh --dry-run``): every stage on the CPU with tiny sizes, through the
same code as on a GPU machine, so that the check is known to work before the one chance to run it comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ["trainer", "distributed", "compressor", "server"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "out"
    # The machine's own Python with PYTHONPATH onto the source roots (the script sets it): no install step.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp))
    p = subprocess.run(
        [str(REPO / "hack" / "gpu-check.sh"), "--dry-run", str(out)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    doc = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").exists() else {}
    return p, doc, out


def checks(doc: dict[str, Any], stage: str) -> dict[str, dict[str, Any]]:
    (s,) = [s for s in doc["stages"] if s["name"] == stage]
    return {c["name"]: c for c in s["checks"]}


def find(doc: dict[str, Any], stage: str, words: str) -> dict[str, Any]:
    found = [c for name, c in checks(doc, stage).items() if all(w in name for w in words.split("|"))]
    assert len(found) == 1, (stage, words, list(checks(doc, stage)))
    return found[0]


def test_every_stage_runs_and_passes_on_the_cpu(dry_run) -> None:
    p, doc, _ = dry_run
    assert doc, p.stdout[-6000:] + p.stderr[-3000:]
    failed = {
        s["name"]: s.get("error") or [c for c in s["checks"] if c["status"] != "passed" and c["status"] != "skipped"]
        for s in doc["stages"]
        if s["status"] != "passed"
    }
    assert not failed, json.dumps(failed, indent=1)[:6000]
    assert p.returncode == 0, p.stdout[-3000:]
    assert doc["mode"] == "dry-run"
    assert doc["result"] == "passed"
    assert [s["name"] for s in doc["stages"]] == STAGES
    for s in doc["stages"]:
        assert s["seconds"] <= s["limitSeconds"] + 10, s["name"]
        assert any(c["status"] == "passed" for c in s["checks"]), s["name"]
        for c in s["checks"]:
            assert c["status"] in ("passed", "skipped"), c
            if c["status"] == "skipped":  # never silently: the reason is recorded, and nothing claims to have run
                assert c["detail"], c
                assert not {k for k in c["figures"] if "SamplesPerSecond" in k or k.startswith("p50")}, c
    # Progress lines as the stages run.
    assert "[gpu-check" in p.stdout
    assert "stage trainer:" in p.stdout


def test_trainer_figures(dry_run) -> None:
    _, doc, _ = dry_run
    for precision in ("fp32", "bf16", "fp16"):
        f = find(doc, "trainer", f"KilnCNN {precision}|plain loop")["figures"]
        assert f["trainerSamplesPerSecond"] > 0
        assert f["plainSamplesPerSecond"] > 0
        assert f["trainerLossLast"] < f["trainerLossFirst"]
        assert f["plainLossLast"] < f["plainLossFirst"]
        assert f["trainerPeakRssBytes"] > 0  # on CUDA: trainerPeakCudaBytes
        # On the CPU the trainer trains fp32 whatever the precision, and the check says so rather than pretending.
        assert f["effectivePrecision"] == ("fp32" if precision == "fp32" else "fp32 (no CUDA, logged)")
    text = find(doc, "trainer", "text fp32|plain loop")
    assert text["status"] == "passed"
    assert text["figures"]["trainerLossLast"] < text["figures"]["trainerLossFirst"]
    assert find(doc, "trainer", "text bf16")["status"] == "skipped"
    preempted = find(doc, "trainer", "SIGTERM")
    assert preempted["figures"]["exitCode"] == 5
    assert preempted["figures"]["reason"] == "Preemption"
    assert preempted["figures"]["verified"] is True
    resumed = find(doc, "trainer", "resumed")
    assert resumed["figures"]["bitForBit"] is True
    assert 0 < resumed["figures"]["resumedFromStep"] < preempted["figures"]["steps"]


def test_distributed_figures(dry_run) -> None:
    _, doc, _ = dry_run
    nccl = find(doc, "distributed", "NCCL, 2 ranks")
    assert nccl["status"] == "skipped"
    assert "no CUDA" in nccl["detail"]
    probe = find(doc, "distributed", "collectives")["figures"]
    assert all(probe[op] == "ok" for op in ("stopFlagAllReduce", "allGatherObject", "barrier", "ddpStep"))
    same = find(doc, "distributed", "2 ranks = 1 rank")["figures"]
    assert same["maxAbsDiff"] <= 3e-4
    assert same["exitCodes"] == [0, 0]
    speed = find(doc, "distributed", "samples/s")["figures"]
    assert speed["samplesPerSecond"] > 0
    assert speed["oneRankSamplesPerSecond"] > 0


def test_compressor_figures(dry_run) -> None:
    _, doc, _ = dry_run
    for kind in ("image", "text"):
        export = find(doc, "compressor", f"{kind}: export")["figures"]
        assert export["parityMaxAbsDiff"] <= export["parityTolerance"]
        assert export["agreement"] >= 0.99
        assert export["p50MsBatch1"] > 0
        fp16 = find(doc, "compressor", f"{kind}: fp16 conversion")["figures"]
        assert fp16["fp16Bytes"] < fp16["fp32Bytes"]
        assert fp16["agreement"] >= 0.98
        torch_fp16 = find(doc, "compressor", f"{kind}: fp16 against fp32 through torch")["figures"]
        assert torch_fp16["device"] == "cpu"
        assert torch_fp16["fp16P50MsBatch32"] > 0
        ort_cuda = find(doc, "compressor", f"{kind}: ONNX Runtime CUDA")
        assert ort_cuda["status"] == "skipped"
    assert find(doc, "compressor", "GPU target without")["figures"]["exitCode"] == 4
    assert "244 MiB" in doc["environment"]["ortGpuWheel"]["note"]


def test_server_figures(dry_run) -> None:
    _, doc, _ = dry_run
    for kind in ("image", "text"):
        auto = find(doc, "server", f"{kind}: --provider auto")
        f = auto["figures"]
        assert f["providers"] == ["CPUExecutionProvider"]
        assert "CPUExecutionProvider" in f["logSaid"]
        assert f["maxAbsDiff"] <= 1e-4
        assert f["p50MsBatch1"] > 0
        assert f["p50MsBatch32"] > 0
        assert f["exitCodeAfterSigterm"] == 0
    refused = find(doc, "server", "--provider cuda without")["figures"]
    assert refused["live"] is True
    assert refused["ready"] is False
    assert "CUDAExecutionProvider" in refused["reason"]


def test_markdown_table(dry_run) -> None:
    _, doc, out = dry_run
    md = (out / "gpu-check.md").read_text()
    assert md.startswith("# Kiln GPU check (dry-run)")
    assert "| stage | check | result | figures |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    n_checks = sum(len(s["checks"]) for s in doc["stages"])
    assert len(rows) == n_checks + len(doc["stages"])  # one row per check, and the per-stage summary
    assert "| trainer | KilnCNN bf16: trainer vs plain loop | passed |" in md
    assert "skipped: no CUDA" in md
    assert (out / "logs" / "stage-trainer.log").is_file()
