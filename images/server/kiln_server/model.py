"""The served model: a verified kiln artifact (format onnx) in an ONNX Runtime session, its request validation
(``prepare``), batch assembly with per-batch padding (``run_batch``) and warm-up."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln_artifacts.contract import ExitCode

from .config import Config
from .errors import BadRequest, StartupError
from .protocol import InferRequest, OutputTensor, Tensor

if TYPE_CHECKING:
    from .monitor import Monitor

log = logging.getLogger("kiln_server")

TASKS = ("text-classification", "image-classification")
PRECISIONS = ("fp32", "fp16", "int8")
TEXT_TENSORS = ("input_ids", "attention_mask", "token_type_ids")
INT_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT8", "UINT16", "UINT32")
FLOAT_TYPES = ("FP32", "FP16", "FP64")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
WARMUP_TEXT = "Kiln warms the model up on a representative sentence before it reports ready."


@dataclass(frozen=True)
class ModelSpec:
    """``kiln-model.json``: what the compressor says about the model, beyond the ONNX graph."""

    task: str
    labels: tuple[str, ...] | None
    max_sequence_length: int | None
    image_shape: tuple[int, ...] | None
    precision: str

    @classmethod
    def parse(cls, doc: Any, manifest_task: str | None) -> ModelSpec:
        where = "kiln-model.json"
        if not isinstance(doc, dict):
            raise StartupError(ExitCode.CONTRACT, f"{where}: must be a JSON object")
        task = doc.get("task", manifest_task)
        if task not in TASKS:
            raise StartupError(ExitCode.CONTRACT, f"{where}: task must be one of {', '.join(TASKS)}, got {task!r}")
        if manifest_task is not None and task != manifest_task:
            raise StartupError(
                ExitCode.CONTRACT, f"{where}: task {task!r} differs from the manifest's {manifest_task!r}"
            )
        labels = doc.get("labels")
        if labels is not None and (
            not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
        ):
            raise StartupError(ExitCode.CONTRACT, f"{where}: labels must be a non-empty list of non-empty strings")
        precision = doc.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise StartupError(ExitCode.CONTRACT, f"{where}: precision must be one of {', '.join(PRECISIONS)}")
        max_len = doc.get("maxSequenceLength")
        shape = doc.get("imageShape")
        if task == "text-classification":
            if max_len is None:
                max_len = 512
            if not isinstance(max_len, int) or isinstance(max_len, bool) or not 2 <= max_len <= 65536:
                raise StartupError(ExitCode.CONTRACT, f"{where}: maxSequenceLength must be an integer 2-65536")
            shape = None
        else:
            if (
                not isinstance(shape, list)
                or len(shape) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 16384 for d in shape)
            ):
                raise StartupError(
                    ExitCode.CONTRACT, f"{where}: imageShape must be [channels, height, width], got {shape!r}"
                )
            max_len = None
        return cls(task, tuple(labels) if labels else None, max_len, tuple(shape) if shape else None, precision)


def _providers(config: Config, available: Sequence[str], precision: str) -> tuple[list[Any], list[str]]:
    """(providers for the session, the GPU providers that were asked for explicitly)."""
    cuda = ("CUDAExecutionProvider", {"device_id": config.device_id, "cudnn_conv_algo_search": "HEURISTIC"})
    if config.provider == "cpu":
        return ["CPUExecutionProvider"], []
    if config.provider == "cuda":
        return [cuda, "CPUExecutionProvider"], ["CUDAExecutionProvider"]
    if config.provider == "tensorrt":
        trt = (
            "TensorrtExecutionProvider",
            {
                "device_id": config.device_id,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": config.trt_cache_dir,
                "trt_fp16_enable": precision == "fp16",
                "trt_int8_enable": precision == "int8",
            },
        )
        return [trt, cuda, "CPUExecutionProvider"], ["TensorrtExecutionProvider"]
    if "CUDAExecutionProvider" in available:  # auto: the GPU when this onnxruntime build and the node have one
        return [cuda, "CPUExecutionProvider"], []
    return ["CPUExecutionProvider"], []


class Model:
    """Loaded once at start; ``run_batch`` is called from the batcher's executor threads."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.model_name
        self.version = "1"
        self.ready = False
        self.not_ready_reason = "loading"
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.digest = ""
        self.uri = config.model_uri
        self.trusted_key: str | None = None  # the trusted key that signed the artifact (--trusted-keys)
        self.providers: list[str] = []
        self.requested_gpu: list[str] = []
        self.tokenizer: Any = None
        self.pad_id = 0
        self.unk_id: int | None = None
        self.vocab_size = 0
        self.session: Any = None
        self.spec: ModelSpec | None = None
        self.input_names: list[str] = []
        self.input_dtype: np.dtype[Any] = np.dtype(np.float32)
        self.num_labels = -1
        self.artifact: Any = None
        # Set once the model is warmed up (warm-up batches are not traffic): every executed batch is observed.
        self.monitor: Monitor | None = None

    # ---------------------------------------------------------------- loading
    def load(self) -> None:
        """Verify the artifact, build the session, warm up. Raises StartupError."""
        started = time.monotonic()
        import kiln_artifacts as ka

        trusted = None
        if self.config.trusted_keys:
            try:
                trusted = ka.TrustedKeys.from_dir(self.config.trusted_keys, what="--trusted-keys")
            except ka.KeyFileError as e:  # checked with the flags, so changed since: a mounted ConfigMap was edited
                raise StartupError(ExitCode.USER_ERROR, str(e)) from e
        try:
            # With trusted keys, the signature is checked first: no file of a refused artifact is read.
            art = ka.load(
                self.config.model_uri,
                verify=self.config.verify,  # type: ignore[arg-type]
                expected_digest=self.config.model_digest,
                trusted_keys=trusted,
            )
        except ka.UntrustedArtifactError as e:
            raise StartupError(ExitCode.UNTRUSTED, f"artifact {e}") from e
        except ka.ArtifactError as e:
            raise StartupError(ExitCode.ARTIFACT, f"artifact {self.config.model_uri}: {type(e).__name__}: {e}") from e
        except OSError as e:
            raise StartupError(ExitCode.ARTIFACT, f"artifact {self.config.model_uri}: cannot be read: {e}") from e
        self.digest, self.uri = art.digest, art.uri
        self.trusted_key = art.trusted_key
        self.artifact = art
        manifest = art.manifest
        if manifest.format != "onnx":
            raise StartupError(ExitCode.CONTRACT, f"artifact {art.uri}: format must be onnx, got {manifest.format!r}")
        for required in ("model.onnx", "kiln-model.json"):
            if required not in art.files:
                raise StartupError(ExitCode.CONTRACT, f"artifact {art.uri}: has no {required}")
        try:
            doc = json.loads(art.read_bytes("kiln-model.json"))
        except ValueError as e:
            raise StartupError(ExitCode.CONTRACT, f"artifact {art.uri}: kiln-model.json is not JSON: {e}") from e
        except ka.ArtifactError as e:
            raise StartupError(ExitCode.ARTIFACT, f"artifact {art.uri}: {e}") from e
        self.spec = ModelSpec.parse(doc, manifest.task)
        if self.spec.task == "text-classification":
            self._load_tokenizer(art)
        try:
            model_path = art.path("model.onnx")
        except ka.ArtifactError as e:
            raise StartupError(ExitCode.ARTIFACT, f"artifact {art.uri}: {e}") from e
        self._create_session(model_path)
        self._check_graph()
        self.load_seconds = time.monotonic() - started
        log.info(
            "loaded %s (%s, %s%s) in %.2fs on %s",
            art.uri,
            self.digest,
            self.spec.task,
            f", signed by trusted key {self.trusted_key}" if self.trusted_key else "",
            self.load_seconds,
            self.providers,
        )
        started = time.monotonic()
        try:
            self.warm_up()
        except Exception as e:
            raise StartupError(ExitCode.RUNTIME, f"warm-up failed: {type(e).__name__}: {e}") from e
        self.warmup_seconds = time.monotonic() - started
        log.info("warmed up in %.2fs", self.warmup_seconds)
        gpu_missing = [p for p in self.requested_gpu if p not in self.providers]
        if gpu_missing:
            self.not_ready_reason = (
                f"requested execution provider {', '.join(gpu_missing)} is not active (active: "
                f"{', '.join(self.providers)}); check the GPU, driver and onnxruntime-gpu build"
            )
            log.error("not ready: %s", self.not_ready_reason)
        else:
            self.ready = True
            self.not_ready_reason = ""

    def _load_tokenizer(self, art: Any) -> None:
        from tokenizers import Tokenizer

        if "tokenizer.json" not in art.files:
            raise StartupError(ExitCode.CONTRACT, f"artifact {art.uri}: a text model needs tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(art.path("tokenizer.json")))
        except Exception as e:
            raise StartupError(ExitCode.CONTRACT, f"artifact {art.uri}: tokenizer.json: {e}") from e
        assert self.spec is not None
        assert self.spec.max_sequence_length is not None
        tok.no_padding()
        tok.enable_truncation(self.spec.max_sequence_length)
        config: dict[str, Any] = {}
        if "tokenizer_config.json" in art.files:
            try:
                loaded = json.loads(art.read_bytes("tokenizer_config.json"))
            except ValueError:
                loaded = None
            config = loaded if isinstance(loaded, dict) else {}
        pad_id = _token_id(tok, config.get("pad_token"))
        self.pad_id = pad_id if pad_id is not None else 0
        # The unknown token, for the share of unknown tokens that monitoring watches: tokenizer_config.json's,
        # else the one the tokenizer's model declares in tokenizer.json.
        unk_id = _token_id(tok, config.get("unk_token"))
        if unk_id is None:
            try:
                model_doc = json.loads(art.read_bytes("tokenizer.json")).get("model") or {}
            except (ValueError, AttributeError):
                model_doc = {}
            unk_id = _token_id(tok, model_doc.get("unk_token"))
            if unk_id is None and isinstance(model_doc.get("unk_id"), int):  # Unigram models name it by id
                unk_id = int(model_doc["unk_id"])
        self.unk_id = unk_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.tokenizer = tok

    def _create_session(self, model_path: Path) -> None:
        import onnxruntime as ort

        assert self.spec is not None
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.config.intra_op_threads
        so.inter_op_num_threads = self.config.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.config.graph_optimization]
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.config.allow_spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if self.config.allow_spinning else "0")
        providers, self.requested_gpu = _providers(self.config, ort.get_available_providers(), self.spec.precision)
        if self.config.provider == "tensorrt":
            os.makedirs(self.config.trt_cache_dir, exist_ok=True)
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as e:
            raise StartupError(ExitCode.RUNTIME, f"model.onnx: ONNX Runtime cannot load it: {e}") from e
        self.providers = list(self.session.get_providers())

    def _check_graph(self) -> None:
        assert self.spec is not None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "logits" not in outputs:
            raise StartupError(ExitCode.CONTRACT, f"model.onnx: needs an output 'logits', has {sorted(outputs)}")
        if self.spec.task == "text-classification":
            extra = set(inputs) - set(TEXT_TENSORS)
            missing = {"input_ids", "attention_mask"} - set(inputs)
            if extra or missing:
                raise StartupError(
                    ExitCode.CONTRACT,
                    "model.onnx: a text model takes input_ids, attention_mask (and token_type_ids); "
                    f"has {sorted(inputs)}",
                )
            self.input_names = [n for n in TEXT_TENSORS if n in inputs]
        else:
            if set(inputs) != {"pixel_values"}:
                raise StartupError(
                    ExitCode.CONTRACT, f"model.onnx: an image model takes pixel_values; has {sorted(inputs)}"
                )
            kind = inputs["pixel_values"].type
            if kind not in ("tensor(float)", "tensor(float16)"):
                raise StartupError(ExitCode.CONTRACT, f"model.onnx: pixel_values must be float or float16, is {kind}")
            self.input_dtype = np.dtype(np.float16 if kind == "tensor(float16)" else np.float32)
            self.input_names = ["pixel_values"]
        shape = outputs["logits"].shape
        if len(shape) == 2 and isinstance(shape[1], int):
            self.num_labels = shape[1]
        elif self.spec.labels:
            self.num_labels = len(self.spec.labels)
        if self.spec.labels and self.num_labels != len(self.spec.labels):
            raise StartupError(
                ExitCode.CONTRACT,
                f"kiln-model.json: {len(self.spec.labels)} labels, but logits have {self.num_labels} classes",
            )

    def warm_up(self) -> None:
        """Run representative inputs at the shapes serving will see (batch 1 and the largest batch; short and
        longest sequences), so the first requests do not pay for allocation, kernel selection or engine builds."""
        assert self.spec is not None
        sizes = sorted({1, self.config.max_batch_size})
        for _ in range(self.config.warmup_rounds):
            for n in sizes:
                if self.spec.task == "text-classification":
                    assert self.spec.max_sequence_length is not None
                    long_text = " ".join([WARMUP_TEXT] * (self.spec.max_sequence_length // 8 + 1))
                    self.run_batch([TextBatch([WARMUP_TEXT] * n)])
                    out = self.run_batch([TextBatch([long_text] * n)])
                else:
                    assert self.spec.image_shape is not None
                    out = self.run_batch([np.zeros((n, *self.spec.image_shape), dtype=self.input_dtype)])
                if out.shape[0] != n or not np.isfinite(out).all():
                    raise RuntimeError(f"batch of {n}: logits of shape {out.shape}, finite: {np.isfinite(out).all()}")
                if self.num_labels < 0 and out.ndim == 2:  # a graph with a dynamic class axis and no labels
                    self.num_labels = int(out.shape[1])

    # ------------------------------------------------------------- metadata
    def metadata(self) -> dict[str, Any]:
        assert self.spec is not None
        if self.spec.task == "text-classification":
            inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}] + [
                {"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in self.input_names
            ]
        else:
            dtype = "FP16" if self.input_dtype == np.float16 else "FP32"
            inputs = [{"name": "pixel_values", "datatype": dtype, "shape": [-1, *(self.spec.image_shape or ())]}]
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": self.output_metadata(),
            "parameters": {
                "task": self.spec.task,
                "digest": self.digest,
                **({"signed_by": self.trusted_key} if self.trusted_key else {}),
                "uri": self.uri,
                "precision": self.spec.precision,
                "execution_providers": self.providers,
                "max_batch_size": self.config.max_batch_size,
                **({"labels": list(self.spec.labels)} if self.spec.labels else {}),
                **({"max_sequence_length": self.spec.max_sequence_length} if self.spec.max_sequence_length else {}),
            },
        }

    def output_metadata(self) -> list[dict[str, Any]]:
        assert self.spec is not None
        out = [{"name": "logits", "datatype": "FP32", "shape": [-1, self.num_labels]}]
        if self.spec.labels:
            out.append({"name": "label", "datatype": "BYTES", "shape": [-1]})
        return out

    # ------------------------------------------------------------ requests
    def prepare(self, request: InferRequest) -> tuple[Any, int]:
        """Validate a parsed request against this model: (payload for the batcher, number of samples)."""
        assert self.spec is not None
        if request.outputs is not None:
            known = {o["name"] for o in self.output_metadata()}
            for name in request.outputs:
                if name not in known:
                    raise BadRequest(f"output {name!r}: unknown; this model has {', '.join(sorted(known))}")
        if self.spec.task == "text-classification":
            payload, n = self._prepare_text(request.inputs)
        else:
            payload, n = self._prepare_image(request.inputs)
        if n < 1:
            raise BadRequest("batch size: a request needs at least one sample (first dimension 0)")
        if n > self.config.max_batch_size:
            raise BadRequest(f"batch size: {n} samples is over this server's limit of {self.config.max_batch_size}")
        return payload, n

    def _prepare_text(self, inputs: dict[str, Tensor]) -> tuple[Any, int]:
        assert self.spec is not None
        assert self.spec.max_sequence_length is not None
        names = set(inputs)
        if "text" in names:
            if names != {"text"}:
                raise BadRequest(f"inputs: 'text' cannot be combined with {', '.join(sorted(names - {'text'}))}")
            t = inputs["text"]
            if t.datatype != "BYTES":
                raise BadRequest(f"input 'text': datatype must be BYTES, got {t.datatype}")
            if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
                raise BadRequest(f"input 'text': shape must be [batch] or [batch, 1], got {list(t.shape)}")
            texts: list[str] = []
            assert isinstance(t.data, list)
            for i, raw in enumerate(t.data):
                try:
                    texts.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise BadRequest(f"input 'text': element {i} is not UTF-8 ({e.reason} at byte {e.start})") from None
            return TextBatch(texts), t.shape[0]
        allowed = set(self.input_names)
        unknown = names - allowed
        if unknown:
            raise BadRequest(
                f"inputs: unknown {', '.join(sorted(map(repr, unknown)))}; this model takes 'text' (BYTES) or "
                f"{', '.join(map(repr, self.input_names))} (INT64)"
            )
        missing = {"input_ids", "attention_mask"} - names
        if missing:
            raise BadRequest(f"inputs: missing {', '.join(sorted(map(repr, missing)))} (or send 'text')")
        shape = inputs["input_ids"].shape
        arrays: dict[str, np.ndarray] = {}
        for name, t in inputs.items():
            if t.datatype not in INT_TYPES:
                raise BadRequest(f"input {name!r}: datatype must be INT64 (or another integer type), got {t.datatype}")
            if len(t.shape) != 2:
                raise BadRequest(f"input {name!r}: shape must be [batch, sequence], got {list(t.shape)}")
            if t.shape != shape:
                raise BadRequest(f"input {name!r}: shape {list(t.shape)} differs from input_ids' {list(shape)}")
            assert isinstance(t.data, np.ndarray)
            arrays[name] = t.data.astype(np.int64)
        if shape[1] > self.spec.max_sequence_length:
            raise BadRequest(
                f"input 'input_ids': sequence length {shape[1]} is over the model's {self.spec.max_sequence_length}"
            )
        if shape[1] == 0:
            raise BadRequest("input 'input_ids': sequence length must be at least 1")
        ids = arrays["input_ids"]
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise BadRequest(
                f"input 'input_ids': token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        mask = arrays["attention_mask"]
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise BadRequest("input 'attention_mask': values must be 0 or 1")
        types = arrays.get("token_type_ids")
        if types is not None and types.size and (types.min() < 0 or types.max() > 1):
            raise BadRequest("input 'token_type_ids': values must be 0 or 1")
        return TokenBatch(ids, mask, types), shape[0]

    def _prepare_image(self, inputs: dict[str, Tensor]) -> tuple[Any, int]:
        assert self.spec is not None
        assert self.spec.image_shape is not None
        if set(inputs) != {"pixel_values"}:
            raise BadRequest(f"inputs: this model takes exactly 'pixel_values', got {', '.join(map(repr, inputs))}")
        t = inputs["pixel_values"]
        if t.datatype not in FLOAT_TYPES:
            raise BadRequest(f"input 'pixel_values': datatype must be FP32 (or FP16, FP64), got {t.datatype}")
        want = [-1, *self.spec.image_shape]
        if len(t.shape) != 4 or tuple(t.shape[1:]) != self.spec.image_shape:
            raise BadRequest(f"input 'pixel_values': shape must be {want} (-1: batch), got {list(t.shape)}")
        assert isinstance(t.data, np.ndarray)
        if not np.isfinite(t.data).all():
            raise BadRequest("input 'pixel_values': values must be finite (no NaN or infinity)")
        return t.data.astype(self.input_dtype, copy=False), t.shape[0]

    def outputs_for(self, logits: np.ndarray, request: InferRequest) -> list[OutputTensor]:
        assert self.spec is not None
        wanted = request.outputs
        out: list[OutputTensor] = []
        if wanted is None or "logits" in wanted:
            out.append(OutputTensor("logits", "FP32", logits.shape, logits))
        if self.spec.labels and (wanted is None or "label" in wanted):
            labels = self.spec.labels
            names = [labels[i] for i in logits.argmax(axis=1).tolist()]
            out.append(OutputTensor("label", "BYTES", (len(names),), names))
        return out

    # -------------------------------------------------------------- batches
    def run_batch(self, payloads: Sequence[Any]) -> np.ndarray:
        """Merge the payloads of one batch, run, return float32 logits with one row per sample in payload order.

        Text is padded per run to the longest sequence in it. A text batch of more than ``--text-bucket-size``
        samples is sorted by length and run in chunks of that size, so short sentences are not padded to the
        longest one of a big batch (less wasted attention and matmul work); rows go back in their order."""
        assert self.spec is not None
        monitor = self.monitor
        if self.spec.task != "text-classification":
            pixels = payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
            logits = self._run({"pixel_values": pixels})
            if monitor is not None:
                monitor.observe_images(pixels, logits)
            return logits
        rows = self._text_rows(payloads)
        bucket = self.config.text_bucket_size
        if not bucket or len(rows) <= bucket:
            feeds = self._pad(rows)
            logits = self._run(feeds)
            if monitor is not None:
                monitor.observe_tokens([feeds], logits)
            return logits
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        parts = []
        runs = []
        for start in range(0, len(order), bucket):
            chunk = order[start : start + bucket]
            feeds = self._pad([rows[i] for i in chunk])
            runs.append(feeds)
            parts.append((chunk, self._run(feeds)))
        out = np.empty((len(rows), parts[0][1].shape[1]), dtype=np.float32)
        for chunk, logits in parts:
            out[chunk] = logits
        if monitor is not None:  # each run's features with its own logits: the order of the runs, not the rows
            monitor.observe_tokens(runs, np.concatenate([logits for _, logits in parts]))
        return out

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run(["logits"], feeds)
        return np.asarray(logits, dtype=np.float32)

    def _text_rows(self, payloads: Sequence[Any]) -> list[tuple[Sequence[int], Sequence[int], Sequence[int] | None]]:
        texts = [t for p in payloads if isinstance(p, TextBatch) for t in p.texts]
        encoded = iter(self.tokenizer.encode_batch(texts, add_special_tokens=True) if texts else ())
        rows: list[tuple[Sequence[int], Sequence[int], Sequence[int] | None]] = []
        for p in payloads:
            if isinstance(p, TextBatch):
                for _ in p.texts:
                    e = next(encoded)
                    rows.append((e.ids, e.attention_mask, e.type_ids))
            else:
                for i in range(p.input_ids.shape[0]):
                    rows.append(
                        (p.input_ids[i], p.attention_mask[i], None if p.token_type_ids is None else p.token_type_ids[i])
                    )
        return rows

    def _pad(self, rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int] | None]]) -> dict[str, np.ndarray]:
        width = max(len(r[0]) for r in rows)
        n = len(rows)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for i, (r_ids, r_mask, r_types) in enumerate(rows):
            k = len(r_ids)
            ids[i, :k] = r_ids
            mask[i, :k] = r_mask
            if r_types is not None:
                types[i, :k] = r_types
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = types
        return feeds


def _token_id(tok: Any, token: Any) -> int | None:
    """The id of a special token as tokenizer configs give it (a string, or an object with ``content``)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    found = tok.token_to_id(token)
    return int(found) if found is not None else None


@dataclass
class TextBatch:
    texts: list[str]


@dataclass
class TokenBatch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
