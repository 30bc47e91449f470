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
    ``context_tokens`` names the 5 context columns. A block's logit contribution includes what the
    shared token learned for it (user, post, author and the id crosses of the shared tasks).
    """
    sc = ranker.scorer
    leaves, ids, ctx, hidden = f.leaves[sel], f.ids[sel], f.context[sel], f.hidden[sel]
    index, vals, shared_cols = sc.binary_index(ids, ctx)                   # [K, F]
    w = sc.effective(index, shared_cols) * vals[None, :, None]             # [K, F, T]
    names = ["user", "post", "author"] + [f"context:{t}" for t in context_tokens]
    names += [f"{LETTERS[x]}×{LETTERS[y]}" for x, y in sc.interactions]
    blocks = [w[:, j] for j in range(w.shape[1])]
    names.append("leaves")
    blocks.append(sc.values["l"] * sc.leaf_weights(leaves).sum(axis=1, dtype=np.float64))
    names.append("dnn")
    blocks.append(hidden.astype(np.float64) @ sc.dnn_table(hidden.shape[1]))
    names.append("constant")
    blocks.append(np.broadcast_to(sc.bias, (len(leaves), len(sc.bias))))
    c = np.stack(blocks, axis=1)                                       # [K, B, T]
    slope = weights[None, :] * probs * (1.0 - probs)                   # [K, T]
    ev_c = (c * slope[:, None, :]).sum(axis=2)                         # [K, B]
    out = []
    for row in ev_c:
        top = np.argsort(-np.abs(row), kind="stable")[:top_k]
        out.append([(names[b], float(row[b])) for b in top])
    return out
