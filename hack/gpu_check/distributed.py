"""Stage 2, two processes on one GPU: the trainer's distributed path (``env://`` variables, as the operator sets them
for one process per pod) with two ranks sharing the one device.

- NCCL first, as a real multi-GPU job would run: NCCL may refuse two ranks on one device; what it says is recorded.
- A single-rank NCCL process group running the collectives the trainer issues (its stop-flag all-reduce, the
  gathered RNG states, the barrier, a DDP step), which one GPU does allow.
- DDP over gloo with CUDA tensors (the trainer run through ``gpu_check.launch --backend gloo``): 2 ranks x batch B
  x 2 accumulated micro-batches against 1 rank x 4B, the same updates up to summation order; and the samples/s of
  2 ranks against 1 rank with the same global batch.

On the CPU (the dry run) the gloo runs are the trainer's own CPU path and the NCCL checks are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

from .common import Check, Context, Skip, Stage, free_port, progress, python_cmd, read_json, run, spawn, stop
from .data import image_dataset

TITLE = "Two processes on one GPU: NCCL where it allows, DDP over gloo with CUDA tensors"


def run_stage(ctx: Context) -> Stage:
    stage = Stage(ctx, "distributed", TITLE)
    stage.notes.append(
        "ranks share device 0 (LOCAL_RANK=0 each, one process per 'pod', no torchrun: torchrun would give the "
        "second rank cuda:1)"
    )
    with stage.check("inputs: image data set") as c:
        dataset, what = image_dataset(ctx)
        c.figures.update(dataset=what, uri=dataset)
    if stage.checks[-1].status != "passed":
        return stage
    with stage.check("NCCL, 2 ranks on one GPU (trainer)") as c:
        if not ctx.cuda:
            raise Skip("no CUDA (NCCL needs GPUs)")
        _nccl_two_ranks(ctx, c, dataset)
    with stage.check(f"{'NCCL' if ctx.cuda else 'gloo (CPU)'}, 1 rank: the trainer's collectives") as c:
        _single_rank(ctx, c)
    with stage.check(
        f"DDP over gloo{' with CUDA tensors' if ctx.cuda else ' (CPU)'}: 2 ranks = 1 rank, same global batch"
    ) as c:
        _gloo_equality(ctx, c, dataset)
    with stage.check(f"DDP over gloo{' with CUDA tensors' if ctx.cuda else ' (CPU)'}: samples/s, 2 ranks vs 1") as c:
        _gloo_throughput(ctx, c, dataset)
    return stage


def _dist_env(ctx: Context, rank: int, world: int, port: int) -> dict[str, str]:
    return ctx.child_env(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        KILN_DIST_TIMEOUT_SECONDS="30",  # a refused or lost peer fails in half a minute, not ten
        GLOO_SOCKET_IFNAME="lo",  # traffic stays on loopback
        NCCL_SOCKET_IFNAME="lo",
        NCCL_DEBUG="WARN",  # NCCL's own reason, in the log, when it refuses
    )


def _start_ranks(
    ctx: Context, name: str, args: list[str], world: int, launch: list[str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """Start ``world`` trainer processes of one job (rank 0 writes the progress file)."""
    root = ctx.work / "dist" / name
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    prefix = python_cmd("gpu_check.launch", *launch, "kiln_trainer") if launch else python_cmd("kiln_trainer")
    procs = []
    for rank in range(world):
        cmd = [*prefix, *args, "--termination-log", str(root / f"rank{rank}.json")]
        if rank == 0:
            cmd += ["--progress-file", str(root / "progress.json")]
        procs.append(spawn(ctx, cmd, f"dist-{name}-rank{rank}", _dist_env(ctx, rank, world, port)))
    return procs


def _wait_ranks(ctx: Context, name: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> list[dict[str, Any]]:
    """Each rank's exit code (None: killed at the time limit), termination message and log."""
    root = ctx.work / "dist" / name
    deadline = time.monotonic() + timeout
    progress(f"    dist-{name}: {len(procs)} rank(s) running")
    out = []
    for rank, p in enumerate(procs):
        try:
            code: int | None = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop(p)
        log = (ctx.logs / f"dist-{name}-rank{rank}.log").read_text(errors="replace")
        out.append({"code": code, "message": read_json(root / f"rank{rank}.json"), "log": log})
    progress(f"    dist-{name}: exit codes {[r['code'] for r in out]}")
    return out


def _ranks(
    ctx: Context, name: str, args: list[str], world: int, *, launch: list[str] | None = None, cap: float = 120
) -> list[dict[str, Any]]:
    timeout = ctx.child_timeout(cap)
    return _wait_ranks(ctx, name, _start_ranks(ctx, name, args, world, launch), timeout)


def _train_args(ctx: Context, dataset: str, batch: int, steps: int, precision: str = "fp32") -> list[str]:
    return [
        "--dataset-uri", dataset, "--max-steps", str(steps), "--batch-size", str(batch),
        "--learning-rate", "0.003", "--seed", "3", "--precision", precision,
        "--extra", "progressIntervalSeconds=1",
    ]  # fmt: skip


def _nccl_two_ranks(ctx: Context, c: Check, dataset: str) -> None:
    args = _train_args(ctx, dataset, ctx.sizes.dist_batch, 4, "bf16")
    ranks = _ranks(ctx, "nccl", [*args, "--output-uri", f"file://{ctx.work}/dist/nccl/model"], 2, cap=50)
    codes = [r["code"] for r in ranks]
    c.figures.update(ranks=2, backend="nccl", exitCodes=codes)
    said = sorted({line.strip()[:300] for r in ranks for line in r["log"].splitlines() if "NCCL WARN" in line})[:5]
    messages = [r["message"].get("message") for r in ranks if r["message"].get("message")]
    c.figures.update(ncclSaid=said, messages=messages)
    if codes == [0, 0]:
        c.detail = "NCCL accepted two ranks on one device; the run finished"
        return
    if any("duplicate gpu" in r["log"].lower() for r in ranks):
        c.note(f"NCCL refused two ranks on one device: {(said or messages or ['(see logs)'])[0][:300]}")
        return
    c.expect(False, f"2 NCCL ranks failed (exit {codes}): {(messages or said or ['see logs/dist-nccl-rank*.log'])[0]}")


def _single_rank(ctx: Context, c: Check) -> None:
    backend, device = ("nccl", "cuda") if ctx.cuda else ("gloo", "cpu")
    out = ctx.work / "dist" / "single-rank.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = _dist_env(ctx, 0, 1, free_port())
    cmd = python_cmd("gpu_check.distributed", "probe", "--backend", backend, "--device", device, "--out", str(out))
    ran = run(ctx, cmd, f"dist-single-rank-{backend}", cap=90, env=env)
    result = read_json(out)
    c.figures.update(backend=backend, device=device)
    if not c.expect(ran.code == 0 and bool(result), f"probe exit {ran.code}: {ran.tail(500)}"):
        return
    for op, outcome in result.items():
        c.figures[op] = outcome
        c.expect(outcome == "ok", f"{op}: {outcome}")


def _gloo_equality(ctx: Context, c: Check, dataset: str) -> None:
    b = ctx.sizes.dist_batch
    launch = ["--backend", "gloo", "--no-tf32"]
    timeout = ctx.child_timeout(120)
    # The 1-rank reference runs beside the 2 ranks (nothing here is timed): 1 rank x 4B examples per step.
    one = _start_ranks(
        ctx,
        "gloo-eq-one",
        [*_train_args(ctx, dataset, 4 * b, 4), "--output-uri", f"file://{ctx.work}/dist/eq-one"],
        1,
        launch,
    )
    # 2 ranks x batch B x 2 accumulated micro-batches: the same 4B examples per step, with checkpoints every 2 steps
    # (the RNG states gathered from the ranks, and barriers).
    root = ctx.work / "dist"
    args = [*_train_args(ctx, dataset, b, 4), "--gradient-accumulation-steps", "2"]
    args += ["--output-uri", f"file://{root}/eq-two", "--checkpoint-uri", f"file://{root}/eq-ck"]
    args += ["--checkpoint-every-steps", "2"]
    ranks = _wait_ranks(ctx, "gloo-eq", _start_ranks(ctx, "gloo-eq", args, 2, launch), timeout)
    (single,) = _wait_ranks(ctx, "gloo-eq-one", one, 30)
    codes = [r["code"] for r in ranks]
    c.figures.update(ranks=2, backend="gloo", perRankBatch=b, accumulation=2, globalBatch=4 * b, exitCodes=codes)
    if not c.expect(single["code"] == 0, f"1 rank: exit {single['code']}: {single['message'].get('message')}"):
        return
    if not c.expect(codes == [0, 0], f"2 ranks: exit {codes}: {[r['message'].get('message') for r in ranks]}"):
        return
    if ctx.cuda:
        c.expect("replaced by 'gloo'" in ranks[0]["log"], "the launcher switched the backend to gloo")
    from safetensors.torch import load_file

    a, w = load_file(str(root / "eq-one" / "model.safetensors")), load_file(str(root / "eq-two" / "model.safetensors"))
    diff = max(float((a[k].double() - w[k].double()).abs().max()) for k in a)
    c.figures["maxAbsDiff"] = diff
    c.figures["checkpoints"] = sorted(p.name for p in (root / "eq-ck").glob("step-*"))
    # Gradients averaged over 2 x 2 x B equal the mean over 4B up to summation order; Adam's first steps move each
    # weight by about the learning rate (3e-3) whatever the gradient's size, so other data would differ by ~1e-3.
    c.expect(diff <= 3e-4, f"weights within 3e-4 of the 1-rank run (max difference {diff:.3g})")


def _gloo_throughput(ctx: Context, c: Check, dataset: str) -> None:
    b, steps = ctx.sizes.dist_batch, ctx.sizes.dist_steps
    root = ctx.work / "dist"
    launch = ["--backend", "gloo"]
    # One after the other: these are timed.
    (single,) = _ranks(ctx, "gloo-tp-one", _train_args(ctx, dataset, 2 * b, steps), 1, launch=launch, cap=90)
    c.expect(single["code"] == 0, f"1 rank: exit {single['code']}: {single['message'].get('message')}")
    ranks = _ranks(ctx, "gloo-tp", _train_args(ctx, dataset, b, steps), 2, launch=launch, cap=120)
    codes = [r["code"] for r in ranks]
    c.expect(codes == [0, 0], f"2 ranks: exit {codes}: {[r['message'].get('message') for r in ranks]}")
    rate1 = float(read_json(root / "gloo-tp-one" / "progress.json").get("samplesPerSecond") or 0)
    rate2 = float(read_json(root / "gloo-tp" / "progress.json").get("samplesPerSecond") or 0)
    c.figures.update(
        ranks=2,
        backend="gloo",
        globalBatch=2 * b,
        steps=steps,
        samplesPerSecond=rate2,
        oneRankSamplesPerSecond=rate1,
        twoOverOne=round(rate2 / rate1, 4) if rate1 else None,
    )
    c.expect(rate1 > 0 and rate2 > 0, "both runs report a rate")


# ------------------------------------------------------------------------------------------- single-rank probe


def probe(backend: str, device: str, out: str) -> int:
    """One rank: the collectives the trainer issues, each on its own, recorded as ``ok`` or its error."""
    import torch
    import torch.distributed as dist

    from kiln_artifacts.models import KilnCNN
    from kiln_trainer import loop

    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    results: dict[str, str] = {}
    kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)

    def attempt(name: str, fn: Any) -> None:
        try:
            fn()
            results[name] = "ok"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

    def flags() -> None:
        # The trainer's own method on a stand-in object: the stop flag and time-based checkpoint agreement.
        trainer = SimpleNamespace(pg=True, torch=torch, dist=loop.Dist(0, 1, 0), device=dev)
        got = loop.Trainer._flags(trainer, True, False)  # type: ignore[arg-type]
        if got != (True, False):
            raise AssertionError(f"returned {got}")

    def gather() -> None:
        gathered: list[Any] = [None]
        dist.all_gather_object(gathered, {"torch": torch.get_rng_state()})
        if gathered[0] is None:
            raise AssertionError("nothing gathered")

    def ddp_step() -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = KilnCNN(10).to(dev)
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(8, 1, 12, 12, device=dev)
        y = torch.randint(0, 10, (8,), device=dev)
        torch.nn.functional.cross_entropy(ddp(pixel_values=x), y).backward()
        opt.step()

    attempt("stopFlagAllReduce", flags)
    attempt("allGatherObject", gather)
    attempt("barrier", dist.barrier)
    attempt("ddpStep", ddp_step)
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(results, f)
    print(json.dumps(results), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_check.distributed")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--backend", required=True, choices=["nccl", "gloo"])
    pr.add_argument("--device", required=True, choices=["cuda", "cpu"])
    pr.add_argument("--out", required=True)
    a = p.parse_args()
    os.environ.setdefault("RANK", "0")
    return probe(a.backend, a.device, a.out)


if __name__ == "__main__":
    sys.exit(main())
