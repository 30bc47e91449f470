"""Offline simulation: a logged impression stream in the stacker/schema.py table format."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from stacker.schema import (CONTEXT_COLUMNS, KEY_COLUMNS, MEDIA_TYPES, TASKS, label_column,
                            true_column)

from stacker.dataset import read_table, write_table  # noqa: F401  (re-exported)
from .world import DAY_MS, DEVICES, HOUR_MS, SURFACES, USER_FEATURES, World, WorldConfig, DEFAULT_WORLD

__all__ = ["simulate", "get_world", "write_table", "read_table"]

# relative request rate by UTC hour (evening peak, night trough)
_DIURNAL = 0.35 + 0.65 * (0.5 + 0.5 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24.0))


@functools.lru_cache(maxsize=4)
def get_world(config: WorldConfig = DEFAULT_WORLD) -> World:
    """The (cached) world of a config; worlds are deterministic, so sharing one is safe."""
    return World(config)


def _request_times(rng, n: int, start_ms: int, span_ms: float) -> np.ndarray:
    out = []
    need = n
    while need > 0:
        t = rng.uniform(0, span_ms, int(need * 1.8) + 16)
        h = ((t // HOUR_MS) % 24).astype(int)
        keep = t[rng.uniform(size=len(t)) < _DIURNAL[h]]
        out.append(keep[:need])
        need -= len(out[-1])
    return start_ms + np.sort(np.concatenate(out)).astype(np.int64)


def _chunk(world: World, rng, ts, users, dev, surf, sizes):
    """Candidates, ordering and positions for a batch of requests (arrays per impression)."""
    c = world.config
    R = len(ts)
    req = np.repeat(np.arange(R), sizes)
    t = ts[req]
    u = users[req]
    oon_share = np.where(surf[req] == 1, c.oon_share_explore, c.oon_share_home)
    innet = rng.uniform(size=len(req)) >= oon_share
    # in-network: a followed author, then one of its recent posts (biased to the newest)
    nf = world.n_follows[u]
    j = world.follow_indptr[u] + (rng.uniform(size=len(req)) * nf).astype(np.int64)
    a = world.follow_authors[j]
    lo, hi = world.recent_posts_of(a, t, int(c.innet_window_h * HOUR_MS))
    pick = hi - 1 - (rng.uniform(size=len(req)) ** 2 * (hi - lo)).astype(np.int64)
    ok = innet & (hi > lo)
    p = np.full(len(req), -1, dtype=np.int64)
    p[ok] = world._by_author[np.clip(pick[ok], 0, None)]
    # out-of-network (and in-network fallbacks): popular recent posts
    rest = ~ok
    p[rest] = world.sample_oon(t[rest], int(c.oon_window_h * HOUR_MS), rng)
    keep = p >= 0
    req, p = req[keep], p[keep]
    # one impression per (request, post)
    _, first = np.unique(req * (len(world.posts["author"]) + 1) + p, return_index=True)
    first.sort()
    req, p = req[first], p[first]
    # logging policy: a rough ranker (recency, popularity, follow) plus noise
    t = ts[req]
    a = world.posts["author"][p]
    age_h = (t - world.posts["created_at"][p]) / HOUR_MS
    score = (-0.5 * np.log1p(age_h / 6.0) + 0.3 * np.log(world.author_pop[a])
             + 0.5 * world.follows(users[req], a) + rng.gumbel(size=len(req)))
    order = np.lexsort((-score, req))
    req, p = req[order], p[order]
    starts = np.searchsorted(req, np.arange(R))
    pos = (np.arange(len(req)) - starts[req]).astype(np.int32)
    return req, p, pos


def simulate(n_impressions: int, config: WorldConfig = DEFAULT_WORLD, seed: int | None = None,
             progress: bool = False, return_components: bool = False, batch_requests: int = 4000):
    """Simulate ``n_impressions`` logged impressions, sorted by ts, in the stacker/schema.py format.

    Deterministic for (config, seed); ``seed=None`` uses ``config.seed``. With
    ``return_components=True`` returns ``(df, comps)`` where ``comps`` maps each click-logit
    component name (see ``feedsim.world.COMPONENTS``) to a float64 array aligned with the rows,
    plus ``"position"`` (log examine probability).
    """
    world = get_world(config)
    c = config
    rng = np.random.default_rng([c.seed if seed is None else seed, 3])
    mean_size = (c.request_size_min + c.request_size_max) / 2
    n_req = int(np.ceil(n_impressions / mean_size * 1.15)) + 10
    span_ms = n_impressions / c.impressions_per_day * DAY_MS * 1.15
    ts_all = _request_times(rng, n_req, c.start_ms, span_ms)
    world.ensure_posts(int(ts_all[-1]) + 1)
    users_all = rng.choice(c.n_users, n_req, p=world.user_p)
    dev_all, surf_all = world.draw_contexts(users_all, rng)
    sizes_all = rng.integers(c.request_size_min, c.request_size_max + 1, n_req)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_impressions, unit="imp", desc="simulate")
    parts = []
    done = 0
    r0 = 0
    while done < n_impressions:
        if r0 >= n_req:
            raise RuntimeError("ran out of requests; increase the oversampling factor")
        r1 = min(n_req, r0 + batch_requests)
        sl = slice(r0, r1)
        ts, users, dev, surf = ts_all[sl], users_all[sl], dev_all[sl], surf_all[sl]
        req, p, pos = _chunk(world, rng, ts, users, dev, surf, sizes_all[sl])
        take = min(len(req), n_impressions - done)
        req, p, pos = req[:take], p[:take], pos[:take]
        t, u, d, s = ts[req], users[req], dev[req], surf[req]
        comps = world.components(u, p, t, d, s)
        media = world.posts["media"][p]
        probs = world.probabilities(comps, media, pos)
        labels = rng.uniform(size=probs.shape) < probs
        parts.append(dict(req=req + r0, p=p, pos=pos, t=t, u=u, d=d, s=s, media=media,
                          probs=probs, labels=labels,
                          uf=world.user_features(u, t), cf=world.candidate_feature_matrix(u, p, t),
                          comps=comps if return_components else None))
        done += take
        r0 = r1
        if bar is not None:
            bar.update(take)
    if bar is not None:
        bar.close()

    cat = lambda k: np.concatenate([q[k] for q in parts])  # noqa: E731
    req, p, pos, t, u = cat("req"), cat("p"), cat("pos"), cat("t"), cat("u")
    media = cat("media")
    P = world.posts
    cols: dict[str, object] = {
        "ts": t.astype(np.int64),
        "request_id": np.array([f"r{i}" for i in range(r0)], dtype=object)[req],
        "user_id": world.user_ids[u],
        "post_id": world.post_ids[p],
        "author_id": world.author_ids[P["author"][p]],
        "position": pos.astype(np.int32),
        "media_type": np.array(MEDIA_TYPES, dtype=object)[media],
        "created_at": P["created_at"][p].astype(np.int64),
        "ctx.device": np.array(DEVICES, dtype=object)[cat("d")],
        "ctx.surface": np.array(SURFACES, dtype=object)[cat("s")],
    }
    for name in USER_FEATURES:
        cols["f." + name] = np.concatenate([q["uf"][name] for q in parts]).astype(np.float32)
    cf = np.concatenate([q["cf"] for q in parts])
    for i, name in enumerate(world.candidate_features):
        cols["f." + name] = cf[:, i]
    labels, probs = cat("labels"), cat("probs")
    for i, task in enumerate(TASKS):
        cols[label_column(task)] = labels[:, i].astype(np.int8)
    for i, task in enumerate(TASKS):
        cols[true_column(task)] = probs[:, i].astype(np.float32)
    df = pd.DataFrame(cols)
    assert list(df.columns[:len(KEY_COLUMNS) + 2]) == [*KEY_COLUMNS, *CONTEXT_COLUMNS]
    if not return_components:
        return df
    comps = {k: np.concatenate([q["comps"][k] for q in parts]) for k in parts[0]["comps"]}
    comps["position"] = np.log(world.examine_prob(pos))
    return df, comps
