"""Progressive validation: score each example with the current model, update the metric, then learn.

Metrics are exact, per task, over everything seen (``overall``) and over the last ``recent`` examples:
normalized entropy NE = logloss / entropy of the base rate (He et al. 2014; the training base rate when
given, else the running observed rate), ROC AUC from ranks (ties averaged), calibration =
mean predicted / observed rate. Scores are kept in growing numpy buffers, fine up to tens of millions.
A river ADWIN detector per task watches the per-example logloss.

>>> import numpy as np
>>> m = ProgressiveMetrics(("click",))
>>> m.update("click", np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.4, 0.3]))
>>> r = m.get()["click"]["overall"]
>>> r["count"], r["positives"], r["auc"]
(4, 2, 0.75)
"""
from __future__ import annotations

import numpy as np
from river import drift

_EPS = 1e-15


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN when one class is missing."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = np.asarray(p)[order]
    # Average rank per run of tied scores: runs start where the sorted score changes.
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ends = np.r_[starts[1:], ps.size]
    avg = (starts + ends + 1) / 2.0  # 1-based ranks starts+1..ends averaged
    ranks = np.repeat(avg, ends - starts)
    rank_pos = ranks[y[order]].sum()
    return float((rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def entropy(rate: float) -> float:
    r = min(max(rate, _EPS), 1 - _EPS)
    return float(-(r * np.log(r) + (1 - r) * np.log(1 - r)))


def summarize(y: np.ndarray, p: np.ndarray, base_rate: float | None = None) -> dict[str, float]:
    """NE, logloss, AUC, calibration, count and positives of one slice."""
    n = int(y.size)
    if n == 0:
        return {"count": 0, "positives": 0, "logloss": float("nan"), "ne": float("nan"),
                "auc": float("nan"), "calibration": float("nan")}
    pc = np.clip(p, _EPS, 1 - _EPS)
    logloss = float(-np.mean(np.where(y, np.log(pc), np.log1p(-pc))))
    pos = int(y.sum())
    rate = pos / n if base_rate is None else base_rate
    # NE needs a base rate strictly between 0 and 1: while only one outcome has been seen (early
    # positives are learned before the negatives' windows close) it is not defined yet.
    ne = logloss / entropy(rate) if 0 < rate < 1 else float("nan")
    return {"count": n, "positives": pos, "logloss": logloss, "ne": ne,
            "auc": roc_auc(y, p), "calibration": float(p.sum() / pos) if pos else float("nan")}


class _Buffer:
    """Growing arrays of labels and scores (capacity doubles)."""

    def __init__(self) -> None:
        self.y = np.empty(1024, dtype=bool)
        self.p = np.empty(1024, dtype=np.float64)
        self.n = 0

    def extend(self, y: np.ndarray, p: np.ndarray) -> None:
        need = self.n + y.size
        if need > self.y.size:
            cap = max(need, 2 * self.y.size)
            self.y = np.resize(self.y, cap)
            self.p = np.resize(self.p, cap)
        self.y[self.n:need] = y
        self.p[self.n:need] = p
        self.n = need


class ProgressiveMetrics:
    """Per-task progressive-validation metrics; call :meth:`update` *before* learning the batch.

    Parameters
    ----------
    tasks : task names.
    recent : size of the trailing window reported as ``recent``.
    base_rates : training base rate per task for NE; missing tasks use the observed rate.
    """

    def __init__(self, tasks: tuple[str, ...], recent: int = 10_000, base_rates: dict[str, float] | None = None):
        self.tasks = tuple(tasks)
        self.recent = recent
        self.base_rates = dict(base_rates or {})
        self._buf = {t: _Buffer() for t in self.tasks}
        self._detectors = {t: drift.ADWIN() for t in self.tasks}
        self.drift = {t: {"detections": 0, "last_at": None, "in_last_update": False} for t in self.tasks}

    def update(self, task: str, y_true: np.ndarray, p: np.ndarray) -> None:
        """Record a batch of labels and the probabilities the model gave before learning them."""
        y = np.asarray(y_true).astype(bool, copy=False).ravel()
        p = np.asarray(p, dtype=np.float64).ravel()
        if y.shape != p.shape:
            raise ValueError(f"y_true and p differ in length for task {task!r}: {y.size} vs {p.size}")
        buf = self._buf[task]
        start = buf.n
        buf.extend(y, p)
        pc = np.clip(p, _EPS, 1 - _EPS)
        losses = np.where(y, -np.log(pc), -np.log1p(-pc))
        det, state = self._detectors[task], self.drift[task]
        state["in_last_update"] = False
        for i, loss in enumerate(losses.tolist()):
            det.update(loss)
            if det.drift_detected:
                state["detections"] += 1
                state["last_at"] = start + i
                state["in_last_update"] = True

    def get(self) -> dict[str, dict]:
        """``{task: {"overall": {...}, "recent": {...}, "drift": {...}}}``."""
        out = {}
        for t, buf in self._buf.items():
            y, p = buf.y[:buf.n], buf.p[:buf.n]
            # Both slices share one base rate so that their NEs are comparable.
            base = self.base_rates.get(t, float(y.mean()) if buf.n else None)
            out[t] = {"overall": summarize(y, p, base),
                      "recent": summarize(y[-self.recent:], p[-self.recent:], base),
                      "drift": dict(self.drift[t])}
        return out
