"""Re-ranking after EV: drop seen posts, penalise repetition, boost freshness (all from settings)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RerankPolicy:
    author_mult: float = 0.8
    author_add: float = 0.0
    media_mult: float = 0.95
    media_add: float = 0.0
    freshness_boost: float = 0.0
    freshness_half_life_h: float = 6.0


def _penalise(score: np.ndarray, mult: float, add: float) -> np.ndarray:
    # Shrinks towards lower values for negative scores too (x * mult would raise a negative EV).
    return score - np.abs(score) * (1.0 - mult) - add


def rerank(ev: np.ndarray, authors: np.ndarray, media: np.ndarray, age_h: np.ndarray, keep: np.ndarray,
           limit: int, policy: RerankPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Greedy re-rank: at each position take the best score given the post placed just above.

    ``authors`` are integer codes; ``keep`` masks candidates still eligible (not seen).
    Returns the chosen candidate indices (best first) and their final scores.
    """
    base = ev.astype(np.float64)
    if policy.freshness_boost:
        base = base + policy.freshness_boost * np.exp2(-np.maximum(age_h, 0.0) / policy.freshness_half_life_h)
    limit = min(limit, int(keep.sum()))
    if policy.author_mult <= 1 and policy.media_mult <= 1 and policy.author_add >= 0 and policy.media_add >= 0:
        return _rerank_sorted(base, authors, media, keep, limit, policy)
    score = np.where(keep, base, -np.inf)
    order = np.empty(limit, np.int64)
    final = np.empty(limit, np.float64)
    if limit == 0:
        return order, final
    first = int(np.argmax(score))
    order[0], final[0] = first, score[first]
    score[first] = -np.inf
    for k in range(1, limit):
        prev = order[k - 1]
        adj = score
        alive = score > -np.inf  # -inf marks taken/seen posts; penalising it could give NaN
        same_author = (authors == authors[prev]) & alive
        same_media = (media == media[prev]) & alive
        if same_author.any() or same_media.any():
            adj = score.copy()
            adj[same_author] = _penalise(adj[same_author], policy.author_mult, policy.author_add)
            adj[same_media] = _penalise(adj[same_media], policy.media_mult, policy.media_add)
        best = int(np.argmax(adj))
        order[k], final[k] = best, adj[best]
        score[best] = -np.inf
    return order, final


def _rerank_sorted(base, authors, media, keep, limit, policy) -> tuple[np.ndarray, np.ndarray]:
    """The same greedy choice, walking candidates in score order: penalties only lower a score, so
    the walk stops at the first candidate whose unpenalised score cannot beat the best found."""
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(-base[idx], kind="stable")]
    pool = idx.tolist()
    scores, auth, med = base.tolist(), authors.tolist(), np.asarray(media).tolist()
    order, final = [], []
    prev_a = prev_m = None
    for _ in range(limit):
        best_pos, best = -1, -np.inf
        for pos, i in enumerate(pool):
            s = scores[i]
            if s <= best:
                break
            if auth[i] == prev_a:
                s = s - abs(s) * (1.0 - policy.author_mult) - policy.author_add
            if med[i] == prev_m:
                s = s - abs(s) * (1.0 - policy.media_mult) - policy.media_add
            if s > best:
                best_pos, best = pos, s
        i = pool.pop(best_pos)
        order.append(i)
        final.append(best)
        prev_a, prev_m = auth[i], med[i]
    return np.array(order, np.int64), np.array(final, np.float64)
