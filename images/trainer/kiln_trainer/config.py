"""The trainer's inputs: TrainingJob fields as CLI flags or one JSON document, validated before any heavy work.

Names follow the TrainingJob spec so the operator passes them straight through: ``KILN_TRAINING_SPEC`` (or
``--spec FILE``) holds ``{"model": {"uri"}, "dataset": {"uri"}, "output": {"uri"}, "hyperparameters": {...},
"checkpoint": {"uri", "everySteps", "everyMinutes", "keep"}, "resume": {"policy", "fromUri"}}``; flags override
it. The signing key (``--signing-key``, ``$KILN_SIGNING_KEY``) is a file the operator mounts from a Secret, never
part of the spec.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
    from kiln_artifacts.signing import Signer

SIGNING_KEY_ENV = "KILN_SIGNING_KEY"
TASKS = ("image-classification", "text-classification")
PRECISIONS = ("fp32", "bf16", "fp16")
# extra: trainer-specific knobs (strings in the CRD); unknown keys are rejected so a typo never passes silently.
EXTRA_KEYS = {
    "task": "image-classification or text-classification (default: from the dataset)",
    "warmupSteps": "linear warm-up steps (int >= 0, default 0)",
    "weightDecay": "AdamW weight decay (float >= 0, default 0.01)",
    "maxSeqLength": "text: tokens per example (int 8..512, default 64)",
    "evalBatchSize": "examples per evaluation batch (int >= 1, default 256)",
    "progressIntervalSeconds": "minimum seconds between progress-file writes (float >= 0, default 5)",
    "inputWaitSeconds": "how long to wait for dataset.uri and model.uri to be published, by an earlier step of a "
    "pipeline applied together with this job (int 0..86400, default 0: absent inputs fail at once)",
}


@dataclass(frozen=True)
class TrainConfig:
    dataset_uri: str
    output_uri: str | None = None
    model_uri: str | None = None
    checkpoint_uri: str | None = None
    learning_rate: float = 5e-5
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    precision: str = "bf16"
    seed: int = 42
    eval_every_steps: int = 0
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float = 30.0
    checkpoint_keep: int = 3
    resume: str = "Latest"
    resume_from: str | None = None  # resume.fromUri: a checkpoint to start from when checkpoint.uri has none yet
    extra: Mapping[str, str] = field(default_factory=dict)
    progress_file: str | None = None
    termination_log: str | None = TERMINATION_LOG
    dist_timeout_seconds: int = 600  # how long a rank waits for the others (rendezvous and every collective)
    producer: Producer | None = None  # the TrainingJob, for the published model's lineage
    image: str | None = None
    signer: Signer | None = field(default=None, repr=False, compare=False)  # signs the published model, not checkpoints

    def hyperparameters(self) -> dict[str, Any]:
        """The TrainingJob-named hyperparameters, for the artifact's lineage."""
        d = asdict(self)
        names = {
            "learning_rate": "learningRate",
            "epochs": "epochs",
            "max_steps": "maxSteps",
            "batch_size": "batchSize",
            "gradient_accumulation_steps": "gradientAccumulationSteps",
            "precision": "precision",
            "seed": "seed",
            "eval_every_steps": "evalEverySteps",
        }
        out = {v: d[k] for k, v in names.items() if d[k] is not None}
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    def extra_int(self, key: str, default: int, lo: int, hi: int) -> int:
        return int(self._extra_number(key, default, int, "an integer", lo, hi))

    def extra_float(self, key: str, default: float, lo: float) -> float:
        return float(self._extra_number(key, default, float, "a number", lo, None))

    def _extra_number(
        self, key: str, default: float, cast: type[int] | type[float], what: str, lo: float, hi: float | None
    ) -> float:
        """hyperparameters.extra values arrive as strings: parse and bound-check one, naming it on error."""
        raw = self.extra.get(key)
        if raw is None:
            return default
        try:
            value = cast(raw)
        except ValueError:
            raise UserError(f"hyperparameters.extra.{key}: must be {what}, got {raw!r}") from None
        if hi is not None and not lo <= value <= hi:
            raise UserError(f"hyperparameters.extra.{key}: must be in {lo}..{hi}, got {value}")
        if not value >= lo:
            raise UserError(f"hyperparameters.extra.{key}: must be >= {lo}, got {value}")
        return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln-trainer", description="Kiln trainer (docs/trainer.md).")
    p.add_argument("--spec", help="JSON file with TrainingJob fields (default: $KILN_TRAINING_SPEC, a JSON string)")
    p.add_argument("--model-uri", dest="model.uri")
    p.add_argument("--dataset-uri", dest="dataset.uri")
    p.add_argument("--output-uri", dest="output.uri")
    p.add_argument("--checkpoint-uri", dest="checkpoint.uri")
    p.add_argument("--learning-rate", dest="hyperparameters.learningRate", type=float)
    p.add_argument("--epochs", dest="hyperparameters.epochs", type=int)
    p.add_argument("--max-steps", dest="hyperparameters.maxSteps", type=int)
    p.add_argument("--batch-size", dest="hyperparameters.batchSize", type=int)
    p.add_argument("--gradient-accumulation-steps", dest="hyperparameters.gradientAccumulationSteps", type=int)
    p.add_argument("--precision", dest="hyperparameters.precision")
    p.add_argument("--seed", dest="hyperparameters.seed", type=int)
    p.add_argument("--eval-every-steps", dest="hyperparameters.evalEverySteps", type=int)
    p.add_argument("--extra", action="append", metavar="KEY=VALUE", help="hyperparameters.extra entry (repeatable)")
    p.add_argument("--checkpoint-every-steps", dest="checkpoint.everySteps", type=int)
    p.add_argument("--checkpoint-every-minutes", dest="checkpoint.everyMinutes", type=float)
    p.add_argument("--checkpoint-keep", dest="checkpoint.keep", type=int)
    p.add_argument("--resume", dest="resume.policy", help="Latest (default) or Never")
    p.add_argument("--progress-file", help="default: $KILN_PROGRESS_FILE, else progress.json in a local checkpoint dir")
    p.add_argument("--termination-log", help="default: $KILN_TERMINATION_LOG or /dev/termination-log")
    p.add_argument(
        "--signing-key",
        help=f"Ed25519 private key (PKCS8 PEM) to sign the published model with (default: ${SIGNING_KEY_ENV})",
    )
    return p


def _signer(args: argparse.Namespace, env: Mapping[str, str]) -> Signer | None:
    """The signing key, loaded now so that a bad key fails before any training, naming the flag or variable."""
    from kiln_artifacts.signing import Signer

    path, where = (
        (args.signing_key, "--signing-key") if args.signing_key else (env.get(SIGNING_KEY_ENV), SIGNING_KEY_ENV)
    )
    if not path:
        return None
    try:
        return Signer.from_file(path, what=where)
    except KeyFileError as e:
        raise UserError(str(e)) from None


def _spec_from(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    spec = spec_from(args.spec, env, "KILN_TRAINING_SPEC")
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            spec.setdefault(section, {})[key] = value
    for item in args.extra or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--extra {item!r}: must be KEY=VALUE")
        spec.setdefault("hyperparameters", {}).setdefault("extra", {})[key] = value
    return spec


def _int(section: Mapping[str, Any], where: str, key: str, lo: int, hi: int) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}.{key}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise UserError(f"{where}.{key}: must be in {lo}..{hi}, got {value}")
    return value


def _uri(spec: Mapping[str, Any], section: str, *, write: bool, required: bool) -> str | None:
    value = (spec.get(section) or {}).get("uri")
    if value is None:
        if required:
            raise UserError(f"{section}.uri: is required")
        return None
    try:
        uri = parse_uri(value, field=f"{section}.uri")
    except InvalidURIError as e:
        raise UserError(str(e)) from None
    if write and uri.read_only:
        raise UserError(f"{section}.uri: {value}: must be writable (s3://, pvc:// or file://), not {uri.scheme}://")
    return str(uri)


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> TrainConfig:
    """CLI + env -> TrainConfig; every rejection is a UserError naming the field and the rule."""
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    spec = _spec_from(args, env)
    allowed = {"model", "dataset", "output", "hyperparameters", "checkpoint", "resume"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise UserError(f"training spec: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    hp = spec.get("hyperparameters") or {}
    known_hp = {
        "learningRate", "epochs", "maxSteps", "batchSize", "gradientAccumulationSteps",
        "precision", "seed", "evalEverySteps", "extra",
    }  # fmt: skip
    unknown = sorted(set(hp) - known_hp)
    if unknown:
        raise UserError(f"hyperparameters: unknown field(s) {', '.join(unknown)}")
    lr = hp.get("learningRate", 5e-5)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr <= 10:
        raise UserError(f"hyperparameters.learningRate: must be a number in (0, 10], got {lr!r}")
    epochs = _int(hp, "hyperparameters", "epochs", 1, 10000)
    max_steps = _int(hp, "hyperparameters", "maxSteps", 1, 100_000_000)
    if epochs is not None and max_steps is not None:
        raise UserError("hyperparameters: set epochs or maxSteps, not both")
    if epochs is None and max_steps is None:
        epochs = 1
    precision = hp.get("precision", "bf16")
    if precision not in PRECISIONS:
        raise UserError(f"hyperparameters.precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    extra = hp.get("extra") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise UserError("hyperparameters.extra: must be a map of strings")
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        keys = "; ".join(f"{k}: {v}" for k, v in EXTRA_KEYS.items())
        raise UserError(f"hyperparameters.extra: unknown key(s) {', '.join(unknown)} (known: {keys})")
    if "task" in extra and extra["task"] not in TASKS:
        raise UserError(f"hyperparameters.extra.task: must be one of {', '.join(TASKS)}, got {extra['task']!r}")
    ck = spec.get("checkpoint") or {}
    minutes = ck.get("everyMinutes", 30)
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not 0 < minutes <= 1440:
        raise UserError(f"checkpoint.everyMinutes: must be a number in (0, 1440], got {minutes!r}")
    resume = spec.get("resume") or {}
    unknown = sorted(set(resume) - {"policy", "fromUri"})
    if unknown:
        raise UserError(f"resume: unknown field(s) {', '.join(unknown)} (allowed: fromUri, policy)")
    policy = resume.get("policy", "Latest")
    if policy not in ("Latest", "Never"):
        raise UserError(f"resume.policy: must be Latest or Never, got {policy!r}")
    resume_from = (
        _uri({"resume": {"uri": resume["fromUri"]}}, "resume", write=False, required=False)
        if resume.get("fromUri")
        else None
    )
    if resume_from and policy == "Never":
        raise UserError("resume.fromUri: needs resume.policy Latest")
    cfg = TrainConfig(
        dataset_uri=_uri(spec, "dataset", write=False, required=True) or "",
        model_uri=_uri(spec, "model", write=False, required=False),
        output_uri=_uri(spec, "output", write=True, required=False),
        checkpoint_uri=_uri(spec, "checkpoint", write=True, required=False),
        learning_rate=float(lr),
        epochs=epochs,
        max_steps=max_steps,
        batch_size=_int(hp, "hyperparameters", "batchSize", 1, 65536) or 16,
        gradient_accumulation_steps=_int(hp, "hyperparameters", "gradientAccumulationSteps", 1, 1024) or 1,
        precision=precision,
        seed=_int(hp, "hyperparameters", "seed", 0, 2**31 - 1) or 0 if "seed" in hp else 42,
        eval_every_steps=_int(hp, "hyperparameters", "evalEverySteps", 0, 100_000_000) or 0,
        checkpoint_every_steps=_int(ck, "checkpoint", "everySteps", 1, 100_000_000),
        checkpoint_every_minutes=float(minutes),
        checkpoint_keep=_int(ck, "checkpoint", "keep", 1, 100) or 3,
        resume=policy,
        resume_from=resume_from,
        extra=dict(extra),
        progress_file=args.progress_file or env.get("KILN_PROGRESS_FILE"),
        termination_log=args.termination_log or env.get(TERMINATION_LOG_ENV) or TERMINATION_LOG,
        dist_timeout_seconds=int(env.get("KILN_DIST_TIMEOUT_SECONDS") or 600),
        producer=producer_from("TrainingJob", env),
        image=image_from(env),
        signer=_signer(args, env),
    )
    # Validate the numeric extras now (fail fast), not when the loop first reads them.
    cfg.extra_int("warmupSteps", 0, 0, 100_000_000)
    cfg.extra_float("weightDecay", 0.01, 0.0)
    cfg.extra_int("maxSeqLength", 64, 8, 512)
    cfg.extra_int("evalBatchSize", 256, 1, 1_000_000)
    cfg.extra_float("progressIntervalSeconds", 5.0, 0.0)
    cfg.extra_int("inputWaitSeconds", 0, 0, 86400)
    return cfg
