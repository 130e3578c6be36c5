"""Monitoring of live traffic against the model's reference profile (docs/server.md "Monitoring").

The reference is the artifact's own profile (``kiln-profile.json``, which the trainer and compressor write), or the
one ``--reference-uri`` names, or, for a model that has none, a profile built from the first
``--reference-samples`` samples served. Each executed batch's features (kiln_artifacts.profile: the same functions
that made the reference) go into a sliding `Window` of bin indices and are checked for anomalies; the drift scores
are computed only when /metrics is scraped. What a batch costs is a few vectorised numpy calls and a lock held for
an array assignment, so monitoring every request does not show in throughput.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln_artifacts.contract import ExitCode
from kiln_artifacts.profile import (
    ANOMALY_KINDS,
    PROFILE_ANNOTATION,
    PROFILE_FILE,
    Profile,
    ProfileError,
    Window,
    build,
    image_features,
    js_distance,
    output_features,
    token_features,
)

from .errors import StartupError
from .metrics import MonitorMetrics

if TYPE_CHECKING:
    from .config import Config
    from .model import Model

log = logging.getLogger("kiln_server")

TEXT_SIGNALS = ("prediction", "confidence", "tokens", "unknown_tokens")
SOURCES = ("artifact", "uri", "traffic")


def signals_for(task: str, image_shape: Sequence[int] | None) -> tuple[str, ...]:
    """The signals the server computes for a model of this task (and image shape)."""
    if task == "text-classification":
        return TEXT_SIGNALS
    channels = image_shape[0] if image_shape else 0
    per_channel = [f"channel{c}_{stat}" for c in range(channels) for stat in ("mean", "std")]
    return ("prediction", "confidence", *per_channel)


class Monitor:
    """The reference, the live window and the monitoring metrics of one served model.

    ``observe_*`` run in the batcher's executor threads (several at once with ``--instances``), `update_metrics`
    on the event loop at scrape time; the window and the traffic reference being collected are guarded by one
    lock. A failure in here is logged once and never fails the batch it came with."""

    def __init__(
        self,
        *,
        task: str,
        labels: Sequence[str],
        signals: Sequence[str],
        reference: Profile | None,
        source: str,
        metrics: MonitorMetrics,
        window: int = 1000,
        max_age: float = 0.0,
        min_samples: int = 200,
        thresholds: Mapping[str, float] | None = None,
        threshold: float = 0.2,
        reference_samples: int = 1000,
        unk_id: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(SOURCES)}")
        self.task = task
        self.labels = tuple(labels)
        self.signals = tuple(signals)
        self.source = source
        self.metrics = metrics
        self.window_size = window
        self.max_age = max_age if max_age > 0 else None
        self.min_samples = min_samples
        self.thresholds = {s: float((thresholds or {}).get(s, threshold)) for s in self.signals}
        self.reference_target = reference_samples
        self.unk_id = unk_id
        self._clock = clock
        self._lock = threading.Lock()
        self.reference: Profile | None = None
        self.window: Window | None = None
        self._collected: list[dict[str, np.ndarray]] = []
        self._collected_n = 0
        self._failed = False
        m = metrics
        self._anomalies = {kind: m.anomalies.labels(m.model, kind) for kind in ANOMALY_KINDS}
        self._predicted = [m.predictions.labels(m.model, label) for label in self.labels]
        self._scores = {s: m.drift_score.labels(m.model, s) for s in self.signals}
        for s in self.signals:
            m.drift_threshold.labels(m.model, s).set(self.thresholds[s])
        m.min_samples.set(min_samples)
        self._info = m.reference_info.labels(m.model, source)
        self._info.set(0)
        m.reference_samples.set(0)
        if reference is not None:
            self._use(reference)
        self.update_metrics()

    # ------------------------------------------------------------------ the batch path (executor threads)
    def observe_images(self, pixels: np.ndarray, logits: np.ndarray) -> None:
        """One executed batch of an image model: its (N, C, H, W) input and (N, classes) logits."""
        try:
            self._observe({**image_features(pixels), **output_features(logits)})
        except Exception:
            self._failure()

    def observe_tokens(self, feeds: Sequence[Mapping[str, np.ndarray]], logits: np.ndarray) -> None:
        """One executed batch of a text model: the padded runs it was made of (``input_ids``, ``attention_mask``
        each) and the logits of their rows, in the same order."""
        try:
            parts = [token_features(f["input_ids"], f["attention_mask"], self.unk_id) for f in feeds]
            if len(parts) == 1:
                features = dict(parts[0])
            else:
                features = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            features.update(output_features(logits))
            self._observe(features)
        except Exception:
            self._failure()

    def observe(self, features: Mapping[str, np.ndarray]) -> None:
        """A batch's features (every monitored signal, one value per sample)."""
        try:
            self._observe(features)
        except Exception:
            self._failure()

    def _failure(self) -> None:
        if not self._failed:
            self._failed = True
            log.exception("monitoring: a batch could not be observed; serving goes on (logged once)")

    def _observe(self, features: Mapping[str, np.ndarray]) -> None:
        predicted = np.bincount(np.asarray(features["prediction"], dtype=np.int64), minlength=len(self._predicted))
        for i in np.flatnonzero(predicted[: len(self._predicted)]):
            self._predicted[i].inc(int(predicted[i]))
        reference = self.reference
        if reference is not None:
            for kind, n in reference.anomalies(features).items():
                if n:
                    self._anomalies[kind].inc(n)
        with self._lock:
            if self.window is None:
                rest = self._collect(features)
                if rest is None:
                    return
                features = rest
            assert self.window is not None
            self.window.observe(features, self._clock())

    def _collect(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Add a batch to the traffic reference being collected (lock held). When it is complete, the reference
        is built and the batch's samples beyond it are returned, for the window; else None."""
        values = {name: np.asarray(features[name]) for name in self.signals}
        finite = np.ones(len(values["prediction"]), dtype=bool)
        for v in values.values():
            if v.dtype.kind == "f":
                finite &= np.isfinite(v)
        if not finite.all():  # a profile is made of finite values; a NaN logit says nothing about the traffic
            values = {name: v[finite] for name, v in values.items()}
        need = self.reference_target - self._collected_n
        self._collected.append({name: v[:need].copy() for name, v in values.items()})
        taken = min(need, len(values["prediction"]))
        self._collected_n += taken
        self.metrics.reference_samples.set(self._collected_n)
        if self._collected_n < self.reference_target:
            return None
        joined = {name: np.concatenate([c[name] for c in self._collected]) for name in self.signals}
        self._collected = []
        profile = build(self.task, joined, self.labels, {"kind": "traffic"})
        self._use(profile)
        log.info("reference: built from the first %d samples of live traffic", profile.samples)
        rest = {name: v[taken:] for name, v in values.items()}
        return rest if len(rest["prediction"]) else None

    def _use(self, profile: Profile) -> None:
        self.window = Window(profile, self.window_size, self.max_age)
        self.reference = profile
        self.metrics.reference_samples.set(profile.samples)
        self._info.set(1)

    # ------------------------------------------------------------------ scrape time (event loop)
    def update_metrics(self) -> dict[str, Any]:
        """Expire old samples, score every signal and set the gauges; returns what was set."""
        with self._lock:
            window = self.window
            if window is None:
                samples, counts = 0, {}
            else:
                window.expire(self._clock())
                samples = window.samples
                counts = {name: window.counts(name) for name in window.signals}
        scores: dict[str, float] = {}
        for name in self.signals:
            if window is None or name not in counts:
                scores[name] = math.nan
            else:
                scores[name] = js_distance(counts[name], window.signals[name].counts)
            self._scores[name].set(scores[name])
        self.metrics.window_samples.set(samples)
        return {"samples": samples, "scores": scores, "thresholds": dict(self.thresholds)}


# ---------------------------------------------------------------------------------------------- the reference
def model_labels(model: Model) -> tuple[str, ...]:
    """The class names predictions are counted by: the model's labels, else the class indices."""
    assert model.spec is not None
    return model.spec.labels or tuple(str(i) for i in range(max(model.num_labels, 1)))


def _parse(data: bytes, where: str) -> Profile:
    try:
        return Profile.from_json(json.loads(data))
    except ProfileError as e:
        raise StartupError(ExitCode.CONTRACT, f"{where}: not a valid profile: {e}") from None
    except ValueError as e:
        raise StartupError(ExitCode.CONTRACT, f"{where}: not a profile (not JSON: {e})") from None


def _profile_in(art: Any, where: str) -> Profile | None:
    """The profile an artifact holds: the file its manifest annotation names, else ``kiln-profile.json``; None
    when it has neither."""
    import kiln_artifacts as ka

    name = art.manifest.annotations.get(PROFILE_ANNOTATION)
    if name is None:
        if PROFILE_FILE not in art.files:
            return None
        name = PROFILE_FILE
    elif name not in art.files:
        raise StartupError(
            ExitCode.CONTRACT,
            f"{where}: its manifest annotation {PROFILE_ANNOTATION} names {name!r}, which is not one of its files",
        )
    try:
        data = art.read_bytes(name)
    except (ka.ArtifactError, OSError) as e:
        raise StartupError(ExitCode.ARTIFACT, f"{where}: {name}: {e}") from e
    return _parse(data, f"{where}: {name}")


def read_reference(value: str) -> Profile:
    """The profile ``--reference-uri`` names: a profile JSON file (a local path, file://, pvc:// or an s3://
    object) or an artifact holding one (any kiln_artifacts URI). StartupError naming the flag: ARTIFACT when it
    cannot be read, CONTRACT when it is not a profile."""
    import kiln_artifacts as ka
    from kiln_artifacts.storage import resolve
    from kiln_artifacts.uri import parse_uri

    where = f"--reference-uri {value}"
    try:
        uri = parse_uri(value if "://" in value else f"file://{Path(value).resolve()}", field="--reference-uri")
        local = uri.local_path()
        if local is not None:
            if local.is_file():
                return _parse(local.read_bytes(), where)
            if not local.is_dir():
                raise StartupError(ExitCode.ARTIFACT, f"{where}: not found")
            if not (local / ka.MANIFEST_NAME).is_file():
                if (local / PROFILE_FILE).is_file():  # a plain folder holding a profile
                    return _parse((local / PROFILE_FILE).read_bytes(), f"{where}: {PROFILE_FILE}")
                raise StartupError(
                    ExitCode.CONTRACT, f"{where}: neither a profile file nor an artifact (no {ka.MANIFEST_NAME})"
                )
        try:
            art = ka.load(uri)
        except ka.ArtifactNotFoundError:
            if uri.scheme != "s3":
                raise
            loc = resolve(uri)
            try:
                return _parse(loc.fs.cat_file(loc.path), where)
            except FileNotFoundError:
                raise StartupError(ExitCode.ARTIFACT, f"{where}: not found (no object, no artifact)") from None
    except StartupError:
        raise
    except (ka.ArtifactError, OSError) as e:
        raise StartupError(ExitCode.ARTIFACT, f"{where}: cannot be read: {type(e).__name__}: {e}") from e
    profile = _profile_in(art, where)
    if profile is None:
        raise StartupError(ExitCode.CONTRACT, f"{where}: the artifact holds no {PROFILE_FILE}")
    return profile


def check_profile(profile: Profile, task: str, labels: Sequence[str], allowed: Sequence[str], where: str) -> None:
    """A profile fits the model: its task, its signals (ones the server computes for it) and its classes."""
    if profile.task != task:
        raise StartupError(ExitCode.CONTRACT, f"{where}: a profile of a {profile.task} model; this one is {task}")
    unknown = [s for s in profile.signals if s not in allowed]
    if unknown:
        raise StartupError(
            ExitCode.CONTRACT,
            f"{where}: signals {', '.join(unknown)} are not ones the server computes for this model "
            f"({', '.join(allowed)})",
        )
    prediction = profile.signals.get("prediction")
    if prediction is not None and prediction.labels != tuple(labels):
        raise StartupError(
            ExitCode.CONTRACT,
            f"{where}: its classes {list(prediction.labels)} differ from the model's {list(labels)}",
        )


def create_monitor(config: Config, model: Model, metrics: MonitorMetrics) -> Monitor:
    """The Monitor of a loaded model: its reference (StartupError when it cannot be read or does not fit)."""
    assert model.spec is not None
    task = model.spec.task
    labels = model_labels(model)
    allowed = signals_for(task, model.spec.image_shape)
    if config.reference_uri:
        profile: Profile | None = read_reference(config.reference_uri)
        source, where = "uri", f"--reference-uri {config.reference_uri}"
    else:
        where = f"artifact {model.uri}"
        profile = _profile_in(model.artifact, where)
        source = "traffic" if profile is None else "artifact"
    if profile is not None:
        check_profile(profile, task, labels, allowed, where)
        signals = tuple(profile.signals)
        log.info("reference: %s (%d samples; signals %s)", where, profile.samples, ", ".join(signals))
    else:
        signals = allowed
        log.info(
            "reference: the artifact has no %s; building one from the first %d samples of live traffic",
            PROFILE_FILE,
            config.reference_samples,
        )
    overrides = dict(config.drift_thresholds)
    ignored = sorted(set(overrides) - set(signals))
    if ignored:
        shown = ", ".join(signals)
        log.warning("--drift-thresholds: %s not among this model's signals (%s); ignored", ", ".join(ignored), shown)
    if config.drift_min_samples > config.drift_window:
        log.warning(
            "--drift-min-samples %d is over --drift-window %d: the window never holds enough for a verdict",
            config.drift_min_samples,
            config.drift_window,
        )
    return Monitor(
        task=task,
        labels=labels,
        signals=signals,
        reference=profile,
        source=source,
        metrics=metrics,
        window=config.drift_window,
        max_age=config.drift_max_age,
        min_samples=config.drift_min_samples,
        thresholds=overrides,
        threshold=config.drift_threshold,
        reference_samples=config.reference_samples,
        unk_id=model.unk_id,
    )


__all__ = ["Monitor", "check_profile", "create_monitor", "model_labels", "read_reference", "signals_for"]
