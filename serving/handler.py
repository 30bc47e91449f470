"""The transport-neutral ranking handler: plain request in, plain result out, errors as ServingError.

Steps: validate → align features to the live bundle's spec (defaults for missing names) → stack
(features, GBDT, DNN, LR) → EV → re-rank → optional explain → served records to the sink.
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stacker.dataset import implausible_ms, not_a_time, unit_hint
from stacker.features import CandidateBatch
from stacker.ranker import StackedRanker

from .errors import Cancelled, DeadlineExceeded, InvalidInput, TooLarge
from .explain import contributions
from .model import LiveModel
from .rerank import RerankPolicy, rerank
from .settings import ServingSettings
from .sink import NullSink, ServedBatch, ServedRecordSink

_MS_PER_HOUR = 3_600_000.0


@dataclass
class RankInput:
    """A decoded Rank request (no protobuf types)."""

    request_id: str
    user_id: str
    user_feature_names: list[str]
    user_features: np.ndarray              # float32 [U']
    post_ids: list[str]
    author_ids: list[str]
    created_at: np.ndarray                 # int64 [N]
    media: list[str]                       # media type names, "" = unspecified
    candidate_feature_names: list[str]
    candidate_features: np.ndarray         # float32 [N, F']
    time_ms: int = 0
    device: str = ""
    surface: str = ""
    seen_post_ids: list[str] = field(default_factory=list)
    limit: int = 0
    task_weights: dict[str, float] = field(default_factory=dict)
    explain: bool = False
    features_error: str | None = None      # set by the decoder when the packed features do not fit
    # Digest of what a retry under request_id must repeat (the transport's; "" = compare nothing).
    fingerprint: bytes = b""


@dataclass
class RankResult:
    request_id: str
    bundle_id: str
    update_seq: int
    tasks: tuple[str, ...]
    post_ids: list[str]
    scores: np.ndarray                     # [K] after re-ranking
    evs: np.ndarray                        # [K]
    probabilities: np.ndarray              # [K, T]
    contributions: list[list[tuple[str, float]]] | None
    ignored_feature_names: list[str]
    dropped_seen: int
    timings: dict[str, float]              # seconds per stage
    covered_offset: int = -1               # event-log offset the applied online updates cover
    # Dense input -> candidates whose value lay outside the DNN's training range (clipped to it).
    out_of_range: dict[str, int] = field(default_factory=dict)
    # The bundle's features the request did not send (their defaults were used).
    defaulted_feature_names: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return f"{self.bundle_id}+{self.update_seq}"


Remaining = Callable[[], float | None]


def out_of_range(ranker: StackedRanker, dense: np.ndarray) -> dict[str, int]:
    """Dense inputs some candidate carried outside the DNN's training range -> how many candidates."""
    counts = ranker.mlp.out_of_range(dense)
    return {ranker.spec.dense_names[j]: int(counts[j]) for j in np.flatnonzero(counts)}


def _check_strings(values: list[str], name: str, limit: int, empty_ok: bool = False) -> None:
    if not values:
        return
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    empty = np.flatnonzero(lengths == 0) if not empty_ok else ()
    if len(empty):
        raise InvalidInput(f"{name}[{empty[0]}]", "missing (empty string)")
    long = np.flatnonzero(lengths > limit)
    if len(long):
        raise InvalidInput(f"{name}[{long[0]}]", f"{lengths[long[0]]} characters, limit {limit}")


def _check_names(names: list[str], name: str, limit: int) -> None:
    _check_strings(names, name, limit)
    if len(set(names)) != len(names):
        dup = pd.Index(names)[pd.Index(names).duplicated()][0]
        raise InvalidInput(name, f"duplicate feature name {dup!r}")


def _check_finite(values: np.ndarray, names: list[str], field_name: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        pos = np.argwhere(bad)[0]
        where = f"row {pos[0]}, " if values.ndim == 2 else ""
        raise InvalidInput(field_name, f"non-finite value ({values[tuple(pos)]}) at {where}feature "
                                       f"{names[pos[-1]]!r}")


class RankingHandler:
    """Ranks with whatever model is live; keeps recent answers for idempotent retries."""

    def __init__(self, model: LiveModel, settings: ServingSettings, sink: ServedRecordSink | None = None,
                 clock: Callable[[], float] = time.time):
        self.model, self.settings = model, settings
        self.sink = sink or NullSink()
        self.clock = clock
        self.policy = RerankPolicy(settings.author_penalty_mult, settings.author_penalty_add,
                                   settings.media_penalty_mult, settings.media_penalty_add,
                                   settings.freshness_boost, settings.freshness_half_life_h)
        self._recent: OrderedDict[str, tuple[bytes, RankResult]] = OrderedDict()
        self._recent_lock = threading.Lock()

    # -- idempotency -------------------------------------------------------------------------
    def _cached(self, request_id: str, fingerprint: bytes) -> RankResult | None:
        """The answer already given under ``request_id``; a different request under the same id is an
        error, never another request's answer."""
        with self._recent_lock:
            hit = self._recent.get(request_id)
            if hit is None:
                return None
            self._recent.move_to_end(request_id)
        if hit[0] != fingerprint:
            raise InvalidInput("request_id", f"{request_id!r} was already used for a different request (a retry "
                                             f"must repeat the user, candidates and options; use a new request_id "
                                             f"for a new request)")
        return hit[1]

    def returned(self, request_id: str) -> list[str] | None:
        """The posts this process returned for ``request_id``, while it keeps the answer for retries
        (None: not known here)."""
        with self._recent_lock:
            hit = self._recent.get(request_id)
        return None if hit is None else hit[1].post_ids

    def _remember(self, result: RankResult, fingerprint: bytes) -> None:
        with self._recent_lock:
            self._recent[result.request_id] = (fingerprint, result)
            while len(self._recent) > self.settings.idempotency_cache:
                self._recent.popitem(last=False)

    # -- validation --------------------------------------------------------------------------
    def _validate(self, r: RankInput, ranker: StackedRanker, now_ms: int) -> None:
        s = self.settings
        if len(r.request_id) > s.max_string_len:
            raise InvalidInput("request_id", f"{len(r.request_id)} characters, limit {s.max_string_len}")
        if not r.user_id:
            raise InvalidInput("user.id", "missing")
        if len(r.user_id) > s.max_string_len:
            raise InvalidInput("user.id", f"{len(r.user_id)} characters, limit {s.max_string_len}")
        n = len(r.post_ids)
        if n == 0:
            raise InvalidInput("candidates.post_ids", "no candidates")
        if n > s.max_candidates:
            raise TooLarge("candidates.post_ids", f"{n} candidates, limit {s.max_candidates}")
        for name, length in (("candidates.author_ids", len(r.author_ids)),
                             ("candidates.created_at_ms", len(r.created_at)),
                             ("candidates.media_types", len(r.media))):
            if length != n:
                raise InvalidInput(name, f"has {length} entries, candidates.post_ids has {n}")
        if r.features_error:
            raise InvalidInput("candidates.features", r.features_error)
        _check_strings(r.post_ids, "candidates.post_ids", s.max_string_len)
        _check_strings(r.author_ids, "candidates.author_ids", s.max_string_len)
        if len(set(r.post_ids)) != n:
            dup = pd.Index(r.post_ids)[pd.Index(r.post_ids).duplicated()][0]
            raise InvalidInput("candidates.post_ids", f"duplicate post id {dup!r}")
        unknown_media = [m for m in set(r.media) if m and m not in ranker.spec.media_types]
        if unknown_media:
            raise InvalidInput("candidates.media_types", f"unknown media type {unknown_media[0]!r}")
        bad = implausible_ms(r.created_at, zero_ok=True)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInput("candidates.created_at_ms", f"{int(r.created_at[i])} at index {i} is not a time "
                               f"between 1990 and 2100 in milliseconds since the epoch{unit_hint(r.created_at[i])} "
                               f"(0: unknown)")
        _check_names(r.user_feature_names, "user.feature_names", s.max_string_len)
        if len(r.user_features) != len(r.user_feature_names):
            raise InvalidInput("user.feature_values", f"has {len(r.user_features)} values for "
                                                      f"{len(r.user_feature_names)} user.feature_names")
        _check_finite(r.user_features, r.user_feature_names, "user.feature_values")
        _check_names(r.candidate_feature_names, "candidates.feature_names", s.max_string_len)
        if r.candidate_features.shape != (n, len(r.candidate_feature_names)):
            raise InvalidInput("candidates.features", f"shape {r.candidate_features.shape}, expected "
                                                      f"({n}, {len(r.candidate_feature_names)})")
        _check_finite(r.candidate_features, r.candidate_feature_names, "candidates.features")
        for name, value in (("context.device", r.device), ("context.surface", r.surface)):
            if len(value) > s.max_string_len:
                raise InvalidInput(name, f"{len(value)} characters, limit {s.max_string_len}")
        if r.time_ms < 0:
            raise InvalidInput("context.time_ms", f"negative ({r.time_ms})")
        if implausible_ms(r.time_ms, zero_ok=True):
            raise InvalidInput("context.time_ms", f"{not_a_time(r.time_ms)} (0: the server's clock)")
        if r.time_ms > now_ms + s.max_future_ms:
            raise InvalidInput("context.time_ms", f"{r.time_ms} is {(r.time_ms - now_ms) / 1000:.0f} s in the "
                                                  f"future (limit {s.max_future_ms / 1000:.0f} s)")
        if len(r.seen_post_ids) > s.max_seen:
            raise TooLarge("seen_post_ids", f"{len(r.seen_post_ids)} ids, limit {s.max_seen}")
        _check_strings(r.seen_post_ids, "seen_post_ids", s.max_string_len, empty_ok=True)
        for task, w in r.task_weights.items():
            if task not in ranker.tasks:
                raise InvalidInput("task_weights", f"unknown task {task!r}; the model's tasks are "
                                                   f"{', '.join(ranker.tasks)}")
            if not math.isfinite(w):
                raise InvalidInput(f"task_weights[{task}]", f"non-finite weight {w}")

    def build_batch(self, r: RankInput, ranker: StackedRanker, now_ms: int) -> tuple[CandidateBatch, list[str]]:
        """The candidates aligned to the ranker's feature spec, and the request names it ignored."""
        spec = ranker.spec
        user, unknown_user = spec.align("user", r.user_feature_names, r.user_features)
        posts, unknown_post = spec.align("post", r.candidate_feature_names, r.candidate_features)
        # A feature sent only in the wrong block is never one a newer bundle dropped: refuse it, saying where
        # it belongs (an extra copy beside the right one is merely ignored).
        for name in unknown_user:
            if name in spec.post_features and name not in r.candidate_feature_names:
                raise InvalidInput("user.feature_names", f"{name!r} is a candidate feature of this model: send it "
                                                         f"in candidates.feature_names")
        for name in unknown_post:
            if name in spec.user_features and name not in r.user_feature_names:
                raise InvalidInput("candidates.feature_names", f"{name!r} is a user feature of this model: send it "
                                                               f"in user.feature_names")
        ignored = unknown_user + unknown_post
        if ignored and self.settings.unknown_features == "reject":
            field_name = "user.feature_names" if unknown_user else "candidates.feature_names"
            raise InvalidInput(field_name, f"unknown feature {ignored[0]!r} (the model knows "
                                           f"{len(spec.user_features)} user and {len(spec.post_features)} "
                                           f"candidate features; unknown_features=reject)")
        media_index = {m: i for i, m in enumerate(spec.media_types)}
        media = np.fromiter((media_index.get(m, 0) for m in r.media), np.int8, len(r.media))
        batch = CandidateBatch(ts=r.time_ms or now_ms, user_id=r.user_id, user_features=user,
                               post_ids=np.asarray(r.post_ids, object), author_ids=np.asarray(r.author_ids, object),
                               media=media, created_at=r.created_at, post_features=posts,
                               device=r.device, surface=r.surface)
        return batch, ignored

    # -- ranking -----------------------------------------------------------------------------
    def rank(self, r: RankInput, remaining: Remaining = lambda: None,
             alive: Callable[[], bool] = lambda: True) -> RankResult:
        """Rank ``r``. ``remaining`` gives the seconds left of the client's deadline (None: no deadline),
        ``alive`` whether the client still waits: an answer it can no longer receive is neither logged
        as served nor kept for retries."""
        t_start = time.perf_counter()
        if r.request_id:
            hit = self._cached(r.request_id, r.fingerprint)
            if hit is not None:
                return hit
        ranker = self.model.current()  # one reference for the whole request: swaps happen between requests
        now_ms = int(self.clock() * 1000)
        self._validate(r, ranker, now_ms)
        batch, ignored = self.build_batch(r, ranker, now_ms)
        spec, ts, media = ranker.spec, int(batch.ts), batch.media
        user, posts = batch.user_features, batch.post_features
        timings: dict[str, float] = {"validate": time.perf_counter() - t_start}
        self._check_deadline(remaining, "features")
        f = ranker.features(batch, timings)
        self._check_deadline(remaining, "lr")
        # Read the version before scoring: updates land in place, so the weights used are at least this fresh.
        update_seq, covered_offset = ranker.update_seq, ranker.covered_offset
        probs = ranker.predict_features(f, timings)
        t0 = time.perf_counter()
        weights = dict(ranker.ev_weights, **r.task_weights)
        w_vec = np.array([weights.get(t, 0.0) for t in ranker.tasks])
        ev = probs @ w_vec
        keep = ~np.isin(batch.post_ids, np.asarray(r.seen_post_ids, object)) if r.seen_post_ids else \
            np.ones(len(ev), bool)
        authors, _ = pd.factorize(batch.author_ids)
        age_h = (ts - r.created_at) / _MS_PER_HOUR
        limit = r.limit or self.settings.default_limit
        order, scores = rerank(ev, authors, media, age_h, keep, limit, self.policy)
        timings["rerank"] = time.perf_counter() - t0
        explained = None
        if r.explain and len(order):
            t0 = time.perf_counter()
            tokens = [f"device={r.device}", f"surface={r.surface}", f"hour={(ts // 3_600_000) % 24}",
                      "media=?", "pos=0"]
            explained = []
            for k, i in enumerate(order):  # media token differs per post
                tokens[3] = f"media={spec.media_types[media[i]]}"
                explained += contributions(ranker, f, order[k:k + 1], probs[order[k:k + 1]], w_vec, tokens,
                                           self.settings.explain_top_k)
            timings["explain"] = time.perf_counter() - t0
        result = RankResult(r.request_id or uuid.uuid4().hex, ranker.bundle_id, update_seq, ranker.tasks,
                            [r.post_ids[i] for i in order], scores, ev[order], probs[order], explained,
                            ignored, int((~keep).sum()), timings, covered_offset,
                            out_of_range(ranker, f.dense), self._defaulted(r, spec))
        left = remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded("deadline: passed before the answer was ready (nothing logged as served)")
        if not alive():
            raise Cancelled("cancelled by the client before the answer was ready (nothing logged as served)")
        self.sink.submit(ServedBatch(result.request_id, r.user_id, ts, ranker.bundle_id, update_seq,
                                     r.device, r.surface, user, result.post_ids,
                                     [r.author_ids[i] for i in order],
                                     [spec.media_types[media[i]] for i in order], r.created_at[order],
                                     posts[order]))
        if r.request_id:
            self._remember(result, r.fingerprint)
        return result

    @staticmethod
    def _defaulted(r: RankInput, spec) -> list[str]:
        sent = {*r.user_feature_names, *r.candidate_feature_names}
        return [n for n in (*spec.user_features, *spec.post_features) if n not in sent]

    @staticmethod
    def _check_deadline(remaining: Remaining, stage: str, need_s: float = 0.002) -> None:
        left = remaining()
        if left is not None and left < need_s:
            raise DeadlineExceeded(f"deadline: {max(left, 0) * 1000:.1f} ms left before stage {stage!r}")
