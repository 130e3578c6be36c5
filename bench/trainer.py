"""Trainer overhead: samples/s of kiln_trainer against a plain PyTorch loop, same model, data and batch, same run.

    .venv/bin/python -m bench.trainer --dataset fashion-mnist --steps 300 --batch-size 64 --repeat 2

Both sides time only the optimizer steps (setup, data loading and evaluation excluded): the trainer's figure is
its own progress report (steps x global batch / time since its first step), the plain loop's is measured the
same way. The order alternates between repeats. At the end the trainer's test accuracy is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kiln_artifacts import samples
from kiln_artifacts.models import KilnCNN
from kiln_trainer.config import parse_config
from kiln_trainer.loop import Dist, Trainer
from kiln_trainer.models import image_batch


def plain_loop(folder: Path, steps: int, batch: int, lr: float, seed: int, device: torch.device) -> float:
    x, y = samples.load_idx_dataset(folder, "train")
    images, labels = torch.from_numpy(x.copy()), torch.from_numpy(y)
    torch.manual_seed(seed)
    model = KilnCNN(10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    per_epoch = len(labels) // batch
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    start = time.monotonic()
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0 and epoch:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch))
        idx = order[i * batch : (i + 1) * batch]
        inputs = image_batch(images[idx])["pixel_values"].to(device)
        loss = torch.nn.functional.cross_entropy(model(inputs), labels[idx].to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.monotonic() - start)


def trainer_run(uri: str, tmp: Path, steps: int, batch: int, lr: float, seed: int, ckpt_steps: int) -> dict:
    progress = tmp / f"progress-{time.monotonic_ns()}.json"
    args = ["--dataset-uri", uri, "--max-steps", str(steps), "--batch-size", str(batch), "--learning-rate", str(lr)]
    args += ["--seed", str(seed), "--precision", "fp32", "--progress-file", str(progress)]
    if ckpt_steps:
        args += [
            "--checkpoint-uri",
            f"file://{tmp}/ck-{time.monotonic_ns()}",
            "--checkpoint-every-steps",
            str(ckpt_steps),
        ]
    outcome = Trainer(parse_config(args, {}), Dist()).run()
    assert outcome.code == 0, outcome.message
    return json.loads(progress.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--checkpoint-every-steps", type=int, default=0, help="0: no checkpoints during the trainer run")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as t:
        tmp = Path(t)
        art = samples.publish_dataset(a.dataset, f"file://{tmp}/data")
        folder = tmp / "data"
        plain, trainer, accuracy = [], [], []
        for r in range(a.repeat):
            runs = ["plain", "trainer"] if r % 2 == 0 else ["trainer", "plain"]
            for which in runs:
                if which == "plain":
                    plain.append(plain_loop(folder, a.steps, a.batch_size, a.lr, 42, device))
                    print(f"repeat {r}: plain   {plain[-1]:9.1f} samples/s", flush=True)
                else:
                    progress = trainer_run(art.uri, tmp, a.steps, a.batch_size, a.lr, 42, a.checkpoint_every_steps)
                    trainer.append(progress["samplesPerSecond"])
                    accuracy.append(progress.get("eval_accuracy", float("nan")))
                    print(f"repeat {r}: trainer {trainer[-1]:9.1f} samples/s, test accuracy {accuracy[-1]:.4f}")
        mp, mt = statistics.median(plain), statistics.median(trainer)
        print(f"\nmedian plain {mp:.1f} samples/s, trainer {mt:.1f} samples/s, overhead {100 * (mp - mt) / mp:+.1f} %")
        acc = statistics.median(accuracy)
        print(f"{a.dataset} test accuracy after {a.steps} steps of batch {a.batch_size}: {acc:.4f}")


if __name__ == "__main__":
    main()
