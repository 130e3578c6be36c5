"""The inputs of the check, made offline on the machine that runs it, as the artifacts the workloads accept.

- images: Fashion-MNIST when its files are here (Debian's ``dataset-fashion-mnist``, or ``KILN_FASHION_MNIST_DIR``),
  else a synthetic set of the same layout (10 classes of 28x28 grayscale: a fixed coarse pattern per class under
  noise), which a small CNN learns in a few hundred steps; the dry run always uses the synthetic set, smaller.
- text: a synthetic two-class set (the sentiment word decides the label), as in the compressor's tests.
- the text model: the packaged all-MiniLM-L6-v2 when it is installed (it does not fit in what may travel to a
  GPU machine), else a BERT encoder of MiniLM's shape with random weights and a WordPiece tokenizer over the set's
  words, built here with transformers and tokenizers: nothing is downloaded.

Every function reuses what an earlier stage made in the work folder, so stages can run alone or in any order.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .common import Context

GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "fine", "brilliant"]
BAD = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bland", "boring"]
THINGS = ["film", "meal", "book", "hotel", "concert", "service", "show", "trip"]
OPENERS = ["the", "our", "that", "this", "my"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = ["the film was wonderful", "my trip was awful", "this book was fine", "our meal was bland and boring"]


def _published(uri: str) -> bool:
    import kiln_artifacts as ka

    try:
        ka.load(uri, verify="lazy")
    except ka.ArtifactError:
        return False
    return True


def _publish(folder: Path, uri: str, *, kind: str, fmt: str, task: str, source: str) -> None:
    import kiln_artifacts as ka

    ka.publish(folder, uri, kind=kind, format=fmt, task=task, lineage=ka.Lineage(source=source), durable=False)


def fashion_mnist_dir() -> Path | None:
    from kiln_artifacts import samples

    folder = Path(os.environ.get("KILN_FASHION_MNIST_DIR") or samples.FASHION_MNIST_DIR)
    files = [f for pair in samples.IDX_FILES.values() for f in pair]
    return folder if all((folder / f).is_file() for f in files) else None


def image_dataset(ctx: Context) -> tuple[str, str]:
    """(uri, what it is) of the image data set artifact."""
    uri = f"file://{ctx.work}/data/image"
    info = ctx.work / "data" / "image-source.txt"
    if _published(uri) and info.is_file():
        return uri, info.read_text().strip()
    real = None if ctx.dry_run else fashion_mnist_dir()
    with tempfile.TemporaryDirectory(dir=ctx.work / "tmp") as tmp:
        if real is not None:
            from kiln_artifacts import samples

            folder = samples.fashion_mnist_dataset(Path(tmp) / "fashion-mnist", source=real)
            what = f"Fashion-MNIST ({real})"
        else:
            folder = _synthetic_images(
                Path(tmp) / "images", ctx.sizes.image_side, ctx.sizes.image_train, ctx.sizes.image_test
            )
            what = f"synthetic Fashion-MNIST-like ({ctx.sizes.image_side}x{ctx.sizes.image_side}, 10 classes)"
        _publish(folder, uri, kind="dataset", fmt="idx", task="image-classification", source=what)
    info.write_text(what + "\n")
    return uri, what


def _synthetic_images(out: Path, side: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Fashion-MNIST's layout and classes: per class a fixed coarse pattern, each image that pattern under noise."""
    import numpy as np

    from kiln_artifacts import samples

    rng = np.random.default_rng(seed)
    cell = -(-side // 4)
    templates = np.kron(rng.random((10, 4, 4)), np.ones((cell, cell)))[:, :side, :side]
    out.mkdir(parents=True)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = 255 * (0.55 * templates[labels] + 0.45 * rng.random((n, side, side)))
        image_file, label_file = samples.IDX_FILES[split]
        samples.write_idx(out / image_file, (n, side, side), images.astype(np.uint8).tobytes())
        samples.write_idx(out / label_file, (n,), labels.astype(np.uint8).tobytes())
        splits[split] = n
    info = {
        "format": "idx",
        "files": {k: list(v) for k, v in samples.IDX_FILES.items()},
        "name": "synthetic-fashion",
        "classes": list(samples.FASHION_MNIST_CLASSES),
        "image_shape": [side, side],
        "splits": splits,
        "source": "kiln gpu check: synthetic",
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def text_dataset(ctx: Context) -> str:
    uri = f"file://{ctx.work}/data/text"
    if _published(uri):
        return uri
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(dir=ctx.work / "tmp") as tmp:
        folder = Path(tmp) / "text"
        folder.mkdir()
        for split, count in (("train", ctx.sizes.text_train), ("test", ctx.sizes.text_test)):
            lines = []
            for _ in range(count):
                label = rng.randrange(2)
                word = rng.choice(GOOD if label else BAD)
                text = f"{rng.choice(OPENERS)} {rng.choice(THINGS)} was {word}"
                lines.append(json.dumps({"text": text, "label": label}))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "dataset.json").write_text(json.dumps({"format": "jsonl", "classes": ["negative", "positive"]}))
        _publish(
            folder, uri, kind="dataset", fmt="jsonl", task="text-classification", source="kiln gpu check: synthetic"
        )
    return uri


def text_base(ctx: Context) -> tuple[str, str]:
    """(uri, what it is) of the model the text runs fine-tune: a folder the trainer accepts as model.uri."""
    if not ctx.dry_run:
        try:
            from kiln_artifacts import samples

            return f"file://{samples.minilm_dir()}", "all-MiniLM-L6-v2 (packaged, pretrained)"
        except Exception:  # not installed (the usual case on a GPU machine): build one of its shape instead
            pass
    hidden, layers, heads, inter = ctx.sizes.bert
    what = f"BERT encoder built here, random weights (hidden {hidden}, {layers} layers, {heads} heads)"
    folder = ctx.work / "base" / "text"
    if (folder / "config.json").is_file():
        return f"file://{folder}", what
    tmp = folder.with_name("text.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(str(tmp))
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=128,
        num_labels=2,
        pad_token_id=0,
    )
    BertForSequenceClassification(config).save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return f"file://{folder}", what


def _tokenizer() -> Any:
    """A WordPiece tokenizer (BERT's normaliser, pre-tokenizer and [CLS] ... [SEP] template) over the set's words,
    with single letters and ``##`` letters so that any other word splits instead of becoming [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for group in (GOOD, BAD, THINGS, OPENERS, ["was", "and"]) for w in group})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = SPECIAL + words + letters + [f"##{c}" for c in letters] + list(".,!?'-")
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
