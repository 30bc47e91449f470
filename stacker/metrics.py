"""Offline metrics: normalized entropy, exact ROC AUC, calibration."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_EPS = 1e-7


def entropy(base_rate: float) -> float:
    b = min(max(base_rate, _EPS), 1 - _EPS)
    return float(-(b * np.log(b) + (1 - b) * np.log(1 - b)))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(y: np.ndarray, p: np.ndarray, base_rate: float) -> float:
    """Logloss divided by the entropy of the (training) base rate (He et al., 2014)."""
    return logloss(y, p) / entropy(base_rate)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact ROC AUC by ranks (ties get their average rank); NaN with one class only."""
    y = np.asarray(y).astype(bool)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    ranks = np.empty(len(p))
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def calibration(y: np.ndarray, p: np.ndarray) -> float:
    """Mean predicted probability / observed rate."""
    observed = float(np.mean(y))
    return float(np.mean(p) / observed) if observed > 0 else float("nan")


def task_metrics(y: np.ndarray, p: np.ndarray, base_rate: float) -> dict:
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    return {"ne": normalized_entropy(y, p, base_rate), "auc": roc_auc(y, p),
            "calibration": calibration(y, p), "positives": int(y.sum())}


def write_json(obj, path) -> Path:
    """Write ``obj`` as strict JSON (NaN and infinities, undefined metrics, as null), making missing parent
    directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False))
    return path


def json_safe(obj):
    """``obj`` with NaN and infinities as None (strict JSON and protobuf's Struct have neither)."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
