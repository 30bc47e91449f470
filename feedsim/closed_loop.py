"""Closed-loop mode: simulated users request feeds, look at the top of what a ranker returns and
engage by the true probabilities (the same model as the offline simulation) — an A/B test in a box.

    users = FeedUsers(World(DEFAULT_WORLD), seed=1)
    req = users.next_request(now_ms)
    ranked = my_ranker(req)                   # list of post ids, best first
    out = users.engage(req, ranked)           # labels per shown post + expected/realised sums
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from stacker.schema import MEDIA_TYPES, TASKS

from .world import DEVICES, HOUR_MS, SURFACES, USER_FEATURES, World


@dataclass
class FeedRequest:
    request_id: str
    user_id: str
    ts: int                                   # ms UTC
    device: str
    surface: str
    user_features: dict[str, float]           # names without the "f." prefix, e.g. "user.activity"
    post_ids: np.ndarray                      # [N] str
    author_ids: np.ndarray                    # [N] str
    created_at: np.ndarray                    # [N] int64 ms UTC
    media_types: np.ndarray                   # [N] str
    feature_names: list[str]                  # candidate-level, without the "f." prefix
    features: np.ndarray                      # [N, F] float32
    n_show: int                               # how many of the top ranked posts the user is shown
    _user: int = field(default=0, repr=False)
    _posts: np.ndarray = field(default=None, repr=False)
    _device: int = field(default=0, repr=False)
    _surface: int = field(default=0, repr=False)

    def __len__(self) -> int:
        return len(self.post_ids)

    @property
    def candidates(self) -> list[dict]:
        """The candidates as a list of dicts (post_id, author_id, created_at, media_type, features)."""
        return [
            {"post_id": self.post_ids[i], "author_id": self.author_ids[i],
             "created_at": int(self.created_at[i]), "media_type": self.media_types[i],
             "features": dict(zip(self.feature_names, self.features[i].tolist()))}
            for i in range(len(self.post_ids))
        ]


class FeedUsers:
    """Simulated users of a :class:`World` issuing feed requests and engaging with ranked feeds."""

    def __init__(self, world: World, seed: int = 0, min_candidates: int = 200, max_candidates: int = 500):
        self.world = world
        self.rng = np.random.default_rng([world.config.seed, 4, seed])
        self.min_candidates = min_candidates
        self.max_candidates = max_candidates
        self._ids = itertools.count()
        self._seed = seed

    def next_request(self, now_ms: int) -> FeedRequest:
        w, c, rng = self.world, self.world.config, self.rng
        now_ms = int(now_ms)
        w.ensure_posts(now_ms + 1)
        u = int(rng.choice(c.n_users, p=w.user_p))
        dev, surf = w.draw_contexts(np.array([u]), rng)
        n_cand = int(rng.integers(self.min_candidates, self.max_candidates + 1))
        # in-network: every recent post of the followed authors
        fa = w.follow_authors[w.follow_indptr[u]:w.follow_indptr[u + 1]]
        lo, hi = w.recent_posts_of(fa, np.full(len(fa), now_ms), int(c.innet_window_h * HOUR_MS))
        innet = w._by_author[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]).astype(np.int64)]
        oon_share = c.oon_share_explore if surf[0] == 1 else c.oon_share_home
        n_in = min(len(innet), int(round(n_cand * (1 - oon_share))))
        if len(innet) > n_in:
            innet = rng.choice(innet, n_in, replace=False)
        # out-of-network: popular recent posts
        oon = w.sample_oon(np.full(3 * n_cand, now_ms), int(c.oon_window_h * HOUR_MS), rng)
        oon = oon[oon >= 0]
        oon = oon[~np.isin(oon, innet)]
        _, first = np.unique(oon, return_index=True)
        oon = oon[np.sort(first)][:max(0, n_cand - len(innet))]
        posts = np.concatenate([innet, oon]).astype(np.int64)
        posts = posts[rng.permutation(len(posts))]
        users = np.full(len(posts), u)
        ts = np.full(len(posts), now_ms, dtype=np.int64)
        uf = w.user_features(np.array([u]), np.array([now_ms]))
        return FeedRequest(
            request_id=f"q{self._seed}-{next(self._ids)}",
            user_id=w.user_ids[u], ts=now_ms, device=DEVICES[dev[0]], surface=SURFACES[surf[0]],
            user_features={k: float(uf[k][0]) for k in USER_FEATURES},
            post_ids=w.post_ids[posts], author_ids=w.author_ids[w.posts["author"][posts]],
            created_at=w.posts["created_at"][posts].copy(),
            media_types=np.array(MEDIA_TYPES, dtype=object)[w.posts["media"][posts]],
            feature_names=list(w.candidate_features),
            features=w.candidate_feature_matrix(users, posts, ts),
            n_show=int(rng.integers(c.request_size_min, c.request_size_max + 1)),
            _user=u, _posts=posts, _device=int(dev[0]), _surface=int(surf[0]),
        )

    def true_probabilities(self, request: FeedRequest, positions=None) -> np.ndarray:
        """True P(label) [N, T] of every candidate if shown at ``positions`` (default: position 0)."""
        w = self.world
        p = request._posts
        n = len(p)
        comps = w.components(np.full(n, request._user), p, np.full(n, request.ts, dtype=np.int64),
                             np.full(n, request._device), np.full(n, request._surface))
        pos = np.zeros(n) if positions is None else np.asarray(positions)
        return w.probabilities(comps, w.posts["media"][p], pos)

    def engage(self, request: FeedRequest, ranked_post_ids) -> dict:
        """Show the top ``request.n_show`` of ``ranked_post_ids`` (ids not among the candidates are
        refused) and draw engagements by the true probabilities (with position bias).

        Returns ``{"request_id", "user_id", "n_shown", "post_ids" [S], "positions" [S],
        "labels": {task: int8[S]}, "true": {task: float[S]}, "expected": {task: float},
        "realised": {task: int}, "shown": [per-post dicts]}`` where ``expected`` sums the true
        probabilities of the shown posts and ``realised`` counts the drawn engagements.
        """
        index = {pid: i for i, pid in enumerate(request.post_ids)}
        ranked = list(ranked_post_ids)[:request.n_show]
        unknown = [pid for pid in ranked if pid not in index]
        if unknown:
            raise ValueError(f"ranked ids not among the request's candidates: {unknown[:5]}")
        if len(set(ranked)) != len(ranked):
            raise ValueError("ranked post ids contain duplicates")
        sel = np.array([index[pid] for pid in ranked], dtype=np.int64)
        w = self.world
        p = request._posts[sel]
        S = len(p)
        pos = np.arange(S)
        comps = w.components(np.full(S, request._user), p, np.full(S, request.ts, dtype=np.int64),
                             np.full(S, request._device), np.full(S, request._surface))
        probs = w.probabilities(comps, w.posts["media"][p], pos)
        labels = (self.rng.uniform(size=probs.shape) < probs).astype(np.int8)
        post_ids = request.post_ids[sel]
        return {
            "request_id": request.request_id,
            "user_id": request.user_id,
            "n_shown": S,
            "post_ids": post_ids,
            "positions": pos.astype(np.int32),
            "labels": {t: labels[:, i] for i, t in enumerate(TASKS)},
            "true": {t: probs[:, i] for i, t in enumerate(TASKS)},
            "expected": {t: float(probs[:, i].sum()) for i, t in enumerate(TASKS)},
            "realised": {t: int(labels[:, i].sum()) for i, t in enumerate(TASKS)},
            "shown": [{"post_id": post_ids[k], "position": k,
                       "labels": {t: int(labels[k, i]) for i, t in enumerate(TASKS)},
                       "true": {t: float(probs[k, i]) for i, t in enumerate(TASKS)}} for k in range(S)],
        }
