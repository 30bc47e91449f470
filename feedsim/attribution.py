"""What a model recovers of each part of the simulated world's logit.

On simulated data every impression's true logit is a sum of known components
(:data:`feedsim.world.COMPONENTS`, plus ``position``, the log of the examination probability).
Regressing a model's logit on those components, and the true logit on the same components, gives
per component the slope the model reaches (m_c) against the slope the world has (a_c): their ratio is
the share of that component's effect the model recovers (1: all of it, 0: none; the link's curvature
is divided out because the true logit is regressed the same way).

The gap g between the true and the model's logit splits exactly into parts: g = sum_c (a_c - m_c) c
+ r_true - r_model, where r_true is what the true logit holds beyond a linear sum of components (media
main effects, the examination curve) and r_model the model's own variation no component explains
(what it reads from the features' own noise, and estimation error). var(g) is the sum of each part's
covariance with g: a missed component adds (a_c - m_c) cov(g, c), about (a_c - m_c)^2 var(c) where
components are uncorrelated; ``other`` adds var(r_true) and ``noise`` var(r_model), each less
cov(r_true, r_model). A part correlated against the rest of the gap can come out slightly negative.
"""
from __future__ import annotations

import numpy as np

from .world import COMPONENTS

PARTS = (*COMPONENTS, "position")
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def recovery(p_true: np.ndarray, p_model: np.ndarray, comps: dict, min_share: float = 0.005) -> dict:
    """Per component of one task's logit: the share of its effect ``p_model`` recovers, and how the
    variance of the gap to the true logit splits.

    ``comps`` maps every name of :data:`PARTS` to one value per row. Returns ``{"recovered":
    {part: share or None}, "missed_variance": {part: float}, "other": float, "noise": float,
    "gap_variance": float}``, where the missed variances, ``other`` (r_true) and ``noise`` (r_model)
    sum to ``gap_variance``. A share is None where the part is too small a piece of this task's true
    logit to say (its a_c^2 var(c) under ``min_share`` of the logit's variance, such as drift over a
    few days, or a component the task gives no weight): a ratio of two slopes near zero is noise.
    """
    missing = [k for k in PARTS if k not in comps]
    if missing:
        raise ValueError(f"components missing: {', '.join(missing)}")
    C = np.column_stack([np.asarray(comps[k], np.float64) for k in PARTS])
    if len(C) != len(p_true) or len(C) != len(p_model):
        raise ValueError(f"{len(C)} component rows for {len(p_true)} true and {len(p_model)} model probabilities")
    C = C - C.mean(axis=0)
    X = np.column_stack([np.ones(len(C)), C])
    z_true, z_model = _logit(p_true), _logit(p_model)
    world, *_ = np.linalg.lstsq(X, z_true, rcond=None)
    model, *_ = np.linalg.lstsq(X, z_model, rcond=None)
    r_true, r_model = z_true - X @ world, z_model - X @ model
    gap = z_true - z_model
    gap = gap - gap.mean()
    cov = lambda x: float(np.dot(gap, x) / len(gap))  # noqa: E731
    var = C.var(axis=0)
    recovered, missed = {}, {}
    for j, name in enumerate(PARTS):
        a, m = world[j + 1], model[j + 1]
        recovered[name] = float(m / a) if a * a * var[j] >= min_share * z_true.var() else None
        missed[name] = float((a - m) * cov(C[:, j]))
    return {"recovered": recovered, "missed_variance": missed, "other": cov(r_true), "noise": cov(-r_model),
            "gap_variance": float(np.var(gap))}


def report_recovery(predictions: dict, p_true: np.ndarray, comps: dict, tasks, variants) -> dict:
    """:func:`recovery` for every variant and task: ``{variant: {task: recovery}}``."""
    return {v: {t: recovery(p_true[:, k], predictions[v][:, k], comps) for k, t in enumerate(tasks)}
            for v in variants}
