"""Progressive metrics checked against sklearn."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from online.progressive import ProgressiveMetrics, entropy, roc_auc


def stream(seed: int, n: int):
    rng = np.random.default_rng(seed)
    p = np.clip(np.round(rng.beta(1, 15, n), 3), 1e-3, 1 - 1e-3)  # rounding creates ties for AUC
    y = (rng.random(n) < p).astype(int)
    return y, p


def test_auc_matches_sklearn_with_ties():
    y, p = stream(0, 20_000)
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert math.isnan(roc_auc(np.zeros(5), np.arange(5.0)))


def test_overall_and_recent_match_sklearn():
    y, p = stream(1, 30_000)
    m = ProgressiveMetrics(("click", "like"), recent=5_000)
    for i in range(0, y.size, 777):  # uneven batches
        m.update("click", y[i:i + 777], p[i:i + 777])
    got = m.get()["click"]
    base = y.mean()
    o, r = got["overall"], got["recent"]
    assert o["count"] == y.size and o["positives"] == y.sum()
    assert o["ne"] == pytest.approx(log_loss(y, p) / entropy(base), rel=1e-9)
    assert o["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert o["calibration"] == pytest.approx(p.mean() / y.mean())
    yr, pr = y[-5_000:], p[-5_000:]
    assert r["count"] == 5_000
    assert r["ne"] == pytest.approx(log_loss(yr, pr, labels=[0, 1]) / entropy(base), rel=1e-9)
    assert r["auc"] == pytest.approx(roc_auc_score(yr, pr), abs=1e-12)
    assert m.get()["like"]["overall"]["count"] == 0


def test_training_base_rate_is_used_for_ne():
    y, p = stream(2, 2_000)
    m = ProgressiveMetrics(("click",), base_rates={"click": 0.2})
    m.update("click", y, p)
    assert m.get()["click"]["overall"]["ne"] == pytest.approx(log_loss(y, p) / entropy(0.2), rel=1e-9)


def test_drift_detected_when_the_loss_jumps():
    rng = np.random.default_rng(3)
    m = ProgressiveMetrics(("click",))
    p = np.full(4_000, 0.05)
    m.update("click", (rng.random(4_000) < 0.05).astype(int), p)
    assert m.get()["click"]["drift"]["detections"] == 0
    m.update("click", (rng.random(4_000) < 0.5).astype(int), p)  # the world changed, the model did not
    d = m.get()["click"]["drift"]
    assert d["detections"] >= 1 and d["last_at"] >= 4_000 and d["in_last_update"]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="'click'"):
        ProgressiveMetrics(("click",)).update("click", np.zeros(3), np.zeros(4))


def test_doctests():
    import doctest

    import online.progressive

    assert doctest.testmod(online.progressive).failed == 0


def test_ne_is_undefined_while_only_one_outcome_has_been_seen():
    """Early positives are learned before any window closes: with only positives so far, the base rate's
    entropy is 0 and NE would be astronomically large; it is NaN (not yet defined) until a negative comes."""
    m = ProgressiveMetrics(("click",))
    m.update("click", np.ones(150), np.full(150, 0.4))
    overall = m.get()["click"]["overall"]
    assert math.isnan(overall["ne"]) and overall["positives"] == 150 and overall["logloss"] > 0
    m.update("click", np.zeros(850), np.full(850, 0.1))
    assert 0 < m.get()["click"]["overall"]["ne"] < 2


def test_overall_auc_from_score_bins_is_within_1e4_of_exact_and_memory_stays_flat():
    rng = np.random.default_rng(4)
    z = rng.normal(-3, 1.2, 400_000)                      # continuous scores, like a model's
    p = 1 / (1 + np.exp(-z))
    y = rng.random(z.size) < 1 / (1 + np.exp(-(z + rng.normal(0, 1, z.size))))
    m = ProgressiveMetrics(("click",), recent=5_000)
    for i in range(0, y.size, 10_000):
        m.update("click", y[i:i + 10_000], p[i:i + 10_000])
    got = m.get()["click"]
    assert got["overall"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert got["overall"]["count"] == y.size and got["recent"]["count"] == 5_000
    assert got["recent"]["auc"] == pytest.approx(roc_auc_score(y[-5_000:], p[-5_000:]), abs=1e-12)
    t = m._t["click"]
    assert t.y.size == t.p.size == 5_000                   # the recent ring, not every example


def test_save_and_load_carry_every_figure_across_a_restart(tmp_path):
    y, p = stream(5, 30_000)
    m = ProgressiveMetrics(("click", "like"), recent=4_000)
    for i in range(0, 20_000, 1_000):
        m.update("click", y[i:i + 1_000], p[i:i + 1_000])
    m.save(tmp_path / "m.npz")
    again = ProgressiveMetrics(("click", "like"), recent=4_000)
    again.load(tmp_path / "m.npz")
    assert json_equal(again.get(), m.get())
    for part in (m, again):                                # and both go on alike
        part.update("click", y[20_000:], p[20_000:])
    assert json_equal(again.get(), m.get())
    assert again.get()["click"]["overall"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def json_equal(a, b) -> bool:
    import json
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_a_prediction_that_is_not_a_number_is_counted_and_left_out():
    y, p = stream(6, 1_000)
    bad = p.copy()
    bad[10] = np.nan
    m = ProgressiveMetrics(("click",))
    m.update("click", y, bad)
    got = m.get()["click"]
    assert got["not_finite"] == 1 and got["overall"]["count"] == 999
    keep = np.arange(1_000) != 10
    assert got["overall"]["ne"] == pytest.approx(log_loss(y[keep], p[keep]) / entropy(y[keep].mean()), rel=1e-9)
