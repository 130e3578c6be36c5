"""The torch steps, applied to the source model before the export: pruning and knowledge distillation.

Magnitude pruning zeroes the smallest weights (``torch.nn.utils.prune``, global L1); the shapes stay dense, so it
buys no speed and no file size by itself (it is recorded as sparsity). Structured pruning removes whole units, so
the exported graph is smaller and faster: the FFN neurons of BERT-style encoders (intermediate.dense rows and
output.dense columns, by L2 norm) and the convolution channels of KilnCNN.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kiln_artifacts.contract import UserError

from .models import Data, Source, build_torch, feeds

log = logging.getLogger("kiln_compressor")


def _prunable(model: Any) -> list[tuple[Any, str]]:
    from torch import nn

    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def parameters(model: Any) -> tuple[int, int]:
    """(total, non-zero) parameters."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


def prune(model: Any, source: Source, params: Mapping[str, Any], where: str) -> tuple[Any, dict[str, Any]]:
    import torch
    from torch.nn.utils import prune as tprune

    sparsity = float(params["sparsity"])
    before = parameters(model)
    if params["method"] == "Magnitude":
        targets = _prunable(model)
        tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=sparsity)
        for m, name in targets:
            tprune.remove(m, name)
        facts: dict[str, Any] = {"method": "Magnitude", "tool": "torch.nn.utils.prune.global_unstructured (L1)"}
    elif source.text:
        with torch.no_grad():
            removed = _prune_ffn(model, sparsity, where)
        facts = {"method": "Structured", "unit": "FFN neurons", "removed": removed}
    else:
        with torch.no_grad():
            removed = _prune_channels(model, sparsity)
        facts = {"method": "Structured", "unit": "convolution channels", "removed": removed}
    after = parameters(model)
    facts.update(
        sparsity=sparsity,
        parametersBefore=before[0],
        parametersAfter=after[0],
        nonZeroParameters=after[1],
        zeroFraction=round(1 - after[1] / after[0], 6),
    )
    return model, facts


def _shrink_linear(layer: Any, keep: Any, dim: int) -> Any:
    """A copy of ``layer`` keeping the output rows (dim 0) or input columns (dim 1) listed in ``keep``."""
    from torch import nn

    w = layer.weight.data.index_select(dim, keep)
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    new.weight.data.copy_(w)
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.data if dim == 1 else layer.bias.data.index_select(0, keep))
    return new


def _prune_ffn(model: Any, sparsity: float, where: str) -> int:
    layers = [m for m in model.modules() if hasattr(m, "intermediate") and hasattr(m, "output")]
    layers = [m for m in layers if hasattr(m.intermediate, "dense") and hasattr(m.output, "dense")]
    if not layers:
        raise UserError(f"{where}.method: Structured pruning supports BERT-style encoders and KilnCNN")
    removed = 0
    for layer in layers:
        up, down = layer.intermediate.dense, layer.output.dense
        score = up.weight.norm(dim=1) * down.weight.norm(dim=0)  # a neuron's weight in and out
        n_keep = max(1, round(up.out_features * (1 - sparsity)))
        keep = score.topk(n_keep).indices.sort().values
        removed += up.out_features - n_keep
        layer.intermediate.dense = _shrink_linear(up, keep, 0)
        layer.output.dense = _shrink_linear(down, keep, 1)
    return removed


def _prune_channels(model: Any, sparsity: float) -> int:
    """KilnCNN: conv1 -> conv2 -> pool -> conv3 -> pool(4) -> flatten -> Linear; drop the weakest channels."""
    import torch
    from torch import nn

    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    removed = 0
    for i, conv in enumerate(convs):
        n_keep = max(1, round(conv.out_channels * (1 - sparsity)))
        keep = conv.weight.flatten(1).norm(dim=1).topk(n_keep).indices.sort().values
        removed += conv.out_channels - n_keep
        new = nn.Conv2d(conv.in_channels, n_keep, conv.kernel_size, padding=conv.padding)
        new.weight.data.copy_(conv.weight.data[keep])
        new.bias.data.copy_(conv.bias.data[keep])
        _replace(model.features, conv, new)
        if i + 1 < len(convs):
            nxt = convs[i + 1]
            convs[i + 1] = nn.Conv2d(n_keep, nxt.out_channels, nxt.kernel_size, padding=nxt.padding)
            convs[i + 1].weight.data.copy_(nxt.weight.data[:, keep])
            convs[i + 1].bias.data.copy_(nxt.bias.data)
            _replace(model.features, nxt, convs[i + 1])
        else:  # the head's first Linear reads channel c at columns c*16 .. c*16+15 (4x4 pooled)
            lin = model.head[1]
            cols = (keep[:, None] * 16 + torch.arange(16)).flatten()
            model.head[1] = _shrink_linear(lin, cols, 1)
    return removed


def _replace(seq: Any, old: Any, new: Any) -> None:
    for i, m in enumerate(seq):
        if m is old:
            seq[i] = new
            return


# --- distillation ---------------------------------------------------------------------------------------------


def distill(
    teacher: Any, source: Source, params: Mapping[str, Any], data: Data, max_length: int, where: str, student: Source
) -> tuple[Any, dict[str, Any]]:
    """Task-specific KD: L = alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(labels), AdamW with the
    trainer's defaults (lr 5e-5 transformers, 2e-3 KilnCNN; linear decay), batches of 16, seed 42."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(42)
    model = build_torch(student)
    model.train()
    lr = 5e-5 if student.text else 2e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps, temp, alpha = int(params["maxSteps"]), float(params["temperature"]), float(params["alpha"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    rng = np.random.default_rng(42)
    batch = 16
    n = len(data)
    order = rng.permutation(n)
    pos = 0
    losses = []
    for _ in range(steps):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch]
        pos += batch
        x = [data.x[i] for i in idx] if source.text else data.x[idx]
        y = torch.from_numpy(np.asarray(data.y[idx]))
        with torch.no_grad():
            tf = feeds(source, x, max_length)
            t_logits = teacher(*[torch.from_numpy(tf[k]) for k in source.input_names]).float()
        sf = feeds(student, x, max_length)
        s_logits = model(*[torch.from_numpy(sf[k]) for k in student.input_names])
        kd = F.kl_div(F.log_softmax(s_logits / temp, -1), F.softmax(t_logits / temp, -1), reduction="batchmean")
        loss = alpha * temp * temp * kd + (1 - alpha) * F.cross_entropy(s_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    facts = {
        "student": student.uri,
        "studentDigest": student.digest,
        "steps": steps,
        "temperature": temp,
        "alpha": alpha,
        "learningRate": lr,
        "batchSize": batch,
        "dataset": data.uri,
        "finalLoss": round(float(np.mean(losses[-10:])), 6),
        "teacherParameters": parameters(teacher)[0],
        "studentParameters": parameters(model)[0],
    }
    return model, facts
