"""The reference profile: building it, its JSON and validation, the live window and the drift score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kiln_artifacts import profile as P


def sample(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    logits = rng.normal(size=(n, 3)) * 2 + np.array([1.0, 0.0, -1.0])
    pixels = rng.normal(loc=shift, size=(n, 2, 6, 6)).astype(np.float32)
    return {**P.output_features(logits), **P.image_features(pixels)}


def reference(n: int = 2000) -> P.Profile:
    return P.build("image-classification", sample(np.random.default_rng(0), n), ["a", "b", "c"], {"from": "test"})


def test_build_makes_decile_bins_and_the_json_round_trips():
    prof = reference()
    assert set(prof.signals) == {
        "prediction",
        "confidence",
        "channel0_mean",
        "channel0_std",
        "channel1_mean",
        "channel1_std",
    }
    pred = prof.signals["prediction"]
    assert pred.kind == "categorical"
    assert pred.labels == ("a", "b", "c")
    assert sum(pred.counts) == 2000
    assert pred.counts[0] > pred.counts[2]  # the first class's logit is biased up
    mean = prof.signals["channel0_mean"]
    assert mean.bins == 12
    assert sum(mean.counts) == 2000
    assert mean.counts[0] == mean.counts[-1] == 0  # outside the reference's range
    assert all(190 <= c <= 210 for c in mean.counts[1:-1])  # deciles: a tenth each
    assert mean.min <= mean.low <= mean.high <= mean.max
    doc = json.loads(json.dumps(prof.to_json()))
    assert P.Profile.from_json(doc) == prof
    assert len(json.dumps(doc)) < 8000  # kilobytes, not megabytes


def test_a_point_mass_keeps_a_bin_of_its_own():
    lengths = np.array([10] * 90 + [12] * 10)
    unknown = np.array([0] * 95 + [3] * 5)
    prof = P.build("text-classification", P.text_features(lengths, unknown), ["x"])
    unk = prof.signals["unknown_tokens"]
    assert unk.bin(np.array([0.0]))[0] != unk.bin(np.array([0.1]))[0]
    assert unk.counts[unk.bin(np.array([0.0]))[0]] == 95
    tokens = prof.signals["tokens"]
    # below and above a reference that has only 10s and 12s: bins of their own, empty in the reference
    low, ten, high = tokens.bin(np.array([8.0, 10.0, 20.0]))
    assert len({low, ten, high}) == 3
    assert tokens.counts[low] == tokens.counts[high] == 0
    assert tokens.counts[ten] == 90


def test_token_features_count_only_unmasked_tokens():
    ids = np.array([[101, 100, 7, 102, 0], [101, 5, 102, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    f = P.token_features(ids, mask, unk_id=100)
    assert f["tokens"].tolist() == [4, 3]
    assert f["unknown_tokens"].tolist() == [0.25, 0.0]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(schema="other"), "schema"),
        (lambda d: d.update(samples=0), "samples"),
        (lambda d: d.update(signals={}), "signals"),
        (lambda d: d["signals"]["confidence"].update(cuts=[0.5, 0.4]), "signals.confidence.cuts"),
        (lambda d: d["signals"]["confidence"].update(counts=[1, -1]), "signals.confidence.counts"),
        (lambda d: d["signals"]["confidence"].update(low=float("nan")), "signals.confidence.low"),
        (lambda d: d["signals"]["prediction"].update(labels=["a"]), "signals.prediction.labels"),
        (lambda d: d["signals"]["prediction"].update(kind="ordinal"), "signals.prediction.kind"),
    ],
)
def test_a_broken_profile_is_rejected_naming_the_field(mutate, field):
    doc = json.loads(json.dumps(reference(200).to_json()))
    mutate(doc)
    with pytest.raises(P.ProfileError, match=field.replace(".", r"\.")):
        P.Profile.from_json(doc)


def test_js_distance():
    assert P.js_distance([5, 5], [50, 50]) == 0.0
    assert P.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert P.js_distance([0, 0], [1, 1]) == 0.0  # nothing to compare
    a, b = [3, 1, 6], [2, 5, 3]
    assert P.js_distance(a, b) == pytest.approx(P.js_distance(b, a))
    assert 0 < P.js_distance(a, b) < 1
    with pytest.raises(ValueError, match="different bins"):
        P.js_distance([1], [1, 2])


def brute_counts(prof: P.Profile, stream: list[tuple[dict[str, np.ndarray], float]], signal: str) -> list[int]:
    values = np.concatenate([f[signal] for f, _ in stream])
    return np.bincount(prof.signals[signal].bin(values), minlength=prof.signals[signal].bins).tolist()


def test_window_keeps_the_last_samples_and_drops_old_ones():
    prof = reference()
    rng = np.random.default_rng(1)
    w = P.Window(prof, size=100, max_age=30)
    seen: list[tuple[dict[str, np.ndarray], float]] = []
    for t in range(12):
        batch = sample(rng, 17)
        w.observe(batch, float(t))
        seen.append((batch, float(t)))
    assert w.samples == 100
    flat = {n: np.concatenate([f[n] for f, _ in seen])[-100:] for n in prof.signals}
    assert w.counts("channel0_mean") == brute_counts(prof, [(flat, 0.0)], "channel0_mean")
    big = sample(rng, 250)  # more than the window in one batch: the newest 100 stay
    w.observe(big, 12.0)
    assert w.counts("prediction") == brute_counts(prof, [({n: v[-100:] for n, v in big.items()}, 0.0)], "prediction")
    w.observe(sample(rng, 10), 40.0)
    w.expire(now=50.0)  # everything at t=12 is older than 30 s
    assert w.samples == 10
    w.expire(now=100.0)
    assert w.samples == 0
    assert sum(w.counts("confidence")) == 0


def test_window_scores_stay_low_in_distribution_and_rise_on_a_shift():
    prof = reference()
    rng = np.random.default_rng(2)
    w = P.Window(prof, size=1000)
    for _ in range(40):
        w.observe(sample(rng, 25), 0.0)
    calm = w.scores()
    assert max(calm.values()) < 0.1, calm
    for _ in range(40):
        w.observe(sample(rng, 25, shift=1.0), 0.0)
    shifted = w.scores()
    assert shifted["channel0_mean"] > 0.8
    assert shifted["channel1_mean"] > 0.8
    assert shifted["prediction"] < 0.1  # the logits did not move
    assert not math.isnan(sum(shifted.values()))


def test_anomalies_flag_low_confidence_and_inputs_out_of_range():
    prof = reference()
    rng = np.random.default_rng(3)
    normal = sample(rng, 500)
    counts = prof.anomalies(normal)
    assert counts["low_confidence"] < 25
    assert counts["input_out_of_range"] < 10
    weird = sample(rng, 50, shift=5.0)
    weird["confidence"] = np.full(50, prof.signals["confidence"].low / 2)
    assert prof.anomalies(weird) == {"low_confidence": 50, "input_out_of_range": 50, "unknown_tokens": 0}
    text = P.build("text-classification", P.text_features(np.full(100, 12), np.zeros(100)), ["x"])
    assert text.anomalies(P.text_features(np.array([12, 10]), np.array([0, 6])))["unknown_tokens"] == 1
