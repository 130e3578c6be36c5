"""Sources and data: what the compressor accepts, checked before any model is built.

Sources are kiln model artifacts of the trainer: ``hf-transformers`` sequence classifiers (text) and ``KilnCNN``
(kiln_artifacts.models: ``safetensors`` + ``config.json`` with ``architecture: KilnCNN``; images). Data sets are
the trainer's formats (``idx`` images, ``jsonl`` text), read with the loader it uses (kiln_artifacts.datasets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kiln_artifacts as ka
from kiln_artifacts.contract import InfrastructureError, UntrustedError, UserError, WorkloadError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# model_type -> the ORT transformer optimizer's model_type (BERT-like encoders it has fusions for).
OPTIMIZER_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert"}


@dataclass
class Source:
    uri: str
    digest: str | None
    path: Path
    task: str  # text-classification | image-classification
    format: str
    config: dict[str, Any]
    classes: list[str]
    size_bytes: int
    input_names: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] | None = None  # [C, H, W], from the evaluation data (KilnCNN pools any size)
    trusted_key: str | None = None  # the trusted key whose signature verified it (--trusted-keys)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def text(self) -> bool:
        return self.task == "text-classification"

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tokenizer


@dataclass
class Data:
    uri: str
    digest: str | None
    split: str
    x: Any  # list[str] or uint8 [n, h, w]
    y: Any  # int64 [n]

    def __len__(self) -> int:
        return len(self.y)


def load_artifact(
    uri: str, where: str, expected_digest: str | None = None, trusted_keys: ka.TrustedKeys | None = None
) -> ka.LoadedArtifact | Path:
    """A verified artifact, or a plain local folder (hand-made inputs, as the trainer accepts them). With
    ``trusted_keys``, the artifact's signature is checked before any of its files is read, and a plain folder,
    which has no signature, is refused."""
    try:
        return ka.load(uri, expected_digest=expected_digest, trusted_keys=trusted_keys)
    except ka.UntrustedArtifactError as e:
        raise UntrustedError(f"{where}: {e}") from None
    except ka.ArtifactNotFoundError as e:
        local = ka.parse_uri(uri).local_path()
        if local is not None and local.is_dir() and expected_digest is None:
            if trusted_keys is not None:
                raise UntrustedError(
                    f"{where}: {uri}: unsigned: a plain folder without {ka.MANIFEST_NAME} has no signature, and "
                    f"--trusted-keys requires one by {', '.join(trusted_keys.ids)}"
                ) from None
            return local
        raise UserError(f"{where} {uri}: not found ({e})") from None
    except (ka.IntegrityError, ka.InvalidManifestError) as e:
        raise UserError(f"{where} {uri}: {e}") from None
    except ka.InvalidURIError as e:
        raise UserError(f"{where}: {e}") from None
    except (ka.CredentialsError, OSError) as e:
        raise InfrastructureError(f"{where} {uri}: storage unreachable: {type(e).__name__}: {e}") from None


def resolve_model(
    uri: str,
    where: str,
    expected_digest: str | None = None,
    *,
    student_classes: list[str] | None = None,
    trusted_keys: ka.TrustedKeys | None = None,
) -> Source:
    """Load and classify a model folder; anything the compressor cannot compress is a UserError here, a model
    ``trusted_keys`` do not vouch for an UntrustedError.

    A distillation student (``student_classes`` given) may be a pretrained encoder without a classification head
    (e.g. the packaged MiniLM): it gets a new head with those classes."""
    art = load_artifact(uri, where, expected_digest, trusted_keys)
    src = _classify(uri, where, art, student_classes)
    src.trusted_key = None if isinstance(art, Path) else art.trusted_key
    return src


def _classify(uri: str, where: str, art: ka.LoadedArtifact | Path, student_classes: list[str] | None) -> Source:
    path = art if isinstance(art, Path) else art.root
    manifest = None if isinstance(art, Path) else art.manifest
    if manifest is not None and manifest.kind != "model":
        raise UserError(f"{where} {uri}: is a {manifest.kind} artifact, not a model")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        fmt = manifest.format if manifest else "a folder"
        raise UserError(f"{where} {uri}: not a supported model ({fmt} without config.json)") from None
    except ValueError as e:
        raise UserError(f"{where} {uri}: config.json is not valid JSON: {e}") from None
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{where} {uri}: not a supported model (no model.safetensors)")
    size = manifest.size if manifest else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    digest = manifest.digest if manifest else None
    fmt = manifest.format if manifest else ("safetensors" if "architecture" in config else "hf-transformers")
    if config.get("architecture") == "KilnCNN":
        classes = [str(c) for c in config.get("classes") or range(int(config["num_classes"]))]
        return Source(uri, digest, path, "image-classification", fmt, config, classes, size, ("pixel_values",))
    if "model_type" not in config:
        raise UserError(f"{where} {uri}: not a supported model (config.json has neither model_type nor KilnCNN)")
    if student_classes is not None:
        if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
            raise UserError(f"{where} {uri}: no tokenizer (tokenizer.json or vocab.txt)")
        src = Source(uri, digest, path, "text-classification", fmt, config, list(student_classes), size)
        names = tuple(n for n in TEXT_INPUTS if n in src.tokenizer().model_input_names)
        src.input_names = names if "input_ids" in names else ("input_ids", "attention_mask")
        return src
    if manifest is not None and manifest.task not in (None, "text-classification"):
        raise UserError(
            f"{where} {uri}: task {manifest.task} is not supported (text-classification or image-classification; "
            "fine-tune it with a TrainingJob first)"
        )
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or "id2label" not in config:
        raise UserError(
            f"{where} {uri}: {config.get('model_type')} model without a sequence-classification head "
            f"(architectures {archs}); fine-tune it with a TrainingJob first"
        )
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise UserError(f"{where} {uri}: no tokenizer (tokenizer.json or vocab.txt)")
    id2label = config["id2label"]
    classes = [str(id2label[k]) for k in sorted(id2label, key=int)]
    src = Source(uri, digest, path, "text-classification", fmt, config, classes, size)
    names = tuple(n for n in TEXT_INPUTS if n in src.tokenizer().model_input_names)
    src.input_names = names if "input_ids" in names else ("input_ids", "attention_mask")
    return src


def load_data(uri: str, where: str, source: Source, *, split: str = "test") -> Data:
    """A data set that matches the source model's task and classes (the trainer reads the same formats)."""
    from kiln_artifacts.datasets import load_dataset

    try:
        ds = load_dataset(uri, None)
    except WorkloadError as e:
        raise UserError(f"{where}: {e.message.removeprefix('dataset.uri ')}") from None
    if ds.task != source.task:
        raise UserError(f"{where} {uri}: holds {ds.task} data, the source model does {source.task}")
    if len(ds.classes) != len(source.classes):
        raise UserError(f"{where} {uri}: {len(ds.classes)} classes, the source model has {len(source.classes)} outputs")
    if split == "test" and ds.test_y is not None:
        x, y = ds.test_x, ds.test_y
    else:
        x, y, split = ds.train_x, ds.train_y, "train"
    if not source.text:
        channels = int(source.config.get("in_channels", 1))
        if channels != 1:
            raise UserError(f"{where} {uri}: grayscale [n, h, w] images, the model expects {channels} channels")
    return Data(uri, ds.source.digest, split, x, y)


def image_shape(data: Data) -> tuple[int, int, int]:
    return (1, int(data.x.shape[1]), int(data.x.shape[2]))


def check_same_shape(data: Data, reference: Data, where: str) -> None:
    """Calibration images must have the evaluation images' shape (the exported model's input)."""
    if data.x.shape[1:] != reference.x.shape[1:]:
        raise UserError(
            f"{where} {data.uri}: images are {tuple(data.x.shape[1:])}, the model input (from "
            f"evaluation.dataset) is {tuple(reference.x.shape[1:])}"
        )


def feeds(source: Source, x: Any, max_length: int, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Model inputs as numpy arrays: int64 token tensors for text, normalised float32 pixels for images."""
    import numpy as np

    if source.text:
        enc = source.tokenizer()(
            list(x), padding="longest", truncation=True, max_length=max_length, return_tensors="np"
        )
        return {n: np.asarray(enc[n], dtype=np.int64) for n in names or source.input_names}
    pixels = np.asarray(x, dtype=np.float32)[:, None, :, :] / np.float32(127.5) - np.float32(1.0)
    return {"pixel_values": pixels.astype(np.float32)}


def input_features(source: Source, f: dict[str, Any]) -> dict[str, Any]:
    """The reference profile's input signals of one batch of `feeds`, equal to what the server computes from live
    requests: text, the tokens per input and the unknown-token share from the padded ids and their attention mask
    (the server tokenizes each text without padding, which gives the same counts); images, the per-channel
    statistics of ``pixel_values`` (what a client sends)."""
    from kiln_artifacts import profile

    if source.text:
        import numpy as np

        tok = source.tokenizer()
        ids = f["input_ids"]
        mask = f.get("attention_mask")
        if mask is None:  # a tokenizer without a mask pads with its pad token
            mask = ids != tok.pad_token_id if tok.pad_token_id is not None else np.ones_like(ids)
        return profile.token_features(ids, mask, tok.unk_token_id)
    return profile.image_features(f["pixel_values"])


def build_torch(source: Source) -> Any:
    """The source as an eval-mode torch module ``forward(*inputs) -> logits`` (inputs in source.input_names order)."""
    import torch
    from torch import nn

    if source.text:
        from transformers import AutoModelForSequenceClassification

        # eager attention: the ORT transformer optimizer fuses its subgraph into Attention; SDPA's is not matched.
        classes = source.classes
        hf = AutoModelForSequenceClassification.from_pretrained(
            str(source.path),
            local_files_only=True,
            attn_implementation="eager",
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
        )
        names = source.input_names

        class TextLogits(nn.Module):
            def __init__(self, hf_model: nn.Module) -> None:
                super().__init__()
                self.hf = hf_model

            def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
                return self.hf(**dict(zip(names, inputs, strict=True))).logits

        return TextLogits(hf).eval()
    from kiln_artifacts.models import build_image_model

    return build_image_model(len(source.classes), source.path).eval()


def torch_logits(model: Any, source: Source, x: Any, max_length: int, batch: int = 64) -> Any:
    """Logits of the torch model over ``x`` (numpy float32 [n, classes])."""
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            f = feeds(source, x[start : start + batch], max_length)
            args = [torch.from_numpy(f[n]) for n in source.input_names]
            out.append(model(*args).float().numpy())
    return np.concatenate(out).astype(np.float32)
