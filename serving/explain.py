"""Explain a post's score: logit contributions of each feature block, weighted into the EV.

The sparse LR's logit for task t is a sum over active features; grouping them gives per-block
contributions c[b, t] (leaves, dnn, user, post, author, each context token, each id cross, constant).
The EV Σ_t w_t·σ(z_t) is linearised at the served probabilities: block b contributes
Σ_t w_t·p_t·(1 − p_t)·c[b, t].
"""
from __future__ import annotations

import numpy as np

from stacker.ranker import StackFeatures, StackedRanker

LETTERS = {"l": "leaves", "d": "dnn", "u": "user", "p": "post", "a": "author", "c": "context"}


def contributions(ranker: StackedRanker, f: StackFeatures, sel: np.ndarray, probs: np.ndarray,
                  weights: np.ndarray, context_tokens: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    """Top ``top_k`` (name, EV contribution) per selected candidate, largest magnitude first.

    ``probs`` [K, T] and ``weights`` [T] are the selected rows' probabilities and EV weights;
    ``context_tokens`` names the 5 context columns.
    """
    sc = ranker.scorer
    leaves, ids, ctx, hidden = f.leaves[sel], f.ids[sel], f.context[sel], f.hidden[sel]
    rows = sc.binary_indices(leaves, ids, ctx)                         # [K, F]
    w = sc.weights[rows].astype(np.float64)                            # [K, F, T]
    values = sc.binary_values(leaves.shape[1], ctx.shape[1])           # each feature's value, or None
    if values is not None:
        w *= values[None, :, None]
    n_leaves = leaves.shape[1]
    names = ["leaves", "user", "post", "author"] + [f"context:{t}" for t in context_tokens]
    blocks = [w[:, :n_leaves].sum(axis=1), w[:, n_leaves], w[:, n_leaves + 1], w[:, n_leaves + 2]]
    blocks += [w[:, n_leaves + 3 + j] for j in range(ctx.shape[1])]
    col = n_leaves + 3 + ctx.shape[1]
    widths = {"l": leaves.shape[1], "u": 1, "p": 1, "a": 1, "c": ctx.shape[1]}
    for x, y in sc.interactions:
        width = widths[x] * widths[y]
        names.append(f"{LETTERS[x]}×{LETTERS[y]}")
        blocks.append(w[:, col:col + width].sum(axis=1))
        col += width
    names.append("constant")
    blocks.append(w[:, col])
    dnn_w = sc.weights[sc.dnn_indices(hidden.shape[1])].astype(np.float64)  # [H, T]
    names.append("dnn")
    blocks.append(hidden.astype(np.float64) @ dnn_w)
    c = np.stack(blocks, axis=1)                                       # [K, B, T]
    slope = weights[None, :] * probs * (1.0 - probs)                   # [K, T]
    ev_c = (c * slope[:, None, :]).sum(axis=2)                         # [K, B]
    out = []
    for row in ev_c:
        top = np.argsort(-np.abs(row), kind="stable")[:top_k]
        out.append([(names[b], float(row[b])) for b in top])
    return out
