"""The compressor's inputs: the ModelCompression spec as JSON, validated before any heavy work.

The operator passes ``spec`` through unchanged in ``KILN_COMPRESSION_SPEC`` (or ``--spec FILE``); flags override
single fields. Field names, enums, bounds and defaults are those of ``kiln_operator.api.modelcompression`` (the
CRD), and so are its CEL rules; unknown fields are rejected so that a typo never passes silently. Fields that
are the controller's business (image, resources, scheduling, promotion, ...) are accepted and ignored here. Keys
(``--signing-key``, ``--trusted-keys``) are files mounted from a Secret and a ConfigMap, never part of the spec.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln_artifacts import InvalidURIError, KeyFileError, Producer, parse_uri
from kiln_artifacts.contract import (
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    UserError,
    image_from,
    producer_from,
    spec_from,
)

if TYPE_CHECKING:
    from kiln_artifacts.signing import Signer, TrustedKeys

SIGNING_KEY_ENV = "KILN_SIGNING_KEY"
TRUSTED_KEYS_ENV = "KILN_TRUSTED_KEYS"
STEP_KINDS = ("export", "optimize", "quantize", "float16", "prune", "distill")
TORCH_STEPS = ("prune", "distill")  # applied to the torch model, before the export
ONNX_STEPS = ("optimize", "quantize", "float16")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
DIGEST_CHARS = set("0123456789abcdef")
CONTROLLER_FIELDS = {
    "image", "imagePullPolicy", "env", "resources", "scheduling", "podTemplate", "promotion", "labels",
    "signing", "verification",  # reach the compressor as mounted keys and KILN_* variables
}  # fmt: skip
SPEC_FIELDS = {"source", "target", "recipe", "evaluation", "benchmark", "gates"} | CONTROLLER_FIELDS

# Each step's fields: name -> (kind, default, extra). kind: int, num, bool, enum, list, obj.
STEP_FIELDS: dict[str, dict[str, Any]] = {
    "export": {"opset": 18, "parityTolerance": 1e-4},
    "optimize": {"level": "All", "expectFusions": []},
    "quantize": {"mode": None, "perChannel": False, "format": "QDQ", "calibration": None},
    "float16": {"keepIOTypes": True, "blockList": []},
    "prune": {"method": "Magnitude", "sparsity": None},
    "distill": {"student": None, "dataset": None, "maxSteps": 1000, "temperature": 2.0, "alpha": 0.5},
}


@dataclass(frozen=True)
class Step:
    kind: str
    params: Mapping[str, Any]
    where: str  # the spec path, for messages: recipe.steps[2].quantize

    def describe(self) -> str:
        """One line for status.report.recipe: ``quantize(mode=Dynamic, perChannel=true)``."""
        parts = []
        for k, v in self.params.items():
            if v in (None, [], {}):
                continue
            if isinstance(v, Mapping):
                v = v.get("uri") or v.get("dataset", {}).get("uri") or json.dumps(v, sort_keys=True)
            parts.append(f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
        return f"{self.kind}({', '.join(parts)})"[:256]


@dataclass(frozen=True)
class Config:
    source_uri: str
    source_digest: str | None
    device: str
    provider: str
    precision: str
    steps: tuple[Step, ...] | None
    auto_objective: str | None
    auto_max_candidates: int
    evaluation_uri: str
    evaluation_revision: str | None
    metric: str
    evaluation_samples: int
    batch_sizes: tuple[int, ...]
    sequence_lengths: tuple[int, ...]
    iterations: int
    warmup: int
    gates: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)
    output_uri: str | None = None
    cache_dir: str | None = None
    threads: int = 0
    report_file: str | None = None
    termination_log: str | None = TERMINATION_LOG
    spec: Mapping[str, Any] = field(default_factory=dict)
    producer: Producer | None = None  # the ModelCompression, for the candidate's lineage
    image: str | None = None
    signer: Signer | None = field(default=None, repr=False, compare=False)  # signs the published candidate
    trusted_keys: TrustedKeys | None = field(default=None, repr=False, compare=False)  # the source must verify

    @property
    def max_sequence_length(self) -> int:
        return max(self.sequence_lengths)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln-compressor", description="Kiln compressor (docs/compressor.md).")
    p.add_argument("--spec", help="JSON file with the ModelCompression spec (default: $KILN_COMPRESSION_SPEC)")
    p.add_argument("--source-uri", dest="source.uri", help="the source artifact (the controller resolves refs)")
    p.add_argument("--source-digest", dest="source.digest")
    p.add_argument("--device", dest="target.device")
    p.add_argument("--execution-provider", dest="target.executionProvider")
    p.add_argument("--precision", dest="target.precision")
    p.add_argument("--evaluation-uri", dest="evaluation.uri")
    p.add_argument("--metric", dest="evaluation.metric")
    p.add_argument("--evaluation-samples", dest="evaluation.samples", type=int)
    p.add_argument("--batch-sizes", dest="benchmark.batchSizes", help="comma-separated")
    p.add_argument("--sequence-lengths", dest="benchmark.sequenceLengths", help="comma-separated")
    p.add_argument("--iterations", dest="benchmark.iterations", type=int)
    p.add_argument("--warmup", dest="benchmark.warmup", type=int)
    p.add_argument("--output-uri", help="where the candidate is published (default: $KILN_OUTPUT_URI; absent: not)")
    p.add_argument("--cache-dir", help="step cache (default: $KILN_COMPRESSOR_CACHE, else $TMPDIR/kiln-compressor)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: $KILN_THREADS or ORT's)")
    p.add_argument("--report-file", help="also write the full report here")
    p.add_argument("--termination-log", help="default: $KILN_TERMINATION_LOG or /dev/termination-log")
    p.add_argument(
        "--signing-key", help=f"Ed25519 private key (PKCS8 PEM) to sign the candidate with (${SIGNING_KEY_ENV})"
    )
    p.add_argument(
        "--trusted-keys",
        help=f"directory of Ed25519 public keys (PEM, one per file); the source must verify (${TRUSTED_KEYS_ENV})",
    )
    return p


def _keys(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Signer | None, TrustedKeys | None]:
    """The signing key and the trusted keys, loaded now: a bad key fails before any work, naming its flag or
    variable."""
    from kiln_artifacts.signing import Signer, TrustedKeys

    def source(flag: str, value: str | None, variable: str) -> tuple[str | None, str]:
        return (value, flag) if value else (env.get(variable) or None, variable)

    key, key_from = source("--signing-key", args.signing_key, SIGNING_KEY_ENV)
    trusted, trusted_from = source("--trusted-keys", args.trusted_keys, TRUSTED_KEYS_ENV)
    try:
        signer = Signer.from_file(key, what=key_from) if key else None
        keys = TrustedKeys.from_dir(trusted, what=trusted_from) if trusted else None
    except KeyFileError as e:
        raise UserError(str(e)) from None
    return signer, keys


def _spec_from(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    spec = spec_from(args.spec, env, "KILN_COMPRESSION_SPEC")
    for dest, value in vars(args).items():
        if "." not in dest or value is None:
            continue
        section, key = dest.split(".", 1)
        if key in ("batchSizes", "sequenceLengths"):
            try:
                value = [int(v) for v in str(value).split(",") if v.strip()]
            except ValueError:
                raise UserError(f"{section}.{key}: must be comma-separated integers, got {value!r}") from None
        if section == "evaluation" and key == "uri":
            spec.setdefault("evaluation", {}).setdefault("dataset", {})["uri"] = value
            continue
        if section == "source" and key == "uri":
            spec.setdefault("source", {}).pop("trainingJobRef", None)  # the controller resolved the ref
        spec.setdefault(section, {})[key] = value
    return spec


# --- small checkers: each raises a UserError naming the field and the rule -------------------------------------


def _obj(value: Any, where: str, allowed: set[str] | Mapping[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return value


def _enum(value: Any, where: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise UserError(f"{where}: must be in {lo}..{hi}, got {value}")
    return value


def _num(value: Any, where: str, lo: float, hi: float | None, *, exclusive_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: must be a number, got {value!r}")
    if (value <= lo if exclusive_lo else value < lo) or (hi is not None and value > hi):
        bounds = f"{'(' if exclusive_lo else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise UserError(f"{where}: must be in {bounds}, got {value}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: must be true or false, got {value!r}")
    return value


def _strings(value: Any, where: str, max_items: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 128 for v in value):
        raise UserError(f"{where}: must be a list of operator type names")
    if len(value) > max_items:
        raise UserError(f"{where}: at most {max_items} items, got {len(value)}")
    return list(value)


def read_uri(value: Any, where: str) -> str:
    if value is None:
        raise UserError(f"{where}: is required")
    try:
        return str(parse_uri(value, field=where))
    except InvalidURIError as e:
        raise UserError(str(e)) from None


def _digest(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.startswith("sha256:")
        or len(value) != 71
        or set(value[7:]) - DIGEST_CHARS
    ):
        raise UserError(f"{where}: must be sha256:<64 lowercase hex digits>, got {value!r}")
    return value


def dataset_ref(value: Any, where: str) -> dict[str, Any]:
    d = _obj(value, where, {"uri", "revision"})
    if not d:
        raise UserError(f"{where}: is required")
    out = {"uri": read_uri(d.get("uri"), f"{where}.uri")}
    if d.get("revision") is not None:
        if not isinstance(d["revision"], str) or len(d["revision"]) > 128:
            raise UserError(f"{where}.revision: must be a string of at most 128 characters")
        out["revision"] = d["revision"]
    return out


def parse_step(raw: Any, where: str) -> Step:
    s = _obj(raw, where, STEP_KINDS)
    if len(s) != 1:
        raise UserError(f"{where}: a step sets exactly one of: {', '.join(STEP_KINDS)}")
    kind = next(iter(s))
    where = f"{where}.{kind}"
    body = _obj(s[kind] if s[kind] is not None else {}, where, STEP_FIELDS[kind])
    p: dict[str, Any] = dict(STEP_FIELDS[kind])
    p.update({k: v for k, v in body.items() if v is not None})
    if kind == "export":
        p["opset"] = _int(p["opset"], f"{where}.opset", 14, 23)
        p["parityTolerance"] = _num(p["parityTolerance"], f"{where}.parityTolerance", 0, 1, exclusive_lo=True)
    elif kind == "optimize":
        p["level"] = _enum(p["level"], f"{where}.level", ("Basic", "Extended", "All"))
        p["expectFusions"] = _strings(p["expectFusions"], f"{where}.expectFusions", 32)
    elif kind == "quantize":
        if p["mode"] is None:
            raise UserError(f"{where}.mode: is required (Dynamic or Static)")
        p["mode"] = _enum(p["mode"], f"{where}.mode", ("Dynamic", "Static"))
        p["perChannel"] = _bool(p["perChannel"], f"{where}.perChannel")
        p["format"] = _enum(p["format"], f"{where}.format", ("QDQ", "QOperator"))
        if p["calibration"] is not None:
            c = _obj(p["calibration"], f"{where}.calibration", {"dataset", "samples", "method"})
            p["calibration"] = {
                "dataset": dataset_ref(c.get("dataset"), f"{where}.calibration.dataset"),
                "samples": _int(c.get("samples", 512), f"{where}.calibration.samples", 1, 100000),
                "method": _enum(
                    c.get("method", "MinMax"), f"{where}.calibration.method", ("MinMax", "Entropy", "Percentile")
                ),
            }
        if p["mode"] == "Dynamic":
            p["format"] = None  # dynamic quantization has one format (QOperator IntegerOps)
        if p["mode"] == "Static" and p["calibration"] is None:
            raise UserError(f"{where}.calibration: Static quantization needs calibration")
    elif kind == "float16":
        p["keepIOTypes"] = _bool(p["keepIOTypes"], f"{where}.keepIOTypes")
        p["blockList"] = _strings(p["blockList"], f"{where}.blockList", 64)
    elif kind == "prune":
        p["method"] = _enum(p["method"], f"{where}.method", ("Magnitude", "Structured"))
        if p["sparsity"] is None:
            raise UserError(f"{where}.sparsity: is required")
        p["sparsity"] = _num(p["sparsity"], f"{where}.sparsity", 0, 0.95, exclusive_lo=True)
    elif kind == "distill":
        st = _obj(p["student"], f"{where}.student", {"uri"})
        if not st:
            raise UserError(f"{where}.student: is required")
        p["student"] = {"uri": read_uri(st.get("uri"), f"{where}.student.uri")}
        p["dataset"] = dataset_ref(p["dataset"], f"{where}.dataset")
        p["maxSteps"] = _int(p["maxSteps"], f"{where}.maxSteps", 1, 10_000_000)
        p["temperature"] = _num(p["temperature"], f"{where}.temperature", 0, 100, exclusive_lo=True)
        p["alpha"] = _num(p["alpha"], f"{where}.alpha", 0, 1)
    return Step(kind, p, where)


def check_recipe(steps: Sequence[Step], device: str, provider: str, precision: str) -> None:
    """Order and target rules, checked before any model is loaded (the CRD's CEL rules, and more)."""
    exports = [i for i, s in enumerate(steps) if s.kind == "export"]
    if len(exports) > 1 or (exports and exports[0] != 0):
        raise UserError("recipe.steps: export may appear once, as the first step")
    seen_onnx = None
    quantized = fp16 = None
    for s in steps:
        if s.kind in TORCH_STEPS and seen_onnx is not None:
            raise UserError(
                f"{s.where}: {s.kind} works on the torch model and must come before {seen_onnx.where} "
                "(prune and distill run before the export)"
            )
        if s.kind in ONNX_STEPS:
            seen_onnx = seen_onnx or s
        if s.kind == "optimize" and (quantized or fp16):
            raise UserError(f"{s.where}: optimize must come before {(quantized or fp16).where}")  # type: ignore[union-attr]
        if s.kind == "quantize":
            if quantized or fp16:
                raise UserError(f"{s.where}: the model is already {'int8' if quantized else 'fp16'}")
            quantized = s
            if s.params["mode"] == "Dynamic" and device != "cpu":
                raise UserError(
                    f"{s.where}.mode: Dynamic int8 is a CPU-only win (ONNX Runtime runs it on the CPU provider); "
                    f"target.device is {device}: use Static (QDQ) with TensorrtExecutionProvider, or float16"
                )
            if provider == "CUDAExecutionProvider":
                raise UserError(
                    f"{s.where}: int8 does not run as int8 on CUDAExecutionProvider: use TensorrtExecutionProvider "
                    "or target.device cpu"
                )
            if s.params["mode"] == "Static" and s.params["format"] == "QOperator" and device != "cpu":
                raise UserError(f"{s.where}.format: QOperator runs on the CPU provider only; use QDQ for {provider}")
        if s.kind == "float16":
            if quantized or fp16:
                raise UserError(f"{s.where}: the model is already {'int8' if quantized else 'fp16'}")
            fp16 = s
            if device != "gpu":
                raise UserError(
                    f"{s.where}: fp16 is a GPU win (the CPU provider computes most fp16 operators through casts); "
                    "target.device is cpu"
                )
    produced = "int8" if quantized else "fp16" if fp16 else "fp32"
    if produced != precision:
        raise UserError(
            f"target.precision: is {precision} but the recipe produces {produced}"
            + (f" ({(quantized or fp16).where})" if quantized or fp16 else "")  # type: ignore[union-attr]
        )


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """CLI + env -> Config; every rejection is a UserError naming the field and the rule."""
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    spec = _spec_from(args, env)
    _obj(spec, "spec", SPEC_FIELDS)
    src = _obj(spec.get("source"), "source", {"trainingJobRef", "uri", "digest"})
    if src.get("uri") is None:
        if src.get("trainingJobRef"):
            raise UserError("source.uri: the controller resolves source.trainingJobRef and passes --source-uri")
        raise UserError("source.uri: is required (or --source-uri)")
    target = _obj(spec.get("target"), "target", {"device", "executionProvider", "precision"})
    device = _enum(target.get("device", "cpu"), "target.device", ("cpu", "gpu"))
    provider = _enum(target.get("executionProvider", "CPUExecutionProvider"), "target.executionProvider", PROVIDERS)
    precision = _enum(target.get("precision", "fp32"), "target.precision", ("fp32", "fp16", "int8"))
    if (device == "cpu") != (provider == "CPUExecutionProvider"):
        raise UserError("target.executionProvider: must be CPUExecutionProvider exactly when target.device is cpu")
    if precision == "fp16" and device != "gpu":
        raise UserError("target.precision: fp16 needs target.device gpu")
    if precision == "int8" and provider == "CUDAExecutionProvider":
        raise UserError(
            "target.precision: int8 does not run as int8 on CUDAExecutionProvider: use TensorrtExecutionProvider or cpu"
        )
    recipe = _obj(spec.get("recipe"), "recipe", {"steps", "auto"})
    if ("steps" in recipe) == ("auto" in recipe):
        raise UserError("recipe: set exactly one of steps or auto")
    steps: tuple[Step, ...] | None = None
    objective, max_candidates = None, 6
    if "steps" in recipe:
        raw = recipe["steps"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= 16:
            raise UserError("recipe.steps: must be a list of 1..16 steps")
        steps = tuple(parse_step(s, f"recipe.steps[{i}]") for i, s in enumerate(raw))
        check_recipe(steps, device, provider, precision)
    else:
        auto = _obj(recipe["auto"], "recipe.auto", {"objective", "maxCandidates"})
        objective = _enum(auto.get("objective", "Smallest"), "recipe.auto.objective", ("Smallest", "Fastest"))
        max_candidates = _int(auto.get("maxCandidates", 6), "recipe.auto.maxCandidates", 1, 32)
    ev = _obj(spec.get("evaluation"), "evaluation", {"dataset", "metric", "samples"})
    ds = dataset_ref(ev.get("dataset"), "evaluation.dataset")
    bench = _obj(spec.get("benchmark"), "benchmark", {"batchSizes", "sequenceLengths", "iterations", "warmup"})
    sizes = bench.get("batchSizes", [1, 8, 32])
    lengths = bench.get("sequenceLengths", [128])
    for name, values, hi in (("batchSizes", sizes, 4096), ("sequenceLengths", lengths, 32768)):
        if not isinstance(values, list) or not 1 <= len(values) <= 16:
            raise UserError(f"benchmark.{name}: must be a list of 1..16 integers")
        for i, v in enumerate(values):
            _int(v, f"benchmark.{name}[{i}]", 1, hi)
    gates_raw = _obj(
        spec.get("gates"), "gates", {"maxAccuracyDrop", "minAgreement", "maxP95LatencyMs", "minSpeedup", "maxSizeBytes"}
    )
    gates: dict[str, float] = {}
    for k, v in gates_raw.items():
        if v is None:
            continue
        if k in ("maxAccuracyDrop", "minAgreement"):
            gates[k] = _num(v, f"gates.{k}", 0, 1)
        elif k == "maxSizeBytes":
            gates[k] = _int(v, f"gates.{k}", 1, 2**62)
        else:
            gates[k] = _num(v, f"gates.{k}", 0, None, exclusive_lo=True)
    labels = spec.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise UserError("labels: must be a map of strings")
    for name in CONTROLLER_FIELDS - {"labels", "imagePullPolicy", "image"}:
        if name in spec and not isinstance(spec[name], dict | list):
            raise UserError(f"{name}: must be an object")
    if "image" in spec and not isinstance(spec["image"], str):
        raise UserError("image: must be a string")
    output = args.output_uri or env.get("KILN_OUTPUT_URI")
    if output is not None:
        output = read_uri(output, "--output-uri")
        if parse_uri(output).read_only:
            raise UserError(f"--output-uri {output}: must be writable (s3://, pvc:// or file://)")
    threads = args.threads if args.threads is not None else int(env.get("KILN_THREADS") or 0)
    if not 0 <= threads <= 1024:
        raise UserError(f"--threads: must be in 0..1024, got {threads}")
    signer, trusted_keys = _keys(args, env)
    return Config(
        source_uri=read_uri(src.get("uri"), "source.uri"),
        source_digest=_digest(src.get("digest"), "source.digest"),
        device=device,
        provider=provider,
        precision=precision,
        steps=steps,
        auto_objective=objective,
        auto_max_candidates=max_candidates,
        evaluation_uri=ds["uri"],
        evaluation_revision=ds.get("revision"),
        metric=_enum(ev.get("metric", "accuracy"), "evaluation.metric", ("accuracy", "f1", "top1Agreement")),
        evaluation_samples=_int(ev.get("samples", 0), "evaluation.samples", 0, 10_000_000),
        batch_sizes=tuple(sizes),
        sequence_lengths=tuple(lengths),
        iterations=_int(bench.get("iterations", 100), "benchmark.iterations", 10, 100000),
        warmup=_int(bench.get("warmup", 10), "benchmark.warmup", 0, 10000),
        gates=gates,
        labels=dict(labels),
        output_uri=output,
        cache_dir=args.cache_dir or env.get("KILN_COMPRESSOR_CACHE"),
        threads=threads,
        report_file=args.report_file,
        termination_log=args.termination_log or env.get(TERMINATION_LOG_ENV) or TERMINATION_LOG,
        spec=spec,
        producer=producer_from("ModelCompression", env),
        image=image_from(env),
        signer=signer,
        trusted_keys=trusted_keys,
    )
