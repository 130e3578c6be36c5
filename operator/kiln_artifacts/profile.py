"""A model's reference profile: small summaries of what it saw and answered on its evaluation set, the yardstick
live traffic is compared with (docs/monitoring.md).

The trainer and the compressor write one into every model artifact they evaluate (``kiln-profile.json``, counted
in the digest like any file); the server keeps the same summaries of live traffic over a sliding `Window` and
reports, per signal, the Jensen-Shannon distance between the two. Features are computed here, by one set of
functions, for both sides: a reference and live traffic summarised differently would drift by construction.

Signals, each a histogram over bins fixed by the reference:

- ``prediction``: the predicted class (categorical, one bin per label);
- ``confidence``: the top-1 softmax probability;
- text: ``tokens`` (tokens per input, special tokens included, after truncation) and ``unknown_tokens`` (the
  share of them that are the tokenizer's unknown token);
- images: ``channel<c>_mean`` and ``channel<c>_std`` (per-channel pixel statistics of each input, as fed to the
  model).

A numeric signal's bins are cut at the reference's deciles, so each holds about a tenth of the reference; a value
equal to a cut falls in the lower bin, so a point mass (no unknown tokens at all) keeps a bin of its own. Two
outer bins, empty in the reference, take the values below its minimum and above its maximum.

numpy is imported where arrays are handled; `js_distance` is plain Python, for the operator, which has no numpy.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SCHEMA = "kiln.dev/profile/v1"
PROFILE_FILE = "kiln-profile.json"
# The manifest annotation that names the profile file of an artifact.
PROFILE_ANNOTATION = "kiln.dev/profile"
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LOW_TAIL, HIGH_TAIL = 0.01, 0.99
# An input whose unknown-token share is this far above the reference's high tail is flagged: a few unknown
# tokens are normal in any text; a sentence that is mostly unknown tokens is from elsewhere (another language,
# binary, another tokenizer's ids).
UNKNOWN_MARGIN = 0.1
MAX_BINS = 4096
ANOMALY_KINDS = ("low_confidence", "input_out_of_range", "unknown_tokens")


class ProfileError(ValueError):
    """A profile document that breaks a rule; the message names the field."""


@dataclass(frozen=True)
class Signal:
    """One signal's reference histogram.

    categorical: ``labels[i]`` is bin i. numeric: bin i holds values in (cuts[i-1], cuts[i]] (open ends), so there
    are ``len(cuts) + 1`` bins; ``low``/``high`` are the reference's 1st and 99th percentiles, ``min``/``max`` its
    range."""

    kind: str
    counts: tuple[int, ...]
    cuts: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    min: float | None = None
    max: float | None = None

    @property
    def bins(self) -> int:
        return len(self.counts)

    def bin(self, values: np.ndarray) -> np.ndarray:
        """The bin index of each value (int64)."""
        import numpy as np

        if self.kind == "categorical":
            # A class the reference never named (more logits than labels) lands in the last bin.
            return np.clip(np.asarray(values, dtype=np.int64), 0, self.bins - 1)
        return np.searchsorted(np.asarray(self.cuts, dtype=np.float64), np.asarray(values, dtype=np.float64))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "counts": list(self.counts)}
        if self.kind == "categorical":
            doc["labels"] = list(self.labels)
        else:
            doc.update(cuts=list(self.cuts), low=self.low, high=self.high, min=self.min, max=self.max)
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Signal:
        if not isinstance(doc, Mapping):
            raise ProfileError(f"{where}: must be an object")
        kind = doc.get("kind")
        counts = _numbers(doc.get("counts"), f"{where}.counts", integer=True)
        if not 1 <= len(counts) <= MAX_BINS or any(c < 0 for c in counts):
            raise ProfileError(f"{where}.counts: must be 1-{MAX_BINS} counts, each >= 0")
        if kind == "categorical":
            labels = doc.get("labels")
            if (
                not isinstance(labels, list)
                or len(labels) != len(counts)
                or not all(isinstance(x, str) for x in labels)
            ):
                raise ProfileError(f"{where}.labels: must be a list of strings, one per count")
            return cls("categorical", tuple(int(c) for c in counts), labels=tuple(labels))
        if kind != "numeric":
            raise ProfileError(f"{where}.kind: must be 'categorical' or 'numeric', got {kind!r}")
        cuts = _numbers(doc.get("cuts"), f"{where}.cuts")
        if len(cuts) != len(counts) - 1 or any(b <= a for a, b in itertools.pairwise(cuts)):
            raise ProfileError(f"{where}.cuts: must be strictly increasing, one fewer than counts")
        bounds = {}
        for name in ("low", "high", "min", "max"):
            value = doc.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ProfileError(f"{where}.{name}: must be a finite number")
            bounds[name] = float(value)
        if not bounds["min"] <= bounds["low"] <= bounds["high"] <= bounds["max"]:
            raise ProfileError(f"{where}: must have min <= low <= high <= max")
        return cls("numeric", tuple(int(c) for c in counts), cuts=tuple(cuts), **bounds)


@dataclass(frozen=True)
class Profile:
    """A reference profile: the task, how many samples made it, where they came from, and its signals."""

    task: str
    samples: int
    signals: dict[str, Signal]
    source: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "task": self.task,
            "samples": self.samples,
            "source": dict(self.source),
            "signals": {name: s.to_json() for name, s in self.signals.items()},
        }

    def write(self, folder: Path) -> Path:
        """Write ``kiln-profile.json`` into an artifact folder about to be published; returns its path."""
        path = folder / PROFILE_FILE
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")
        return path

    @classmethod
    def from_json(cls, doc: Any) -> Profile:
        if not isinstance(doc, Mapping):
            raise ProfileError("profile: must be a JSON object")
        if doc.get("schema") != SCHEMA:
            raise ProfileError(f"schema: must be {SCHEMA!r}, got {doc.get('schema')!r}")
        task = doc.get("task")
        if not isinstance(task, str) or not task:
            raise ProfileError("task: must be a non-empty string")
        samples = doc.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ProfileError("samples: must be an integer >= 1")
        source = doc.get("source", {})
        if not isinstance(source, Mapping) or not all(isinstance(v, str) for v in source.values()):
            raise ProfileError("source: must be an object of strings")
        signals = doc.get("signals")
        if not isinstance(signals, Mapping) or not signals:
            raise ProfileError("signals: must be a non-empty object")
        parsed = {str(name): Signal.from_json(s, f"signals.{name}") for name, s in signals.items()}
        return cls(task, samples, parsed, dict(source))

    @classmethod
    def read(cls, path: Path | str) -> Profile:
        try:
            doc = json.loads(Path(path).read_text())
        except ValueError as e:
            raise ProfileError(f"profile: not JSON: {e}") from None
        return cls.from_json(doc)

    def anomalies(self, features: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Per kind, how many of the samples in `features` are anomalous against this reference:

        - ``low_confidence``: top-1 confidence below the reference's 1st percentile;
        - ``input_out_of_range``: an input summary outside the reference's range;
        - ``unknown_tokens``: an unknown-token share more than ``UNKNOWN_MARGIN`` above the reference's 99th
          percentile."""
        import numpy as np

        out = dict.fromkeys(ANOMALY_KINDS, 0)
        conf = self.signals.get("confidence")
        if conf is not None and "confidence" in features:
            out["low_confidence"] = int(np.count_nonzero(features["confidence"] < conf.low))
        outside = None
        for name, values in features.items():
            sig = self.signals.get(name)
            if sig is None or sig.kind != "numeric" or name in ("confidence", "unknown_tokens"):
                continue
            flags = (values < sig.min) | (values > sig.max)
            outside = flags if outside is None else outside | flags
        if outside is not None:
            out["input_out_of_range"] = int(np.count_nonzero(outside))
        unk = self.signals.get("unknown_tokens")
        if unk is not None and "unknown_tokens" in features:
            limit = (unk.high or 0.0) + UNKNOWN_MARGIN
            out["unknown_tokens"] = int(np.count_nonzero(features["unknown_tokens"] > limit))
        return out


def _numbers(value: Any, where: str, integer: bool = False) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(x, int if integer else (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value
    ):
        raise ProfileError(f"{where}: must be a list of finite {'integers' if integer else 'numbers'}")
    return [float(x) for x in value] if not integer else [int(x) for x in value]


# ------------------------------------------------------------------------------------------------- features


def output_features(logits: np.ndarray) -> dict[str, np.ndarray]:
    """``prediction`` and ``confidence`` of each row of (N, classes) logits."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    return {"prediction": probs.argmax(axis=1), "confidence": probs.max(axis=1)}


def text_features(lengths: np.ndarray, unknown: np.ndarray) -> dict[str, np.ndarray]:
    """``tokens`` and ``unknown_tokens`` from each input's token count and its count of unknown tokens."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    return {"tokens": lengths, "unknown_tokens": np.asarray(unknown, dtype=np.float64) / np.maximum(lengths, 1.0)}


def token_features(input_ids: np.ndarray, attention_mask: np.ndarray, unk_id: int | None) -> dict[str, np.ndarray]:
    """`text_features` of a padded (N, L) batch of token ids and its attention mask."""
    import numpy as np

    mask = np.asarray(attention_mask) != 0
    unknown = (mask & (np.asarray(input_ids) == unk_id)).sum(axis=1) if unk_id is not None else np.zeros(len(mask))
    return text_features(mask.sum(axis=1), unknown)


def image_features(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """``channel<c>_mean`` and ``channel<c>_std`` of each (C, H, W) image in an (N, C, H, W) batch."""
    import numpy as np

    x = np.asarray(pixels, dtype=np.float32).reshape(pixels.shape[0], pixels.shape[1], -1)
    mean, std = x.mean(axis=2), x.std(axis=2)
    out: dict[str, np.ndarray] = {}
    for c in range(x.shape[1]):
        out[f"channel{c}_mean"] = mean[:, c].astype(np.float64)
        out[f"channel{c}_std"] = std[:, c].astype(np.float64)
    return out


# ------------------------------------------------------------------------------------------------- building


def build(
    task: str,
    features: Mapping[str, np.ndarray],
    labels: Sequence[str],
    source: Mapping[str, str] | None = None,
) -> Profile:
    """The profile of `features` (every signal computed on the same N samples); ``prediction`` is categorical
    over `labels`, everything else numeric."""
    import numpy as np

    sizes = {len(v) for v in features.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"features: every signal needs the same number (>= 1) of samples, got {sorted(sizes)}")
    signals: dict[str, Signal] = {}
    for name, values in features.items():
        v = np.asarray(values)
        if name == "prediction":
            counts = np.bincount(np.clip(v.astype(np.int64), 0, len(labels) - 1), minlength=len(labels))
            signals[name] = Signal("categorical", tuple(int(c) for c in counts), labels=tuple(labels))
            continue
        v = v.astype(np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"features: {name} has non-finite values")
        # Cuts at values the reference has (inverted_cdf: no interpolation), so whole-number signals such as token
        # counts get whole-number cuts. Two more fence off the values outside the reference's range into outer
        # bins the reference leaves empty: a shift below a point mass (every input 6 tokens long) or beyond the
        # extremes shows in the score.
        below = np.nextafter(v.min(), -np.inf)
        cuts = np.unique(np.concatenate([[below], np.quantile(v, QUANTILES, method="inverted_cdf"), [v.max()]]))
        counts = np.bincount(np.searchsorted(cuts, v), minlength=len(cuts) + 1)
        low, high = np.quantile(v, (LOW_TAIL, HIGH_TAIL))
        signals[name] = Signal(
            "numeric",
            tuple(int(c) for c in counts),
            cuts=tuple(float(c) for c in cuts),
            low=float(low),
            high=float(high),
            min=float(v.min()),
            max=float(v.max()),
        )
    return Profile(task, sizes.pop(), signals, dict(source or {}))


# ------------------------------------------------------------------------------------------------- drift


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """The Jensen-Shannon distance (base 2: 0 for the same distribution, 1 for disjoint ones) between two
    histograms over the same bins, given as counts; 0 when either is empty."""
    if len(p) != len(q):
        raise ValueError(f"histograms over different bins: {len(p)} and {len(q)}")
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0:
        return 0.0
    d = 0.0
    for a, b in zip(p, q, strict=True):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            d += a * math.log2(a / m)
        if b > 0:
            d += b * math.log2(b / m)
    return math.sqrt(max(d / 2, 0.0))


class Window:
    """The last `size` samples of live traffic (and none older than `max_age` seconds, if set), kept as bin
    indices per signal with running counts: memory is fixed by `size`, whatever the traffic. Not thread-safe:
    the caller holds a lock."""

    def __init__(self, profile: Profile, size: int, max_age: float | None = None) -> None:
        import numpy as np

        if size < 1:
            raise ValueError("size: must be >= 1")
        self.profile = profile
        self.size = size
        self.max_age = max_age
        self.signals = dict(profile.signals)
        self._bins = {n: np.zeros(size, dtype=np.int32) for n in self.signals}
        self._counts = {n: np.zeros(s.bins, dtype=np.int64) for n, s in self.signals.items()}
        self._stamps = np.zeros(size, dtype=np.float64)
        self._start = 0
        self.samples = 0

    def observe(self, features: Mapping[str, np.ndarray], now: float) -> None:
        """Add a batch of samples (every signal of the profile present, the same length), all seen at `now`."""
        import numpy as np

        k = len(next(iter(features.values())))
        if k == 0:
            return
        if k > self.size:  # only the newest `size` can stay
            features = {n: v[-self.size :] for n, v in features.items()}
            k = self.size
        overflow = self.samples + k - self.size
        if overflow > 0:
            self._evict(overflow)
        pos = (self._start + self.samples + np.arange(k)) % self.size
        for name, sig in self.signals.items():
            idx = sig.bin(features[name])
            self._bins[name][pos] = idx
            self._counts[name] += np.bincount(idx, minlength=sig.bins)
        self._stamps[pos] = now
        self.samples += k

    def _evict(self, m: int) -> None:
        import numpy as np

        pos = (self._start + np.arange(m)) % self.size
        for name, sig in self.signals.items():
            self._counts[name] -= np.bincount(self._bins[name][pos], minlength=sig.bins)
        self._start = (self._start + m) % self.size
        self.samples -= m

    def expire(self, now: float) -> None:
        """Drop samples older than ``max_age`` (if set)."""
        import numpy as np

        if self.max_age is None or not self.samples:
            return
        order = (self._start + np.arange(self.samples)) % self.size
        old = int(np.searchsorted(self._stamps[order], now - self.max_age, side="left"))
        if old:
            self._evict(old)

    def counts(self, signal: str) -> list[int]:
        return [int(c) for c in self._counts[signal]]

    def scores(self) -> dict[str, float]:
        """Per signal, the Jensen-Shannon distance of the window from the reference."""
        return {n: js_distance(self.counts(n), s.counts) for n, s in self.signals.items()}


__all__ = [
    "ANOMALY_KINDS",
    "PROFILE_ANNOTATION",
    "PROFILE_FILE",
    "SCHEMA",
    "Profile",
    "ProfileError",
    "Signal",
    "Window",
    "build",
    "image_features",
    "js_distance",
    "output_features",
    "text_features",
    "token_features",
]
