"""Progressive validation: score each example with the current model, update the metric, then learn.

Per task, over everything seen (``overall``) and over the last ``recent`` examples: normalized entropy
NE = logloss / entropy of the base rate (He et al. 2014; the training base rate when given, else the
running observed rate), ROC AUC, calibration = mean predicted / observed rate. Memory and time per
call stay constant however long the learner runs: ``overall`` keeps running sums (count, positives,
logloss, predictions: exact) and, for its AUC, counts of positives and negatives in 16,384 bins of
the score's logit over [-16, 16] (pairs in one bin count as ties: within 1e-4 of the exact AUC on
the simulated feed); ``recent`` keeps the last examples themselves, and its AUC is exact (ranks, ties
averaged). :meth:`ProgressiveMetrics.save` and :meth:`~ProgressiveMetrics.load` carry it all across a
learner's restart (the checkpoint holds it). A river ADWIN detector per task watches the per-example
logloss (its window starts afresh on a restart; the detections so far are kept).

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
    if not y.size:
        return _figures(0, 0, 0.0, 0.0, float("nan"), base_rate)
    pc = np.clip(p, _EPS, 1 - _EPS)
    loss = float(-np.sum(np.where(y, np.log(pc), np.log1p(-pc))))
    return _figures(int(y.size), int(y.sum()), loss, float(p.sum()), roc_auc(y, p), base_rate)


def _figures(count: int, positives: int, loss: float, predicted: float, auc: float,
             base_rate: float | None) -> dict[str, float]:
    """The reported figures from a slice's sums (its summed logloss and predictions) and AUC."""
    if count == 0:
        return {"count": 0, "positives": 0, "logloss": float("nan"), "ne": float("nan"),
                "auc": float("nan"), "calibration": float("nan")}
    logloss = loss / count
    rate = positives / count if base_rate is None else base_rate
    # NE needs a base rate strictly between 0 and 1: while only one outcome has been seen (early
    # positives are learned before the negatives' windows close) it is not defined yet.
    ne = logloss / entropy(rate) if 0 < rate < 1 else float("nan")
    return {"count": count, "positives": positives, "logloss": logloss, "ne": ne, "auc": auc,
            "calibration": predicted / positives if positives else float("nan")}


AUC_BINS, LOGIT_SPAN = 16_384, 16.0


def score_bins(p: np.ndarray) -> np.ndarray:
    """The AUC bin of each probability: its logit over [-LOGIT_SPAN, LOGIT_SPAN] in AUC_BINS equal bins."""
    pc = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    z = np.log(pc) - np.log1p(-pc)
    return np.clip(((z + LOGIT_SPAN) * (AUC_BINS / (2 * LOGIT_SPAN))).astype(np.int64), 0, AUC_BINS - 1)


def binned_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from per-bin counts of positives and negatives (bins in score order; pairs sharing a bin
    count half); NaN when one class is missing."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos.astype(np.float64) @ below + 0.5 * (pos.astype(np.float64) @ neg)) / (n_pos * n_neg))


class _Task:
    """One task's running sums, AUC bins and ring of recent examples."""

    def __init__(self, recent: int) -> None:
        self.count = self.positives = 0
        self.loss = self.predicted = 0.0
        self.pos = np.zeros(AUC_BINS, np.int64)
        self.neg = np.zeros(AUC_BINS, np.int64)
        self.y = np.zeros(recent, bool)
        self.p = np.zeros(recent, np.float64)
        self.filled = 0   # examples in the ring
        self.at = 0       # where the next one goes

    def extend(self, y: np.ndarray, p: np.ndarray, losses: np.ndarray) -> None:
        self.count += int(y.size)
        self.positives += int(y.sum())
        self.loss += float(losses.sum())
        self.predicted += float(p.sum())
        b = score_bins(p)
        self.pos += np.bincount(b[y], minlength=AUC_BINS)
        self.neg += np.bincount(b[~y], minlength=AUC_BINS)
        cap = self.y.size
        if y.size >= cap:
            self.y[:], self.p[:] = y[-cap:], p[-cap:]
            self.filled, self.at = cap, 0
            return
        idx = (self.at + np.arange(y.size)) % cap
        self.y[idx], self.p[idx] = y, p
        self.at = int((self.at + y.size) % cap)
        self.filled = min(cap, self.filled + int(y.size))

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        """The ring's examples, oldest first."""
        if self.filled < self.y.size:
            return self.y[:self.filled], self.p[:self.filled]
        return np.r_[self.y[self.at:], self.y[:self.at]], np.r_[self.p[self.at:], self.p[:self.at]]


def _overall(t: _Task, base_rate: float | None) -> dict[str, float]:
    return _figures(t.count, t.positives, t.loss, t.predicted, binned_auc(t.pos, t.neg), base_rate)


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
        self._t = {t: _Task(recent) for t in self.tasks}
        self._detectors = {t: drift.ADWIN() for t in self.tasks}
        self.drift = {t: {"detections": 0, "last_at": None, "in_last_update": False} for t in self.tasks}
        self.not_finite = dict.fromkeys(self.tasks, 0)   # predictions left out for not being numbers

    def update(self, task: str, y_true: np.ndarray, p: np.ndarray) -> None:
        """Record a batch of labels and the probabilities the model gave before learning them."""
        y = np.asarray(y_true).astype(bool, copy=False).ravel()
        p = np.asarray(p, dtype=np.float64).ravel()
        if y.shape != p.shape:
            raise ValueError(f"y_true and p differ in length for task {task!r}: {y.size} vs {p.size}")
        finite = np.isfinite(p)
        if not finite.all():   # one NaN would spoil the running sums for good: counted, left out
            self.not_finite[task] += int((~finite).sum())
            y, p = y[finite], p[finite]
        t = self._t[task]
        start = t.count
        pc = np.clip(p, _EPS, 1 - _EPS)
        losses = np.where(y, -np.log(pc), -np.log1p(-pc))
        t.extend(y, p, losses)
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
        for name, t in self._t.items():
            # Both slices share one base rate so that their NEs are comparable.
            base = self.base_rates.get(name, t.positives / t.count if t.count else None)
            y, p = t.recent()
            out[name] = {"overall": _overall(t, base), "recent": summarize(y, p, base),
                         "drift": dict(self.drift[name]), "not_finite": self.not_finite[name]}
        return out

    def save(self, path) -> None:
        """Write every task's sums, bins, recent examples and drift counts to ``path`` (.npz)."""
        arrays = {}
        for name, t in self._t.items():
            y, p = t.recent()
            d = self.drift[name]
            arrays.update({f"{name}/ints": np.array([t.count, t.positives, d["detections"],
                                                      -1 if d["last_at"] is None else d["last_at"]], np.int64),
                           f"{name}/sums": np.array([t.loss, t.predicted]), f"{name}/pos": t.pos,
                           f"{name}/neg": t.neg, f"{name}/y": y, f"{name}/p": p})
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    def load(self, path) -> None:
        """Go on from what :meth:`save` wrote (tasks it does not hold start empty)."""
        with np.load(path) as z:
            for name, t in self._t.items():
                if f"{name}/ints" not in z.files:
                    continue
                count, positives, detections, last_at = (int(v) for v in z[f"{name}/ints"])
                t.count, t.positives = count, positives
                t.loss, t.predicted = (float(v) for v in z[f"{name}/sums"])
                t.pos[:], t.neg[:] = z[f"{name}/pos"], z[f"{name}/neg"]
                y, p = z[f"{name}/y"][-self.recent:], z[f"{name}/p"][-self.recent:]
                t.filled, t.at = len(y), len(y) % self.recent
                t.y[:len(y)], t.p[:len(y)] = y, p
                self.drift[name].update(detections=detections, last_at=None if last_at < 0 else last_at)
