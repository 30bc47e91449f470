"""A synthetic social network whose engagement probabilities are known exactly.

The world holds users (drifting topic interests, activity), authors (heavy-tailed popularity, topic
mix, new ones keep appearing), a follower graph, and a post store that is generated lazily, one
day at a time, deterministically from the seed (so the offline simulator and the closed-loop users
see the same posts).

The probability model (:meth:`World.components`, :meth:`World.probabilities`) is shared by
``feedsim.simulate`` and ``feedsim.closed_loop``:

    logit_t  = bias_t + media_t[media] + sum_c W[t, c] * component_c         (given examined)
    P(label_t = 1) = examine(position) * sigmoid(logit_t)

with components (in click-logit units, W[click, :] = 1):

- ``user``       per-user propensity (partly visible as f.user.hist_ctr)
- ``author``     author quality (noisy copy in f.author.quality)
- ``post``       post quality (visible only through the noisy early-engagement counter)
- ``interest``   weight * batch_interest(u, day) . topic(p)   (what yesterday's batch job measured;
                 the user features show it with noise)
- ``drift``      weight * (interest_now(u) - batch_interest(u, day)) . topic(p)
- ``tie``        idiosyncratic user x author random effect (a hash of the ids; no feature shows it)
- ``nonlinear``  hour-of-day x media type, plus a threshold on the true interest match
- ``recency``    -w * log1p(age_hours / tau)
- ``context``    device, surface and in-network effects
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stacker.schema import MEDIA_TYPES, TASKS

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DEVICES = ("ios", "android", "web")
SURFACES = ("home", "explore")
COMPONENTS = ("user", "author", "post", "interest", "drift", "tie", "nonlinear", "recency", "context")

USER_FEATURES = (
    "user.activity", "user.tenure_days", "user.n_follows", "user.hist_ctr",
    *(f"user.interest_{k}" for k in range(8)),
)


def candidate_feature_names(emb_dim: int) -> tuple[str, ...]:
    return (
        *(f"post.emb_{k}" for k in range(emb_dim)),
        "post.age_hours", "post.early_engagement", "post.length",
        "author.log_followers", "author.quality", "author.posts_per_day", "author.age_days",
        "ua.follows", "ua.interest_match", "ua.author_topic_match",
    )


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 20260105
    start_ms: int = 1_767_571_200_000          # 2026-01-05T00:00:00Z
    n_topics: int = 8
    emb_dim: int = 8
    # population
    n_users: int = 1500
    n_authors: int = 600                       # present at the start
    new_authors_per_day: float = 6.0
    horizon_days: int = 120                    # new authors are created up to this day
    activity_sigma: float = 0.8                # lognormal user activity
    follower_sigma: float = 1.6                # lognormal author popularity (heavy tail)
    follows_min: int = 10
    follows_max: int = 30
    follow_pop_power: float = 0.8              # preferential attachment strength
    posts_per_day_mean: float = 2.5
    prehistory_days: int = 3                   # posts exist this long before the stream starts
    # traffic
    impressions_per_day: float = 1_000_000 / 14
    request_size_min: int = 10
    request_size_max: int = 30
    innet_window_h: float = 72.0
    oon_window_h: float = 48.0
    oon_share_home: float = 0.2
    oon_share_explore: float = 0.7
    explore_share: float = 0.15
    main_device_prob: float = 0.85
    # content
    topic_concentration: float = 0.3           # Dirichlet of author topic mixes
    post_topic_concentration: float = 6.0
    emb_scale: float = 2.0
    emb_noise: float = 0.5
    # interests and drift
    interest_scale: float = 1.3
    drift_rate: float = 0.06                   # radians per day of interest rotation
    feature_lag_days: float = 1.0              # interest features come from a daily batch job: the
                                               # interests measured at the start of the previous day
    stale_noise: float = 0.3
    # click-logit components
    user_sigma: float = 0.5
    author_sigma: float = 0.5
    post_sigma: float = 0.5
    interest_weight: float = 1.0
    tie_sigma: float = 0.85
    hour_media_amp: float = 0.9
    threshold: float = 0.6
    threshold_gain: float = 2.0
    recency_weight: float = 0.4
    recency_tau_h: float = 6.0
    device_effect: tuple = (("ios", 0.1), ("android", 0.0), ("web", -0.2))
    surface_effect: tuple = (("home", 0.0), ("explore", -0.3))
    innet_effect: float = 0.3
    # position bias: P(examine position k) = (1 + k / pos_scale) ** -pos_power
    pos_scale: float = 3.0
    pos_power: float = 0.8
    # tasks: bias (given examined) and per-component weights, in COMPONENTS order
    task_bias: tuple = (("click", -2.85), ("like", -3.9), ("comment", -6.4), ("share", -6.0),
                        ("hide", -5.9), ("dwell", -2.2))
    task_weights: tuple = (
        #          user author post interest drift tie  nonlin recency context
        ("click",   (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)),
        ("like",    (0.8, 0.8, 1.2, 1.0, 1.0, 1.1, 0.7, 0.8, 0.6)),
        ("comment", (0.8, 0.5, 0.8, 0.7, 0.7, 1.6, 0.4, 1.0, 0.5)),
        ("share",   (0.6, 0.7, 1.6, 0.8, 0.8, 0.6, 0.6, 1.2, 0.5)),
        ("hide",    (0.3, -0.8, -0.8, -1.0, -1.0, -0.8, -0.3, 0.0, 0.2)),
        ("dwell",   (0.7, 0.6, 0.8, 1.1, 1.1, 0.8, 1.0, 0.6, 0.8)),
    )
    # task x media main effects, in MEDIA_TYPES order (text, photo, video, link)
    task_media: tuple = (
        ("click",   (0.0, 0.1, 0.2, 0.3)),
        ("like",    (0.0, 0.3, 0.2, -0.3)),
        ("comment", (0.3, 0.1, 0.0, -0.2)),
        ("share",   (-0.2, 0.1, 0.3, 0.4)),
        ("hide",    (0.0, -0.1, 0.1, 0.3)),
        ("dwell",   (0.0, -0.2, 0.6, 0.1)),
    )
    media_peak_hour: tuple = (8.0, 13.0, 21.0, 10.0)   # text, photo, video, link


DEFAULT_WORLD = WorldConfig()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _hash_normal(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic standard normal per (a, b) pair (Box-Muller on two hashes)."""
    key = (a.astype(np.uint64) << np.uint64(32)) ^ b.astype(np.uint64) ^ np.uint64(salt & 0xFFFFFFFF)
    h1 = _splitmix64(key)
    h2 = _splitmix64(h1 ^ np.uint64(0xD1B54A32D192ED03))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class World:
    """Users, authors, follower graph and a lazily generated, deterministic post store."""

    def __init__(self, config: WorldConfig = DEFAULT_WORLD):
        self.config = c = config
        rng = np.random.default_rng([c.seed, 1])
        K = c.n_topics
        self.task_index = {t: i for i, t in enumerate(TASKS)}
        bias = dict(c.task_bias)
        weights = dict(c.task_weights)
        media = dict(c.task_media)
        self.task_bias = np.array([bias[t] for t in TASKS])
        self.task_weights = np.array([weights[t] for t in TASKS])          # [T, C]
        self.task_media = np.array([media[t] for t in TASKS])              # [T, M]
        self.device_effect = np.array([dict(c.device_effect)[d] for d in DEVICES])
        self.surface_effect = np.array([dict(c.surface_effect)[s] for s in SURFACES])
        hours = np.arange(24)[None, :]
        peaks = np.array(c.media_peak_hour)[:, None]
        self.hour_media = c.hour_media_amp * np.cos(2 * np.pi * (hours - peaks) / 24.0)   # [M, 24]

        # ---- users
        U = c.n_users
        self.user_activity = rng.lognormal(0.0, c.activity_sigma, U)
        self.user_p = self.user_activity / self.user_activity.sum()
        self.user_bias = rng.normal(0.0, c.user_sigma, U)
        self.user_main_device = rng.choice(3, U, p=[0.45, 0.4, 0.15])
        self.user_signup_ms = c.start_ms - (rng.exponential(400.0, U) * DAY_MS).astype(np.int64)
        self.int_a = rng.normal(0.0, c.interest_scale, (U, K))
        self.int_b = rng.normal(0.0, c.interest_scale, (U, K))
        self.int_omega = c.drift_rate * rng.lognormal(0.0, 0.3, U)
        self.int_phase = rng.uniform(0, 2 * np.pi, U)
        self.interest_noise = rng.normal(0.0, c.stale_noise * c.interest_scale, (U, K))
        self.feat_activity = (np.log(self.user_activity) + rng.normal(0, 0.2, U)).astype(np.float32)
        self.feat_hist_ctr = (self.user_bias + rng.normal(0, 0.3, U)).astype(np.float32)
        self.user_ids = np.array([f"u{i}" for i in range(U)], dtype=object)

        # ---- authors (initial + arriving over the horizon)
        n_new = rng.poisson(c.new_authors_per_day * c.horizon_days)
        A = c.n_authors + n_new
        self.n_authors = A
        created = np.concatenate([
            c.start_ms - (rng.exponential(300.0, c.n_authors) * DAY_MS + c.prehistory_days * DAY_MS).astype(np.int64),
            c.start_ms + np.sort(rng.uniform(0, c.horizon_days * DAY_MS, n_new)).astype(np.int64),
        ])
        self.author_created_ms = created
        self.author_pop = rng.lognormal(0.0, c.follower_sigma, A)
        self.author_quality = rng.normal(0.0, c.author_sigma, A)
        self.author_mix = rng.dirichlet(np.full(K, c.topic_concentration), A)
        self.author_media = rng.dirichlet(np.full(len(MEDIA_TYPES), 0.7), A)
        self.author_rate = c.posts_per_day_mean * rng.lognormal(-0.32, 0.8, A)
        self.feat_log_followers = (np.log1p(200.0 * self.author_pop) + rng.normal(0, 0.1, A)).astype(np.float32)
        self.feat_author_quality = (self.author_quality + rng.normal(0, 0.35, A)).astype(np.float32)
        self.feat_posts_per_day = (self.author_rate * rng.lognormal(0, 0.2, A)).astype(np.float32)
        self.author_ids = np.array([f"a{i}" for i in range(A)], dtype=object)

        # ---- follower graph (Gumbel top-k: preferential to popular authors, without replacement)
        n_follow = rng.integers(c.follows_min, c.follows_max + 1, U)
        logw = c.follow_pop_power * np.log(self.author_pop)
        indptr = np.concatenate([[0], np.cumsum(n_follow)])
        follows = np.empty(indptr[-1], dtype=np.int64)
        for lo in range(0, U, 500):
            hi = min(U, lo + 500)
            keys = logw[None, :] + rng.gumbel(size=(hi - lo, A))
            order = np.argsort(-keys, axis=1)
            for i in range(lo, hi):
                follows[indptr[i]:indptr[i + 1]] = order[i - lo, :n_follow[i]]
        self.follow_indptr = indptr
        self.follow_authors = follows
        self.n_follows = n_follow
        self._follow_keys = np.sort(np.repeat(np.arange(U, dtype=np.int64), n_follow) * A + follows)

        # ---- projection for content embeddings
        q, _ = np.linalg.qr(rng.normal(size=(max(K, c.emb_dim), max(K, c.emb_dim))))
        self.emb_proj = q[:K, :c.emb_dim]
        self.candidate_features = candidate_feature_names(c.emb_dim)

        # ---- posts (lazy, by day)
        self._next_day = -c.prehistory_days
        self._chunks: list[dict] = []
        self.posts: dict[str, np.ndarray] = {}
        self._post_ids_cache = None
        self.ensure_posts(c.start_ms)

    # ------------------------------------------------------------------ users
    def interest_at(self, u: np.ndarray, ts: np.ndarray) -> np.ndarray:
        days = (np.asarray(ts, dtype=np.float64) - self.config.start_ms) / DAY_MS
        theta = self.int_phase[u] + self.int_omega[u] * days
        return np.cos(theta)[:, None] * self.int_a[u] + np.sin(theta)[:, None] * self.int_b[u]

    def batch_interest(self, u: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Interests as the daily batch job measured them: at the start of the day, lagged."""
        c = self.config
        ts = np.asarray(ts, dtype=np.int64)
        day_start = c.start_ms + ((ts - c.start_ms) // DAY_MS) * DAY_MS
        return self.interest_at(u, day_start - int(c.feature_lag_days * DAY_MS))

    def interest_features(self, u: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """The user-interest features: the batch measurement plus a per-user measurement error."""
        return (self.batch_interest(u, ts) + self.interest_noise[u]).astype(np.float32)

    def follows(self, u: np.ndarray, a: np.ndarray) -> np.ndarray:
        key = np.asarray(u, dtype=np.int64) * self.n_authors + a
        i = np.searchsorted(self._follow_keys, key)
        i = np.minimum(i, len(self._follow_keys) - 1)
        return self._follow_keys[i] == key

    # ------------------------------------------------------------------ posts
    def ensure_posts(self, until_ms: int) -> None:
        """Generate posts (day by day, deterministically) until ``until_ms``."""
        c = self.config
        target_day = math.floor((until_ms - c.start_ms) / DAY_MS)
        if self._next_day > target_day:
            return
        while self._next_day <= target_day:
            self._chunks.append(self._generate_day(self._next_day))
            self._next_day += 1
        self.posts = {k: np.concatenate([ch[k] for ch in self._chunks]) for k in self._chunks[0]}
        self.posts_end_ms = c.start_ms + self._next_day * DAY_MS
        # index by (author, created_at) for in-network retrieval
        order = np.lexsort((self.posts["created_at"], self.posts["author"]))
        self._by_author = order
        self._by_author_key = self.posts["author"][order] * (1 << 42) + (self.posts["created_at"][order] - c.start_ms + (1 << 40))
        # posts are stored in created_at order: cumulative popularity for out-of-network sampling
        w = self.author_pop[self.posts["author"]] ** 0.7 * np.exp(0.5 * self.posts["quality"])
        self._oon_cum = np.concatenate([[0.0], np.cumsum(w)])
        self._post_ids_cache = None

    def _generate_day(self, day: int) -> dict:
        c = self.config
        rng = np.random.default_rng([c.seed, 2, day + 10_000])
        t0 = c.start_ms + day * DAY_MS
        alive = np.nonzero(self.author_created_ms < t0 + DAY_MS)[0]
        n = rng.poisson(self.author_rate[alive])
        author = np.repeat(alive, n)
        lo = np.maximum(self.author_created_ms[author], t0)
        created = (lo + rng.uniform(0, 1, len(author)) * (t0 + DAY_MS - lo)).astype(np.int64)
        order = np.argsort(created, kind="stable")
        author, created = author[order], created[order]
        N = len(author)
        cm = np.cumsum(self.author_media[author], axis=1)
        media = (rng.uniform(size=(N, 1)) > cm).sum(axis=1).clip(0, len(MEDIA_TYPES) - 1)
        g = rng.gamma(self.author_mix[author] * c.post_topic_concentration + 0.05)
        topic = g / g.sum(axis=1, keepdims=True)
        emb = c.emb_scale * topic @ self.emb_proj + rng.normal(0, c.emb_noise, (N, c.emb_dim))
        quality = rng.normal(0, c.post_sigma, N)
        early = rng.normal(0, 0.5, N)
        length = np.where(media == 0, rng.lognormal(5.0, 0.8, N), rng.lognormal(3.0, 1.0, N))
        return dict(author=author.astype(np.int64), created_at=created, media=media.astype(np.int8),
                    topic=topic, emb=emb.astype(np.float32), quality=quality, early_noise=early,
                    length=np.log1p(length).astype(np.float32))

    @property
    def post_ids(self) -> np.ndarray:
        """String ids ("p<index>") of all generated posts (index = position in the post store)."""
        if self._post_ids_cache is None:
            self._post_ids_cache = np.array([f"p{i}" for i in range(len(self.posts["author"]))], dtype=object)
        return self._post_ids_cache

    def recent_posts_of(self, a: np.ndarray, ts: np.ndarray, window_ms: int):
        """Index ranges [lo, hi) into ``self._by_author`` of the posts of author ``a`` created in (ts - window, ts]."""
        base = np.asarray(a, dtype=np.int64) * (1 << 42) - self.config.start_ms + (1 << 40)
        lo = np.searchsorted(self._by_author_key, base + ts - window_ms, side="right")
        hi = np.searchsorted(self._by_author_key, base + ts, side="right")
        return lo, hi

    def sample_oon(self, ts: np.ndarray, window_ms: int, rng) -> np.ndarray:
        """Popularity-weighted posts created in (ts - window, ts]; -1 if none."""
        created = self.posts["created_at"]
        lo = np.searchsorted(created, ts - window_ms, side="right")
        hi = np.searchsorted(created, ts, side="right")
        c0, c1 = self._oon_cum[lo], self._oon_cum[hi]
        x = c0 + rng.uniform(size=len(ts)) * (c1 - c0)
        idx = np.searchsorted(self._oon_cum, x, side="right") - 1
        idx = np.clip(idx, lo, np.maximum(hi - 1, lo))
        return np.where(hi > lo, idx, -1)

    # ------------------------------------------------------------------ requests
    def draw_contexts(self, users: np.ndarray, rng):
        c = self.config
        n = len(users)
        dev = np.where(rng.uniform(size=n) < c.main_device_prob, self.user_main_device[users], rng.integers(0, 3, n))
        surf = (rng.uniform(size=n) < c.explore_share).astype(np.int64)
        return dev, surf

    def user_features(self, u: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
        out = {
            "user.activity": self.feat_activity[u],
            "user.tenure_days": ((ts - self.user_signup_ms[u]) / DAY_MS).astype(np.float32),
            "user.n_follows": self.n_follows[u].astype(np.float32),
            "user.hist_ctr": self.feat_hist_ctr[u],
        }
        fi = self.interest_features(u, np.broadcast_to(ts, np.shape(u)))
        for k in range(self.config.n_topics):
            out[f"user.interest_{k}"] = fi[:, k]
        return out

    def candidate_feature_matrix(self, u, p, ts) -> np.ndarray:
        """Candidate-level features [N, F] (names in :attr:`candidate_features`)."""
        P = self.posts
        a = P["author"][p]
        emb = P["emb"][p]
        age_h = (ts - P["created_at"][p]) / HOUR_MS
        pop = self.author_pop[a]
        early = np.log1p(np.exp(P["quality"][p] + 0.8 * np.log(pop) + P["early_noise"][p] + 1.5)
                         * np.minimum(age_h, 6.0) / 6.0)
        fi = self.interest_features(u, np.broadcast_to(ts, np.shape(u)))
        out = np.empty((len(p), len(self.candidate_features)), dtype=np.float32)
        E = self.config.emb_dim
        out[:, :E] = emb
        out[:, E] = age_h
        out[:, E + 1] = early
        out[:, E + 2] = P["length"][p]
        out[:, E + 3] = self.feat_log_followers[a]
        out[:, E + 4] = self.feat_author_quality[a]
        out[:, E + 5] = self.feat_posts_per_day[a]
        out[:, E + 6] = (ts - self.author_created_ms[a]) / DAY_MS
        out[:, E + 7] = self.follows(u, a)
        emb_topic = emb @ self.emb_proj.T / self.config.emb_scale          # noisy topic estimate
        out[:, E + 8] = np.einsum("nk,nk->n", fi, emb_topic)
        out[:, E + 9] = np.einsum("nk,nk->n", fi, self.author_mix[a])
        return out

    # ------------------------------------------------------------------ probability model
    def components(self, u, p, ts, device, surface) -> dict[str, np.ndarray]:
        """Click-logit components (given examined) per impression."""
        c = self.config
        P = self.posts
        a = P["author"][p]
        topic = P["topic"][p]
        now = self.interest_at(u, ts)
        stale = self.batch_interest(u, ts)
        match_stale = np.einsum("nk,nk->n", stale, topic)
        match_now = np.einsum("nk,nk->n", now, topic)
        hour = ((ts // HOUR_MS) % 24).astype(np.int64)
        age_h = np.maximum(ts - P["created_at"][p], 0) / HOUR_MS
        innet = self.follows(u, a)
        return {
            "user": self.user_bias[u],
            "author": self.author_quality[a],
            "post": P["quality"][p],
            "interest": c.interest_weight * match_stale,
            "drift": c.interest_weight * (match_now - match_stale),
            "tie": c.tie_sigma * _hash_normal(u, a, c.seed),
            "nonlinear": self.hour_media[P["media"][p], hour]
                         + c.threshold_gain * np.maximum(match_now - c.threshold, 0.0),
            "recency": -c.recency_weight * np.log1p(age_h / c.recency_tau_h),
            "context": self.device_effect[device] + self.surface_effect[surface] + c.innet_effect * innet,
        }

    def examine_prob(self, position) -> np.ndarray:
        c = self.config
        return (1.0 + np.asarray(position, dtype=np.float64) / c.pos_scale) ** -c.pos_power

    def probabilities(self, comps: dict, media: np.ndarray, position, tasks=slice(None)) -> np.ndarray:
        """True P(label) per task, [N, T] float64 (``tasks``: indices of the tasks wanted, default all)."""
        C = np.stack([comps[k] for k in COMPONENTS], axis=1)             # [N, C]
        logits = C @ self.task_weights[tasks].T + self.task_bias[None, tasks] + self.task_media[tasks].T[media]
        return self.examine_prob(position)[:, None] * _sigmoid(logits)
