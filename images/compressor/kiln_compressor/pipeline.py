"""``main``: spec -> input checks -> recipe(s) (step cache) -> evaluation, benchmark, gates -> artifact.

Everything that can be wrong with the inputs (spec, source model, data sets, target execution provider) is
checked before the first model is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kiln_artifacts.contract import (
    ExitCode,
    InfrastructureError,
    Preempted,
    UserError,
    WorkloadError,
    termination_log_path,
    termination_message,
    write_termination_message,
)

from .config import STEP_FIELDS, TORCH_STEPS, Config, Step, parse_config
from .report import shrink

if TYPE_CHECKING:
    from kiln_artifacts import Manifest
    from kiln_artifacts.profile import Profile

log = logging.getLogger("kiln_compressor")
CACHE_VERSION = "kiln-compressor-cache-v1"
LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "kiln")


@dataclass
class Outcome:
    code: ExitCode
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Preempted("SIGTERM: stopped; a rerun reuses the steps already in the step cache")


def main(argv: Sequence[str] | None = None) -> int:
    """The program: exit code as the return value (SIGTERM -> 5 with the termination message)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)  # the libraries' INFO chatter (quantizer, shape inference) stays out
    cfg: Config | None = None
    try:
        try:
            cfg = parse_config(argv)
        except SystemExit as e:  # argparse printed the usage and the reason
            if e.code in (0, None):
                return 0
            raise UserError("command line: invalid arguments (see the usage message above)") from None
        outcome = Compressor(cfg).run()
    except WorkloadError as e:
        outcome = Outcome(e.code, e.message)
    except Exception as e:
        outcome = Outcome(classify(e), f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if outcome.code != ExitCode.SUCCEEDED:
        log.error("%s (exit %d)", outcome.message, outcome.code)
    else:
        log.info("%s", outcome.message)
    path = Path(cfg.termination_log) if cfg and cfg.termination_log else termination_log_path(argv, os.environ)
    text = termination_message(outcome.code, outcome.message, shrink=shrink, **outcome.fields)
    write_termination_message(path, text)
    return int(outcome.code)


def classify(e: BaseException) -> ExitCode:
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return ExitCode.OUT_OF_MEMORY
    if isinstance(e, ConnectionError | TimeoutError):
        return ExitCode.INFRASTRUCTURE
    return ExitCode.UNKNOWN


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StepCache:
    """Step outputs by content hash: key = hash(input key, step parameters, data digests, tool versions).

    Entries are written to a temporary folder and renamed into place, so a reader sees complete entries only;
    a hit is checked against the recorded sha256 of its model.onnx."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    def get(self, key: str | None) -> tuple[Path, dict[str, Any]] | None:
        if self.root is None or key is None:
            return None
        entry = self.root / key
        try:
            info = json.loads((entry / "info.json").read_text())
            model = entry / "model.onnx"
            if model.stat().st_size != info["size"] or _file_sha(model) != info["sha256"]:
                raise ValueError("changed")
        except (OSError, ValueError, KeyError):
            return None
        self.hits += 1
        return model, info["facts"]

    def put(self, key: str | None, model: Path, facts: dict[str, Any]) -> None:
        self.misses += 1
        if self.root is None or key is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            shutil.copyfile(model, tmp / "model.onnx")
            info = {"size": model.stat().st_size, "sha256": _file_sha(model), "facts": facts}
            (tmp / "info.json").write_text(json.dumps(info))
            os.replace(tmp, self.root / key)
        except OSError:  # taken by a concurrent run, or the cache is not writable: not an error
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Candidate:
    name: str
    steps: tuple[Step, ...]
    path: Path  # model.onnx
    model_source: Any  # models.Source whose tokenizer/inputs the ONNX model uses (the student after distill)
    precision: str
    step_facts: list[dict[str, Any]]
    measured: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # the served files (kiln-report.json excluded): bytes
    profile: Profile | None = None  # its reference profile, from its own logits on the evaluation data

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)


def default_step(kind: str, where: str, **params: Any) -> Step:
    p = dict(STEP_FIELDS[kind])
    p.update(params)
    return Step(kind, p, where)


class Compressor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # --- inputs, all checked before the first model is built ----------------------------------------------------

    def _check_provider(self) -> None:
        import onnxruntime as ort

        if self.cfg.device == "gpu" and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from the nvidia-* wheels torch brings (the image has no system CUDA).
            try:
                ort.preload_dlls()
            except Exception as e:
                log.warning("onnxruntime.preload_dlls: %s", e)
        available = ort.get_available_providers()
        if self.cfg.provider not in available:
            raise InfrastructureError(
                f"target.executionProvider: {self.cfg.provider} is not available on this node/image "
                f"(available: {', '.join(available)}); a GPU target needs a GPU node and the onnxruntime-gpu image"
            )

    def _inputs(self) -> None:
        from . import models

        cfg = self.cfg
        self._check_provider()
        self.source = models.resolve_model(
            cfg.source_uri, "source.uri", cfg.source_digest, trusted_keys=cfg.trusted_keys
        )
        if cfg.trusted_keys is not None:
            log.info("source.uri %s: signed by trusted key %s", cfg.source_uri, self.source.trusted_key)
        self.data = models.load_data(cfg.evaluation_uri, "evaluation.dataset.uri", self.source)
        if cfg.evaluation_samples:
            self.data.x, self.data.y = self.data.x[: cfg.evaluation_samples], self.data.y[: cfg.evaluation_samples]
        if self.source.text:
            limit = int(self.source.config.get("max_position_embeddings") or 512)
            if cfg.max_sequence_length > limit:
                raise UserError(
                    f"benchmark.sequenceLengths: {cfg.max_sequence_length} exceeds the model's "
                    f"max_position_embeddings {limit}"
                )
        else:
            self.source.image_shape = models.image_shape(self.data)
        self.recipes = self._recipes()
        self.calibration: dict[str, Any] = {}
        self.students: dict[str, Any] = {}
        self.distill_data: dict[str, Any] = {}
        for _, steps in self.recipes:
            for s in steps:
                if s.kind == "quantize" and s.params["mode"] == "Static":
                    ds = s.params["calibration"]["dataset"]
                    where = f"{s.where}.calibration.dataset.uri"
                    if ds["uri"] not in self.calibration:
                        cal = models.load_data(ds["uri"], where, self.source, split="train")
                        if not self.source.text:
                            models.check_same_shape(cal, self.data, where)
                        self.calibration[ds["uri"]] = cal
                if s.kind == "distill":
                    uri = s.params["student"]["uri"]
                    student = models.resolve_model(
                        uri, f"{s.where}.student.uri", student_classes=self.source.classes if self.source.text else None
                    )
                    if student.task != self.source.task:
                        raise UserError(
                            f"{s.where}.student.uri {uri}: a {student.task} model, the teacher does {self.source.task}"
                        )
                    student.image_shape = self.source.image_shape
                    self.students[uri] = student
                    duri = s.params["dataset"]["uri"]
                    d = models.load_data(duri, f"{s.where}.dataset.uri", self.source, split="train")
                    if not self.source.text:
                        models.check_same_shape(d, self.data, f"{s.where}.dataset.uri")
                    self.distill_data[duri] = d

    def _already_published(self) -> Outcome | None:
        """The output location, checked before the work: empty is fine; an artifact this same compression
        published (a retried Job whose first attempt died after the commit) is the result; anything else is
        refused now rather than after the work."""
        import kiln_artifacts as ka

        cfg = self.cfg
        if not cfg.output_uri:
            return None
        try:
            existing = ka.load(cfg.output_uri)
        except ka.ArtifactNotFoundError:
            return None
        except (ka.CredentialsError, OSError) as e:
            raise InfrastructureError(f"--output-uri {cfg.output_uri}: {type(e).__name__}: {e}") from None
        except ka.ArtifactError as e:
            raise UserError(f"--output-uri {cfg.output_uri}: holds a damaged artifact: {e}") from None
        hp = existing.manifest.lineage.hyperparameters
        same = (
            existing.manifest.format == "onnx"
            and self.source.digest is not None
            and existing.manifest.lineage.parents[:1] == (self.source.digest,)
            and hp.get("spec") == _spec_key(cfg)
        )
        if not same:
            raise UserError(
                f"--output-uri {cfg.output_uri}: already holds another artifact ({existing.digest}); artifacts are "
                "immutable, publish to a new location"
            )
        report = json.loads(existing.path("kiln-report.json").read_text())
        log.info("%s: published by an earlier attempt of this compression; nothing to do", cfg.output_uri)
        return Outcome(
            ExitCode.SUCCEEDED,
            f"already published by an earlier attempt: {existing.uri}",
            {
                "artifact": _artifact_ref(existing.uri, existing.digest, existing.manifest),
                "gatesPassed": report["gatesPassed"],
                "candidate": report["candidate"],
                "report": report["summary"],
            },
        )

    def _recipes(self) -> list[tuple[str, tuple[Step, ...]]]:
        cfg = self.cfg
        if cfg.steps is not None:
            return [("recipe", cfg.steps)]
        ex = default_step("export", "recipe.auto[export]")
        opt = default_step("optimize", "recipe.auto[optimize]")
        cal = {"dataset": {"uri": cfg.evaluation_uri}, "samples": 128, "method": "MinMax"}

        def q(mode: str, per_channel: bool = False) -> Step:
            return default_step(
                "quantize",
                "recipe.auto[quantize]",
                mode=mode,
                perChannel=per_channel,
                calibration=cal if mode == "Static" else None,
            )

        text = self.source.text
        cands: list[tuple[str, tuple[Step, ...]]]
        if cfg.precision == "fp32":
            cands = [("fp32", (ex,)), ("fp32-optimized", (ex, opt))]
            cands.append(
                (
                    "fp32-pruned",
                    (default_step("prune", "recipe.auto[prune]", method="Structured", sparsity=0.25), ex, opt),
                )
            )
        elif cfg.precision == "fp16":
            f16 = default_step("float16", "recipe.auto[float16]")
            cands = [("fp16-optimized", (ex, opt, f16)), ("fp16", (ex, f16))]
        elif cfg.device == "cpu":
            dyn = [
                ("int8-dynamic-optimized", (ex, opt, q("Dynamic"))),
                ("int8-dynamic", (ex, q("Dynamic"))),
                ("int8-dynamic-per-channel", (ex, opt, q("Dynamic", True))),
            ]
            static = [("int8-static", (ex, q("Static"))), ("int8-static-per-channel", (ex, q("Static", True)))]
            cands = dyn + static if text else static + dyn  # dynamic for transformers, static for CNNs
        else:
            cands = [("int8-static-per-channel", (ex, q("Static", True))), ("int8-static", (ex, q("Static")))]
        return cands[: cfg.auto_max_candidates]

    # --- the work -------------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        from . import models

        t_start = time.monotonic()
        cfg = self.cfg
        self._inputs()
        done = self._already_published()
        if done is not None:
            return done
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else Path(tempfile.gettempdir()) / "kiln-compressor-cache"
        self.cache = StepCache(cache_root)
        self.work = Path(tempfile.mkdtemp(prefix="kiln-compress-"))
        try:
            self.teacher = models.build_torch(self.source)
            self.source_logits = models.torch_logits(self.teacher, self.source, self.data.x, cfg.max_sequence_length)
            baseline = self._baseline()
            candidates = []
            for i, (name, steps) in enumerate(self.recipes):
                log.info("candidate %d/%d %s: %s", i + 1, len(self.recipes), name, [s.describe() for s in steps])
                cand = self._build(name, steps, self.work / f"c{i}")
                self._measure(cand, baseline)
                log.info("candidate %s: %s", name, json.dumps(cand.summary["headline"]))
                candidates.append(cand)
            chosen = self._choose(candidates)
            report = self._report(chosen, baseline, candidates, time.monotonic() - t_start)
            artifact = self._publish(chosen, report) if cfg.output_uri else None
            if cfg.report_file:
                Path(cfg.report_file).write_text(json.dumps(report, indent=2) + "\n")
            head = chosen.summary["headline"]
            verdict = (
                "gates passed"
                if chosen.passed
                else "gates FAILED: " + ", ".join(g["name"] for g in chosen.gates if not g["passed"])
            )
            msg = (
                f"{chosen.name}: {chosen.precision} {head['sizeBytes'] / 1e6:.1f} MB ({head['sizeRatio']:.0%} of the "
                f"source), p95 {head['p95Ms']:.2f} ms (x{head['speedup']:.2f}), metric {head['metric']:.4f} "
                f"(source {head['sourceMetric']:.4f}); {verdict}"
            )
            fields: dict[str, Any] = {
                "artifact": artifact,
                "gatesPassed": chosen.passed,
                "candidate": chosen.name,
                "report": report["summary"],
            }
            return Outcome(ExitCode.SUCCEEDED, msg, fields)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _code_version(self) -> str:
        """The compressor's own code, so that a changed step never reuses an old cache entry."""
        h = hashlib.sha256()
        for f in sorted(Path(__file__).parent.glob("*.py")):
            h.update(f.read_bytes())
        return h.hexdigest()[:16]

    def _versions(self) -> dict[str, str]:
        import kiln_artifacts as ka

        return ka.library_versions(*LIBRARIES)

    def _data_key(self, step: Step) -> Any:
        if step.kind == "quantize" and step.params["calibration"]:
            cal = self.calibration[step.params["calibration"]["dataset"]["uri"]]
            return [cal.digest or None, len(cal)]
        if step.kind == "distill":
            student = self.students[step.params["student"]["uri"]]
            return [student.digest, self.distill_data[step.params["dataset"]["uri"]].digest]
        return None

    def _build(self, name: str, steps: tuple[Step, ...], work: Path) -> Candidate:
        from . import models, onnx_steps, torch_steps

        cfg = self.cfg
        work.mkdir(parents=True)
        versions = self._versions()
        cacheable = self.source.digest is not None
        key: str | None = (
            _hash(CACHE_VERSION, self._code_version(), self.source.digest, versions) if cacheable else None
        )
        torch_part = [s for s in steps if s.kind in TORCH_STEPS]
        export_step = steps[0] if steps and steps[0].kind == "export" else default_step("export", "recipe[export]")
        onnx_part = [s for s in steps if s.kind not in TORCH_STEPS and s.kind != "export"]
        model_source = self.source
        for s in torch_part:
            if s.kind == "distill":
                model_source = self.students[s.params["student"]["uri"]]
            if key is not None:
                data_key = self._data_key(s)
                key = _hash(key, s.kind, dict(s.params), data_key) if None not in (data_key or []) else None
        facts_all: list[dict[str, Any]] = []
        key = (
            _hash(key, "export", dict(export_step.params), model_source.input_names, cfg.max_sequence_length)
            if key
            else None
        )
        hit = self.cache.get(key)
        current = work / "export.onnx"
        if hit:
            shutil.copyfile(hit[0], current)
            facts_all = hit[1]
            for f in facts_all:
                f["cached"] = True
        else:
            t0 = time.monotonic()
            model = self.teacher if not torch_part else models.build_torch(self.source)
            for s in torch_part:
                t1 = time.monotonic()
                if s.kind == "prune":
                    model, facts = torch_steps.prune(model, self.source, s.params, s.where)
                else:
                    student = self.students[s.params["student"]["uri"]]
                    data = self.distill_data[s.params["dataset"]["uri"]]
                    model, facts = torch_steps.distill(
                        model, self.source, s.params, data, cfg.max_sequence_length, s.where, student
                    )
                facts_all.append({"step": s.describe(), "facts": facts, "seconds": round(time.monotonic() - t1, 3)})
            t1 = time.monotonic()
            ref_logits_source = model_source
            facts = onnx_steps.export(
                model, ref_logits_source, self.data, current, export_step.params, cfg.max_sequence_length, cfg.threads
            )
            facts_all.append(
                {"step": export_step.describe(), "facts": facts, "seconds": round(time.monotonic() - t1, 3)}
            )
            log.info("export: %s (%.1fs)", facts, time.monotonic() - t0)
            self.cache.put(key, current, facts_all)
            for f in facts_all:
                f["cached"] = False
        precision = "fp32"
        for i, s in enumerate(onnx_part):
            data_key = self._data_key(s)
            if key is not None:
                key = _hash(key, s.kind, dict(s.params), data_key, cfg.provider, cfg.device)
            out = work / f"step{i}-{s.kind}.onnx"
            hit = self.cache.get(key)
            t1 = time.monotonic()
            if hit:
                shutil.copyfile(hit[0], out)
                facts, cached = hit[1], True
            else:
                if s.kind == "optimize":
                    facts = onnx_steps.optimize(current, out, model_source, s.params, cfg.device == "gpu", s.where)
                elif s.kind == "quantize":
                    cal = self.calibration.get((s.params["calibration"] or {}).get("dataset", {}).get("uri"))
                    sub = work / f"q{i}"
                    sub.mkdir()
                    facts = onnx_steps.quantize(
                        current, out, model_source, s.params, cal, cfg.provider, cfg.max_sequence_length, sub
                    )
                else:
                    facts = onnx_steps.float16(current, out, s.params)
                self.cache.put(key, out, facts)
                cached = False
            log.info("%s: %s%s", s.describe(), facts, " (cached)" if cached else "")
            facts_all.append(
                {"step": s.describe(), "facts": facts, "seconds": round(time.monotonic() - t1, 3), "cached": cached}
            )
            if s.kind == "quantize":
                precision = "int8"
            elif s.kind == "float16":
                precision = "fp16"
            current = out
        return Candidate(name, steps, current, model_source, precision, facts_all)

    def _baseline(self) -> dict[str, Any]:
        """The source's own numbers: its artifact size and parameters, its metric (torch), and the latency of its
        plain fp32 ONNX export on the target provider (the runtime the candidate replaces it in)."""
        from . import measure, torch_steps

        cfg = self.cfg
        cand = self._build("source-fp32-export", (), self.work / "baseline")
        labels = self.data.y
        return {
            "sizeBytes": int(self.source.size_bytes),
            "parameters": int(torch_steps.parameters(self.teacher)[0]),
            "metric": measure.metric_value(cfg.metric, self.source_logits, labels, self.source_logits),
            "onnxPath": cand.path,
            "onnxSizeBytes": cand.path.stat().st_size,
        }

    def _package(self, cand: Candidate, folder: Path) -> None:
        """The files the server loads: model.onnx, the tokenizer (text) and kiln-model.json."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cand.path, folder / "model.onnx")
        src = cand.model_source
        info: dict[str, Any] = {"task": src.task, "labels": list(self.source.classes), "precision": cand.precision}
        if src.text:
            src.tokenizer().save_pretrained(str(folder))
            info["maxSequenceLength"] = self.cfg.max_sequence_length
        else:
            info["imageShape"] = list(self.source.image_shape or ())
        (folder / "kiln-model.json").write_text(json.dumps(info, indent=2) + "\n")
        if cand.profile is not None:
            cand.profile.write(folder)

    def _profile(self, cand: Candidate, logits: Any, batches: list[dict[str, Any]]) -> Profile:
        """The candidate's reference profile: its own ONNX Runtime outputs on the evaluation data, and the inputs'
        signals as the server computes them from live requests (`models.input_features`)."""
        import numpy as np

        from kiln_artifacts import profile

        cfg = self.cfg
        inputs = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
        source = {
            "from": "evaluation",
            "dataset": self.data.uri,
            "split": self.data.split,
            "outputs": "candidate",
            "candidate": cand.name,
            "precision": cand.precision,
            "runtime": "onnxruntime",
            "executionProvider": cfg.provider,
        }
        if self.data.digest:
            source["datasetDigest"] = self.data.digest
        if cand.model_source.text:
            source["maxSequenceLength"] = str(cfg.max_sequence_length)  # token counts are cut here, as served
        features = {**profile.output_features(logits), **inputs}
        return profile.build(self.source.task, features, labels=self.source.classes, source=source)

    def _measure(self, cand: Candidate, baseline: dict[str, Any]) -> None:
        import onnx

        from . import measure, onnx_steps

        cfg = self.cfg
        sess = onnx_steps.session(cand.path, cfg.provider, cfg.threads)
        batches: list[dict[str, Any]] = []
        logits = onnx_steps.onnx_logits(sess, cand.model_source, self.data.x, cfg.max_sequence_length, features=batches)
        del sess
        try:
            cand.profile = self._profile(cand, logits, batches)
        except ValueError as e:  # non-finite outputs: the candidate is still measured, and its gates say the rest
            log.warning("candidate %s: no reference profile: %s", cand.name, e)
        quality = measure.compare(cfg.metric, self.source_logits, logits, self.data.y)
        # The source's fp32 export and the candidate, timed interleaved on the target provider.
        src_bench, bench = measure.benchmark(
            [(baseline["onnxPath"], self.source), (cand.path, cand.model_source)],
            cfg.provider,
            cfg.batch_sizes,
            cfg.sequence_lengths,
            cfg.iterations,
            cfg.warmup,
            cfg.threads,
        )
        source_measured = {
            "sizeBytes": baseline["sizeBytes"],
            "parameters": baseline["parameters"],
            "metric": baseline["metric"],
            "latency": src_bench["latency"],
            "peakMemoryBytes": int(src_bench["peakMemoryBytes"]),
            "sessionStartSeconds": src_bench["sessionStartSeconds"],
        }
        place = measure.placement(cand.path, cand.model_source, cfg.provider, cfg.threads, cand.path.parent)
        package = cand.path.parent / "package"
        self._package(cand, package)
        cand.files = {str(p.relative_to(package)): p.stat().st_size for p in package.rglob("*") if p.is_file()}
        size = sum(cand.files.values())
        model = onnx.load(str(cand.path))
        qparams = {i for n in model.graph.node if n.op_type.endswith("QuantizeLinear") for i in n.input[1:]}
        params = sum(  # weights; scalars, shapes and quantization scales / zero points left out
            _numel(t.dims) for t in model.graph.initializer if _numel(t.dims) > 1 and t.name not in qparams
        )
        ref_src, ref_cand = src_bench["latency"][0], bench["latency"][0]
        measured = {
            "sizeBytes": int(size),
            "parameters": params,
            "metric": quality["metric"],
            "latency": bench["latency"],
            "peakMemoryBytes": int(bench["peakMemoryBytes"]),
            "sessionStartSeconds": bench["sessionStartSeconds"],
        }
        if "gpuMemoryBytes" in bench:  # GPU targets: device memory taken by the session (not in the CRD's report)
            measured["gpuMemoryBytes"] = int(bench["gpuMemoryBytes"])
            source_measured["gpuMemoryBytes"] = int(src_bench.get("gpuMemoryBytes", 0))
        cand.measured = measured
        summary = {
            "source": source_measured,
            "candidate": measured,
            "sizeRatio": round(size / baseline["sizeBytes"], 6),
            "speedup": round(ref_src["p95Ms"] / ref_cand["p95Ms"], 4),
            "p95Ms": ref_cand["p95Ms"],
            "accuracyDrop": round(quality["sourceMetric"] - quality["metric"], 6),
            "agreement": quality["agreement"],
            "maxLogitDiff": quality["maxLogitDiff"],
            "nodesByProvider": place["nodesByProvider"],
            "cpuFallbackNodes": place["cpuFallbackNodes"],
            "recipe": [f["step"] for f in cand.step_facts],
        }
        cand.gates = evaluate_gates(cfg.gates, summary, cfg.device)
        summary["gates"] = cand.gates
        cand.summary = summary
        cand.summary["headline"] = {
            "sizeBytes": size,
            "sizeRatio": summary["sizeRatio"],
            "p95Ms": summary["p95Ms"],
            "speedup": summary["speedup"],
            "metric": quality["metric"],
            "sourceMetric": quality["sourceMetric"],
            "agreement": quality["agreement"],
            "passed": cand.passed,
        }

    def _choose(self, candidates: list[Candidate]) -> Candidate:
        """The candidate passing the gates that is best by the objective; with none passing, the one with the
        fewest failed gates (its report says why it fails)."""
        if len(candidates) == 1:
            return candidates[0]
        by = "p95Ms" if self.cfg.auto_objective == "Fastest" else "sizeBytes"

        def rank(c: Candidate) -> tuple[int, float]:
            value = c.summary["p95Ms"] if by == "p95Ms" else c.measured["sizeBytes"]
            return (sum(not g["passed"] for g in c.gates), value)

        return min(candidates, key=rank)

    def _report(
        self, chosen: Candidate, baseline: dict[str, Any], candidates: list[Candidate], seconds: float
    ) -> dict[str, Any]:
        cfg = self.cfg
        summary = {k: v for k, v in chosen.summary.items() if k != "headline"}
        load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
        return {
            "reportVersion": 1,
            "summary": summary,  # the shape of ModelCompression status.report
            "candidate": chosen.name,
            "precision": chosen.precision,
            "gatesPassed": chosen.passed,
            "steps": chosen.step_facts,
            "files": chosen.files,
            "source": {
                "uri": self.source.uri,
                "digest": self.source.digest,
                "format": self.source.format,
                "task": self.source.task,
                "onnxFp32SizeBytes": baseline["onnxSizeBytes"],
            },
            "evaluation": {
                "dataset": self.data.uri,
                "digest": self.data.digest,
                "split": self.data.split,
                "samples": len(self.data),
                "metric": cfg.metric,
                "sourceMetric": chosen.summary["headline"]["sourceMetric"],
            },
            "target": {"device": cfg.device, "executionProvider": cfg.provider, "precision": cfg.precision},
            "benchmark": {
                "batchSizes": list(cfg.batch_sizes),
                "sequenceLengths": list(cfg.sequence_lengths),
                "iterations": cfg.iterations,
                "warmup": cfg.warmup,
                "threads": cfg.threads or "onnxruntime default",
                "loadAverage": [round(x, 2) for x in load],
                "cpus": os.cpu_count(),
            },
            "auto": {
                "objective": cfg.auto_objective,
                "candidates": [
                    {
                        "name": c.name,
                        "recipe": c.summary["recipe"],
                        "passed": c.passed,
                        "failedGates": [g["name"] for g in c.gates if not g["passed"]],
                        **c.summary["headline"],
                    }
                    for c in candidates
                ],
            }
            if cfg.steps is None
            else None,
            "cache": {"hits": self.cache.hits, "misses": self.cache.misses},
            "libraries": self._versions(),
            "seconds": round(seconds, 2),
        }

    def _publish(self, cand: Candidate, report: dict[str, Any]) -> dict[str, Any]:
        import kiln_artifacts as ka
        from kiln_artifacts.profile import PROFILE_ANNOTATION, PROFILE_FILE

        cfg = self.cfg
        folder = cand.path.parent / "package"
        (folder / "kiln-report.json").write_text(json.dumps(report, indent=2) + "\n")
        parents = [d for d in (self.source.digest, cand.model_source.digest) if d]
        s = report["summary"]
        metric = cfg.metric
        metrics = {
            metric: s["candidate"]["metric"],
            f"source_{metric}": s["source"]["metric"],
            "accuracy_drop": s["accuracyDrop"],
            "agreement": s["agreement"],
            "max_logit_diff": s["maxLogitDiff"],
            "size_ratio": s["sizeRatio"],
            "speedup": s["speedup"],
            "p95_ms": s["p95Ms"],
        }
        recipe = [{st.kind: dict(st.params)} for st in cand.steps]
        lineage = ka.Lineage(
            producer=cfg.producer,
            image=cfg.image,
            parents=tuple(dict.fromkeys(parents)),
            dataset=ka.DatasetRef(self.data.uri, self.data.digest),
            hyperparameters={
                "recipe": recipe,
                "steps": s["recipe"],
                "target": report["target"],
                "gates": dict(cfg.gates),
                "gatesPassed": cand.passed,
                "precision": cand.precision,
                "labels": dict(cfg.labels),
                "spec": _spec_key(cfg),
            },
            libraries=self._versions(),
        )
        annotations = {"kiln.dev/precision": cand.precision, "kiln.dev/gates-passed": str(cand.passed).lower()}
        if (folder / PROFILE_FILE).is_file():
            annotations[PROFILE_ANNOTATION] = PROFILE_FILE
        try:
            art = ka.publish(
                folder,
                cfg.output_uri or "",
                format="onnx",
                kind="model",
                task=self.source.task,
                metrics=metrics,
                lineage=lineage,
                annotations=annotations,
                progress=lambda p: log.info("publish: %s %s", p.phase, p.path or ""),
                signer=cfg.signer,
            )
        except ka.ArtifactExistsError as e:
            raise UserError(f"--output-uri {cfg.output_uri}: {e}") from None
        except (ka.CredentialsError, OSError) as e:
            raise InfrastructureError(f"--output-uri {cfg.output_uri}: {type(e).__name__}: {e}") from None
        return _artifact_ref(art.uri, art.digest, art.manifest)


def _artifact_ref(uri: str, digest: str, manifest: Manifest) -> dict[str, Any]:
    """The published candidate as the termination message names it, with the keys whose signatures verify on it."""
    import kiln_artifacts as ka

    ref: dict[str, Any] = {"uri": uri, "digest": digest}
    signed_by = ka.signers(manifest.to_dict(), where=uri)
    if signed_by:
        ref["signedBy"] = signed_by
    return ref


def _spec_key(cfg: Config) -> str:
    """What makes two runs the same compression: the spec fields that decide the result (not the image, the
    resources or the promotion policy)."""
    keep = ("source", "target", "recipe", "evaluation", "benchmark", "gates")
    return _hash({k: cfg.spec.get(k) for k in keep}, cfg.source_uri)


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def evaluate_gates(gates: dict[str, float] | Any, s: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """Each set gate's verdict, in the shape of status.report.gates; a GPU target always gets the placement gate."""
    out = []

    def gate(name: str, passed: bool, value: float, threshold: float, message: str) -> None:
        out.append(
            {"name": name, "passed": bool(passed), "value": value, "threshold": threshold, "message": message[:1024]}
        )

    if "maxAccuracyDrop" in gates:
        t, v = gates["maxAccuracyDrop"], s["accuracyDrop"]
        gate("maxAccuracyDrop", v <= t + 1e-12, v, t, f"metric drop {v:.4f} {'<=' if v <= t + 1e-12 else '>'} {t:g}")
    if "minAgreement" in gates:
        t, v = gates["minAgreement"], s["agreement"]
        gate("minAgreement", v >= t, v, t, f"top-1 agreement {v:.4f} {'>=' if v >= t else '<'} {t:g}")
    if "maxP95LatencyMs" in gates:
        t, v = gates["maxP95LatencyMs"], s["p95Ms"]
        gate(
            "maxP95LatencyMs", v <= t, v, t, f"p95 {v:.3f} ms {'<=' if v <= t else '>'} {t:g} ms at the reference cell"
        )
    if "minSpeedup" in gates:
        t, v = gates["minSpeedup"], s["speedup"]
        gate("minSpeedup", v >= t, v, t, f"p95 speed-up x{v:.2f} {'>=' if v >= t else '<'} x{t:g} over the source")
    if "maxSizeBytes" in gates:
        t, v = gates["maxSizeBytes"], s["candidate"]["sizeBytes"]
        gate("maxSizeBytes", v <= t, v, t, f"artifact {v} bytes {'<=' if v <= t else '>'} {int(t)}")
    if device == "gpu":
        n = len(s["cpuFallbackNodes"])
        gate(
            "placement",
            n == 0,
            n,
            0,
            f"{n} heavy nodes on CPUExecutionProvider" + (f": {', '.join(s['cpuFallbackNodes'][:5])}" if n else ""),
        )
    return out


def run_main() -> None:
    sys.exit(main())
