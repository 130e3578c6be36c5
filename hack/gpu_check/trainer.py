"""Stage 1, the trainer on CUDA: the real program (``python -m kiln_trainer``) against a plain PyTorch loop with the
same model, data, batch, optimizer and schedule, in fp32, bf16 autocast and fp16 with a GradScaler; then
checkpoint, SIGTERM (exit 5), resume and equality with an uninterrupted run.

Both sides are timed the way the trainer reports its rate: optimizer steps from the first to the last, divided
into steps x batch, the clock read before the final loss is fetched from the device. They run one after the
other in the same stage, the order alternating between precisions. On the CPU (the dry run) the trainer trains
bf16 and fp16 runs in fp32 and logs it; the check requires that line and says so.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from . import data
from .common import PRECISIONS, Check, Context, Skip, Stage, progress, python_cmd, read_json, require, run, spawn, stop

TITLE = "Trainer: KilnCNN and text fine-tuning in fp32, bf16, fp16; checkpoint, SIGTERM, resume"


def run_stage(ctx: Context) -> Stage:
    stage = Stage(ctx, "trainer", TITLE)
    device = "cuda" if ctx.cuda else "cpu"
    stage.notes.append(f"device: {device}" + ("" if ctx.cuda else " (no CUDA: the CPU equivalent of every run)"))
    inputs: dict[str, str] = {}
    pretrained = False
    with stage.check("inputs: image data set") as c:
        inputs["image"], what = data.image_dataset(ctx)
        c.figures.update(dataset=what, uri=inputs["image"])
    for i, precision in enumerate(PRECISIONS):
        with stage.check(f"KilnCNN {precision}: trainer vs plain loop") as c:
            if "image" not in inputs:
                c.expect(False, "no image data set")
                continue
            cfg = _settings(ctx, "image")
            _compare(ctx, c, "image", precision, inputs["image"], None, cfg, trainer_first=i % 2 == 0)
    with stage.check("inputs: text data set and model") as c:
        require("transformers", "tokenizers")
        inputs["text"] = data.text_dataset(ctx)
        inputs["base"], what = data.text_base(ctx)
        pretrained = "pretrained" in what
        c.figures.update(model=what, uri=inputs["base"])
    for i, precision in enumerate(PRECISIONS):
        with stage.check(f"text {precision}: trainer vs plain loop") as c:
            require("transformers", "tokenizers")
            if precision != "fp32" and not ctx.cuda:
                # On the CPU these would be the fp32 run again: the trainer's fallback is checked by the KilnCNN rows.
                raise Skip(f"no CUDA: on the CPU the trainer runs {precision} as fp32 (the KilnCNN row checks the log)")
            if "base" not in inputs:
                c.expect(False, "no text data set or model")
                continue
            cfg = _settings(ctx, "text", pretrained)
            _compare(ctx, c, "text", precision, inputs["text"], inputs["base"], cfg, trainer_first=i % 2 == 1)
    if "image" in inputs:
        _preemption(ctx, stage, inputs["image"])
    return stage


# --------------------------------------------------------------------------------------- trainer vs plain loop


def _settings(ctx: Context, kind: str, pretrained: bool = False) -> dict[str, Any]:
    s = ctx.sizes
    if kind == "image":
        return {"batch": s.image_batch, "steps": s.image_steps, "lr": s.image_lr, "warmup": 0, "seq": 0}
    return {
        "batch": s.text_batch,
        "steps": s.text_steps,
        "lr": 1e-4 if pretrained else s.text_lr,  # a pretrained encoder is fine-tuned gently
        "warmup": s.text_steps // 10,
        "seq": s.text_seq,
    }


def _compare(
    ctx: Context,
    c: Check,
    kind: str,
    precision: str,
    dataset: str,
    base: str | None,
    cfg: dict[str, Any],
    *,
    trainer_first: bool,
) -> None:
    c.figures.update(device="cuda" if ctx.cuda else "cpu", batch=cfg["batch"], steps=cfg["steps"])
    results: dict[str, dict[str, Any]] = {}
    for side in ("trainer", "plain") if trainer_first else ("plain", "trainer"):
        if side == "trainer":
            results[side] = _trainer_run(ctx, kind, precision, dataset, base, cfg)
        else:
            results[side] = plain_loop(ctx, kind, precision, dataset, base, cfg)
            if ctx.cuda:  # the plain loop's model and optimizer are gone: give their memory back to the device
                import torch

                torch.cuda.empty_cache()
    t, p = results["trainer"], results["plain"]
    # The trainer reports the mean loss since its previous report: the plain loop's figure is the mean over the
    # same steps, so that the two columns compare the same thing.
    reports, losses = t.get("reports") or [], p["losses"]
    lo, hi = (reports[-2][0], reports[-1][0]) if len(reports) >= 2 else (len(losses) * 3 // 4, len(losses))
    p["lossFirst"], p["lossLast"] = losses[0], sum(losses[lo:hi]) / max(1, hi - lo)
    c.figures["effectivePrecision"] = t["effectivePrecision"]
    if not c.expect(t["code"] == 0, f"trainer exit {t['code']}: {t.get('message')}"):
        c.figures["trainerLogTail"] = t.get("tail", "")
        return
    c.figures.update(
        trainerSamplesPerSecond=t["samplesPerSecond"],
        plainSamplesPerSecond=p["samplesPerSecond"],
        trainerOverPlain=round(t["samplesPerSecond"] / p["samplesPerSecond"], 4) if p["samplesPerSecond"] else None,
        trainerLossFirst=t["lossFirst"],
        trainerLossLast=t["lossLast"],
        plainLossFirst=p["lossFirst"],
        plainLossLast=p["lossLast"],
        evalAccuracy=t.get("evalAccuracy"),
    )
    for side, r in (("trainer", t), ("plain", p)):
        for key in ("peakCudaBytes", "peakRssBytes"):
            if r.get(key) is not None:
                c.figures[side + key[0].upper() + key[1:]] = r[key]
    c.figures["trainerSeconds"] = t["seconds"]
    c.expect(t["samplesPerSecond"] > 0 and p["samplesPerSecond"] > 0, "both sides report a rate")
    c.expect(t["lossLast"] < t["lossFirst"], f"trainer loss goes down ({t['lossFirst']:.4f} -> {t['lossLast']:.4f})")
    c.expect(p["lossLast"] < p["lossFirst"], f"plain loop loss goes down ({p['lossFirst']:.4f} -> {p['lossLast']:.4f})")
    if ctx.cuda:
        c.expect((t.get("peakCudaBytes") or 0) > 0, "the trainer used CUDA memory")
        c.expect(t["effectivePrecision"] == precision, f"trainer ran {precision}")
    elif precision != "fp32":
        c.expect(t["effectivePrecision"] == "fp32 (no CUDA, logged)", "the trainer logs that it trains fp32 on CPU")


def _trainer_args(dataset: str, base: str | None, precision: str, cfg: dict[str, Any], seed: int) -> list[str]:
    args = ["--dataset-uri", dataset, "--max-steps", str(cfg["steps"]), "--batch-size", str(cfg["batch"])]
    args += ["--learning-rate", str(cfg["lr"]), "--precision", precision, "--seed", str(seed)]
    if base is not None:
        args += [
            "--model-uri",
            base,
            "--extra",
            f"maxSeqLength={cfg['seq']}",
            "--extra",
            f"warmupSteps={cfg['warmup']}",
        ]
    return args


def _trainer_run(
    ctx: Context, kind: str, precision: str, dataset: str, base: str | None, cfg: dict[str, Any]
) -> dict[str, Any]:
    name = f"{kind}-{precision}"
    runs = ctx.work / "runs" / name
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    out = ctx.work / "models" / name
    shutil.rmtree(out, ignore_errors=True)
    args = _trainer_args(dataset, base, precision, cfg, seed=42)
    args += ["--output-uri", f"file://{out}", "--progress-file", str(runs / "progress.json")]
    args += ["--termination-log", str(runs / "termination.json"), "--extra", "progressIntervalSeconds=1"]
    cmd = python_cmd("gpu_check.launch", "--peak-file", str(runs / "peak.json"), "kiln_trainer", *args)
    ran = run(ctx, cmd, f"trainer-{name}", cap=240 if ctx.cuda else 60)
    message = read_json(runs / "termination.json")
    state = read_json(runs / "progress.json")
    peak = read_json(runs / "peak.json")
    losses = progress_losses(ran.text)
    result: dict[str, Any] = {
        "code": ran.code,
        "message": message.get("message") or ("killed at its time limit" if ran.code is None else ran.tail(300)),
        "tail": ran.tail(),
        "seconds": ran.seconds,
        "samplesPerSecond": float(state.get("samplesPerSecond") or 0),
        "reports": losses,
        "lossFirst": losses[0][1] if losses else float("nan"),
        "lossLast": losses[-1][1] if losses else float("nan"),
        "evalAccuracy": (message.get("metrics") or {}).get("eval_accuracy"),
        "peakCudaBytes": peak.get("maxMemoryAllocatedBytes"),
        "peakRssBytes": None if peak.get("maxMemoryAllocatedBytes") else peak.get("maxRssBytes"),
        "effectivePrecision": precision,
    }
    if precision != "fp32" and f"precision {precision}: no CUDA device, training in fp32" in ran.text:
        result["effectivePrecision"] = "fp32 (no CUDA, logged)"
    return result


def progress_losses(log: str) -> list[tuple[int, float]]:
    """(step, loss) of every periodic report in a trainer's log (``kiln-progress {...}`` lines)."""
    from kiln_artifacts.contract import PROGRESS_MARK

    out = []
    for line in log.splitlines():
        at = line.find(PROGRESS_MARK)
        if at < 0:
            continue
        try:
            state = json.loads(line[at + len(PROGRESS_MARK) :])
        except ValueError:
            continue
        if isinstance(state, dict) and isinstance(state.get("loss"), int | float):
            out.append((int(state.get("step", 0)), float(state["loss"])))
    return out


def plain_loop(
    ctx: Context, kind: str, precision: str, dataset: str, base: str | None, cfg: dict[str, Any], seed: int = 42
) -> dict[str, Any]:
    """The trainer's computation written as the plain loop anyone would write, in this process, with no trainer
    code: the same initial weights (the seed, then the model), data order (a permutation per epoch from the seed),
    pixel normalisation or tokenization, AdamW, warm-up and linear decay, autocast and GradScaler. The loss per
    step is kept on the device (no host sync in the loop, as in the trainer)."""
    import torch

    from kiln_artifacts import parse_uri
    from kiln_artifacts.datasets import load_dataset
    from kiln_artifacts.models import KilnCNN

    torch.set_num_threads(ctx.sizes.threads)
    device = torch.device("cuda" if ctx.cuda else "cpu")
    ds = load_dataset(dataset, None)
    torch.manual_seed(seed)
    model: Any
    if kind == "image":
        model = KilnCNN(len(ds.classes))
        images = torch.from_numpy(ds.train_x.copy())

        def forward(idx: Any) -> Any:
            pixels = images[idx].unsqueeze(1).float().div_(127.5).sub_(1.0)
            return model(pixel_values=pixels.to(device, non_blocking=True))
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        assert base is not None
        folder = str(parse_uri(base).local_path())
        classes = ds.classes
        model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
            local_files_only=True,
        )
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        enc = tok(ds.train_x, padding="max_length", truncation=True, max_length=cfg["seq"], return_tensors="pt")
        tokens = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

        def forward(idx: Any) -> Any:
            return model(**{k: v[idx].to(device, non_blocking=True) for k, v in tokens.items()}).logits

    labels = torch.from_numpy(ds.train_y)
    steps, batch, warmup = cfg["steps"], cfg["batch"], cfg["warmup"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    per_epoch = len(labels) // batch
    order = None
    history = []
    started = time.monotonic()
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0 or order is None:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = order[i * batch : (i + 1) * batch]
        y = labels[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(idx).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        history.append(loss.detach())
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {
        "samplesPerSecond": round(steps * batch / max(elapsed, 1e-9), 2),
        "losses": [float(v) for v in torch.stack(history).float().cpu()],
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["peakCudaBytes"] = int(torch.cuda.max_memory_allocated())
    return result


# ------------------------------------------------------------------------------------- preemption and resume


def _preemption(ctx: Context, stage: Stage, dataset: str) -> None:
    """Runs of the same job: one stopped by SIGTERM (final checkpoint, exit 5) then resumed from its checkpoint to
    the end, and one uninterrupted (on CUDA two, whose difference is this device's run-to-run spread)."""
    s = ctx.sizes
    precision = "fp16"  # the GradScaler's state goes through the checkpoint too
    cfg = {"batch": s.image_batch, "steps": s.resume_steps, "lr": s.image_lr, "warmup": 0, "seq": 0}
    root = ctx.work / "resume"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    args = _trainer_args(dataset, None, precision, cfg, seed=7)
    ck = root / "ck"
    b_args = [*args, "--output-uri", f"file://{root}/b", "--checkpoint-uri", f"file://{ck}"]
    b_args += ["--checkpoint-every-steps", str(s.resume_every), "--extra", "progressIntervalSeconds=0"]
    b_args += ["--termination-log", str(root / "b-termination.json")]
    stopped_at: int | None = None
    with stage.check(f"KilnCNN {precision}: SIGTERM -> final checkpoint -> exit 5") as c:
        c.figures.update(device="cuda" if ctx.cuda else "cpu", steps=s.resume_steps, sigtermAfterStep=s.sigterm_after)
        timeout = ctx.child_timeout(120 if ctx.cuda else 45)
        p = spawn(ctx, python_cmd("kiln_trainer", *b_args), "trainer-preempted")
        try:
            deadline = time.monotonic() + timeout
            while p.poll() is None and time.monotonic() < deadline:
                step = read_json(ck / "progress.json").get("step", 0)
                if isinstance(step, int) and step >= s.sigterm_after:
                    p.send_signal(signal.SIGTERM)
                    c.figures["signalledAtStep"] = step
                    break
                time.sleep(0.01)
            code = p.wait(timeout=max(5.0, deadline - time.monotonic()))
        finally:
            stop(p)
        message = read_json(root / "b-termination.json")
        c.figures.update(exitCode=code, reason=message.get("reason"), stoppedAtStep=message.get("step"))
        c.expect("signalledAtStep" in c.figures, "the run reached the signal step before it finished")
        c.expect(code == 5, f"exit code 5 (Preemption), got {code}: {message.get('message')}")
        c.expect(message.get("reason") == "Preemption", "termination message reason Preemption")
        last = (message.get("lastCheckpoint") or {}).get("uri")
        c.expect(bool(last) and last.endswith(f"step-{message.get('step', 0):08d}"), "lastCheckpoint is the stop step")
        if last:
            c.figures.update(_inspect_checkpoint(last))
            c.expect(c.figures.get("verified") is True, "the final checkpoint is complete and verified")
            if ctx.cuda:
                c.expect(c.figures.get("cudaRngSaved") is True, "the checkpoint holds the CUDA RNG state")
                c.expect((c.figures.get("scalerScale") or 0) > 0, "the checkpoint holds the GradScaler's scale")
        c.expect(read_json(ck / "progress.json").get("phase") == "Preempted", "progress.json says Preempted")
        if not c.failures:
            stopped_at = int(message["step"])
    with stage.check(f"KilnCNN {precision}: resumed run equals an uninterrupted run") as c:
        if stopped_at is None:
            c.expect(False, "no preempted run to resume")
            return
        runs = {}
        plan = [("a", ["--output-uri", f"file://{root}/a"])]
        if ctx.cuda:  # the run-to-run spread of this device; on the CPU two runs are bit-for-bit equal
            plan.append(("a2", ["--output-uri", f"file://{root}/a2"]))
        plan.append(("b", [a for a in b_args if a != "--termination-log" and not a.endswith("b-termination.json")]))
        for name, extra in plan:
            tlog = root / f"{name}-resume-termination.json"
            cmd = python_cmd("kiln_trainer", *(args if name != "b" else []), *extra, "--termination-log", str(tlog))
            runs[name] = run(ctx, cmd, f"trainer-{'resumed' if name == 'b' else 'uninterrupted-' + name}", cap=120)
            if not c.expect(
                runs[name].code == 0, f"run {name}: exit {runs[name].code}: {read_json(tlog).get('message')}"
            ):
                c.figures[f"{name}LogTail"] = runs[name].tail()
                return
        c.expect(f"(step {stopped_at})" in runs["b"].text, f"the resumed run says it resumed from step {stopped_at}")
        a, b = _weights(root / "a"), _weights(root / "b")
        spread, diff = _max_abs_diff(a, _weights(root / "a2")) if ctx.cuda else None, _max_abs_diff(a, b)
        c.figures.update(
            resumedFromStep=stopped_at,
            resumedMaxAbsDiff=diff,
            uninterruptedRunToRunMaxAbsDiff=spread,
            bitForBit=diff == 0.0,
        )
        if diff == 0.0:
            c.detail = "bit-for-bit"
        elif spread is not None:
            # Nondeterministic CUDA kernels (cuDNN's convolution and adaptive pooling backward use atomics) make two
            # uninterrupted runs differ too: the resumed run must stay within that spread, not add to it.
            c.expect(diff <= 4 * spread, f"difference {diff:.3g} within 4x the run-to-run spread {spread:.3g}")
            c.detail = f"tolerance: 4x the run-to-run spread of two uninterrupted runs ({spread:.3g})"
        else:
            c.expect(diff <= 1e-6, f"difference {diff:.3g} <= 1e-6 on CPU")
        spread_text = f"{spread:.3g}" if spread is not None else "not measured (CPU: deterministic)"
        progress(f"trainer: resume: max |resumed - uninterrupted| = {diff:.3g}, run-to-run {spread_text}")


def _inspect_checkpoint(uri: str) -> dict[str, Any]:
    import torch

    import kiln_artifacts as ka

    art = ka.load(uri)
    state = torch.load(art.path("state.pt"), map_location="cpu", weights_only=False)
    rng = (state.get("rng") or [{}])[0]
    scaler = state.get("scaler") or {}
    return {
        "verified": True,
        "checkpointStep": state.get("step"),
        "checkpointKeys": sorted(state),
        "cudaRngSaved": "cuda" in rng,
        "scalerScale": float(scaler["scale"]) if "scale" in scaler else None,
    }


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
