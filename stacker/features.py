"""Feature spec and the one vectorised feature builder shared by training, serving and the learner.

Raw inputs per candidate are named dense features (user-level ``user.*`` ones are the same for every
candidate of a request), ids, media type, ``created_at`` and the request context. The builder turns N
candidates into

- ``dense``: float32 [N, D] — the spec's named features in spec order, then derived ones (log post
  age in hours, hour of day as sine/cosine, log(1 + position), one-hot media type, device and
  surface);
- ``ids``: uint64 [N, 3] — hashed user, post and author ids;
- ``context``: uint64 [N, 5] — hashed tokens ``device=``, ``surface=``, ``hour=``, ``media=``, ``pos=``.

Position bias is learned from the logged position (a dense feature and a context token); serving
scores every candidate as if shown at the top (position 0), so rankings are not distorted by where
a post happened to be shown in the logs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import schema
from .hashing import vw_id, vw_ids

DERIVED = ("log_age_h", "hour_sin", "hour_cos", "log_position")
DEVICES = ("ios", "android", "web")
SURFACES = ("home", "explore")
_POSITION_BUCKETS = np.array([0, 1, 2, 3, 5, 10, 20], dtype=np.int64)
_MS_PER_HOUR = 3_600_000.0


@dataclass(frozen=True)
class FeatureSpec:
    """Named dense inputs with their defaults; the order fixes the columns of the dense matrix."""

    user_features: tuple[str, ...]
    post_features: tuple[str, ...]
    defaults: dict[str, float] = field(default_factory=dict)
    media_types: tuple[str, ...] = schema.MEDIA_TYPES
    devices: tuple[str, ...] = DEVICES
    surfaces: tuple[str, ...] = SURFACES

    @property
    def dense_names(self) -> list[str]:
        return (list(self.user_features) + list(self.post_features) + list(DERIVED)
                + [f"media={m}" for m in self.media_types] + [f"device={d}" for d in self.devices]
                + [f"surface={s}" for s in self.surfaces])

    def default_vector(self, names) -> np.ndarray:
        return np.array([self.defaults.get(n, 0.0) for n in names], dtype=np.float32)

    def align(self, which: str, names, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Reorder columns of ``values`` (named ``names``) into spec order, filling defaults.

        Returns the aligned float32 array and the names the spec does not know.
        """
        wanted = self.user_features if which == "user" else self.post_features
        index = {n: i for i, n in enumerate(names)}
        values = np.asarray(values, dtype=np.float32)
        shape = values.shape[:-1] + (len(wanted),)
        out = np.empty(shape, dtype=np.float32)
        out[...] = self.default_vector(wanted)
        for j, n in enumerate(wanted):
            i = index.get(n)
            if i is not None:
                out[..., j] = values[..., i]
        unknown = [n for n in names if n not in set(wanted)]
        return out, unknown

    def to_dict(self) -> dict:
        return {"user_features": list(self.user_features), "post_features": list(self.post_features),
                "defaults": self.defaults, "media_types": list(self.media_types),
                "devices": list(self.devices), "surfaces": list(self.surfaces), "derived": list(DERIVED)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(tuple(d["user_features"]), tuple(d["post_features"]), dict(d["defaults"]),
                   tuple(d["media_types"]), tuple(d["devices"]), tuple(d["surfaces"]))

    @classmethod
    def from_table(cls, df: pd.DataFrame) -> "FeatureSpec":
        """Infer the spec from a training table; defaults are the training medians."""
        cols = schema.feature_columns(df.columns)
        names = [c[len(schema.FEATURE_PREFIX):] for c in cols]
        user = tuple(n for n in names if n.startswith("user."))
        post = tuple(n for n in names if not n.startswith("user."))
        defaults = {n: _median(df[schema.FEATURE_PREFIX + n].to_numpy(np.float32)) for n in names}
        return cls(user, post, defaults)


@dataclass
class CandidateBatch:
    """N candidates in columnar form. Request-level fields may be scalars (broadcast to all N)."""

    ts: np.ndarray | int
    user_id: np.ndarray | str
    user_features: np.ndarray          # [U] or [N, U], spec order
    post_ids: np.ndarray               # [N] str
    author_ids: np.ndarray             # [N] str
    media: np.ndarray                  # [N] int index into spec.media_types
    created_at: np.ndarray             # [N] int64 ms
    post_features: np.ndarray          # [N, P], spec order
    device: np.ndarray | str = ""       # a missing context value is "", as in a Rank request without it
    surface: np.ndarray | str = ""
    position: np.ndarray | None = None  # [N]; None = scored as if at the top

    def __len__(self) -> int:
        return len(self.post_ids)

    @classmethod
    def from_table(cls, df: pd.DataFrame, spec: FeatureSpec) -> "CandidateBatch":
        """All rows of an impression table as one batch (every row its own user and time)."""
        def cols(names):
            return table_features(df, spec, names)
        media_index = {m: i for i, m in enumerate(spec.media_types)}
        media = df["media_type"].map(media_index).fillna(0).to_numpy(np.int8)
        return cls(
            ts=df["ts"].to_numpy(np.int64), user_id=df["user_id"].to_numpy(object),
            user_features=cols(spec.user_features), post_ids=df["post_id"].to_numpy(object),
            author_ids=df["author_id"].to_numpy(object), media=media,
            created_at=df["created_at"].to_numpy(np.int64), post_features=cols(spec.post_features),
            device=df["ctx.device"].to_numpy(object) if "ctx.device" in df else "",
            surface=df["ctx.surface"].to_numpy(object) if "ctx.surface" in df else "",
            position=df["position"].to_numpy(np.int32) if "position" in df else None)


def table_features(df: pd.DataFrame, spec: FeatureSpec, names) -> np.ndarray:
    """Columns ``f.<name>`` of an impression table as float32 [N, len(names)]; absent or NaN values
    take the spec's defaults."""
    defaults = spec.default_vector(names)
    out = np.empty((len(df), len(names)), np.float32)
    out[:] = defaults
    for j, name in enumerate(names):
        column = schema.FEATURE_PREFIX + name
        if column in df.columns:
            out[:, j] = df[column].to_numpy(np.float32)
    return np.where(np.isnan(out), defaults, out)


def _one_hot(values, vocabulary, n) -> np.ndarray:
    out = np.zeros((n, len(vocabulary)), np.float32)
    if isinstance(values, str):
        if values in vocabulary:
            out[:, vocabulary.index(values)] = 1.0
        return out
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)  # never code -1
    for k, u in enumerate(uniques):
        if u in vocabulary:
            out[codes == k, vocabulary.index(u)] = 1.0
    return out


def _median(x: np.ndarray) -> float:
    """The median of the values present; 0 for a feature with none (the default of a missing value)."""
    x = x[~np.isnan(x)]
    return float(np.median(x)) if len(x) else 0.0


def _hash_column(values, prefix: str, n: int) -> np.ndarray:
    """Hash string ids (or one scalar broadcast to n), hashing each distinct value once."""
    if isinstance(values, str):
        return np.full(n, vw_id(prefix + values), dtype=np.uint64)
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)  # never code -1
    return vw_ids([prefix + str(u) for u in uniques])[codes]


def build_dense(spec: FeatureSpec, batch: CandidateBatch) -> np.ndarray:
    """The dense matrix [N, D] fed to the GBDT and the DNN."""
    n = len(batch)
    out = np.empty((n, len(spec.dense_names)), dtype=np.float32)
    u, p = len(spec.user_features), len(spec.post_features)
    out[:, :u] = batch.user_features
    out[:, u:u + p] = batch.post_features
    ts = np.asarray(batch.ts, dtype=np.int64)
    age_h = np.maximum(ts - np.asarray(batch.created_at, np.int64), 0) / _MS_PER_HOUR
    out[:, u + p] = np.log1p(age_h)
    angle = (ts % 86_400_000) * (2 * np.pi / 86_400_000.0)
    out[:, u + p + 1] = np.sin(angle)
    out[:, u + p + 2] = np.cos(angle)
    out[:, u + p + 3] = 0.0 if batch.position is None else np.log1p(np.asarray(batch.position, np.float32))
    k = u + p + 4
    m = len(spec.media_types)
    out[:, k:k + m] = 0.0
    out[np.arange(n), k + np.asarray(batch.media, np.int64)] = 1.0
    k += m
    out[:, k:k + len(spec.devices)] = _one_hot(batch.device, list(spec.devices), n)
    k += len(spec.devices)
    out[:, k:k + len(spec.surfaces)] = _one_hot(batch.surface, list(spec.surfaces), n)
    return out


def build_sparse(spec: FeatureSpec, batch: CandidateBatch) -> tuple[np.ndarray, np.ndarray]:
    """Hashed ids [N, 3] (user, post, author) and context tokens [N, 5]."""
    n = len(batch)
    ids = np.empty((n, 3), dtype=np.uint64)
    ids[:, 0] = _hash_column(batch.user_id, "", n)
    ids[:, 1] = _hash_column(batch.post_ids, "", n)
    ids[:, 2] = _hash_column(batch.author_ids, "", n)
    ctx = np.empty((n, 5), dtype=np.uint64)
    ctx[:, 0] = _hash_column(batch.device, "device=", n)
    ctx[:, 1] = _hash_column(batch.surface, "surface=", n)
    hours = (np.asarray(batch.ts, np.int64) // 3_600_000) % 24
    ctx[:, 2] = _TOKEN_HOUR[np.broadcast_to(hours, (n,))]
    ctx[:, 3] = _token_media(spec)[np.asarray(batch.media, np.int64)]
    pos = np.zeros(n, np.int64) if batch.position is None else np.asarray(batch.position, np.int64)
    ctx[:, 4] = _TOKEN_POS[np.searchsorted(_POSITION_BUCKETS, pos, side="right") - 1]
    return ids, ctx


_TOKEN_HOUR = np.array([vw_id(f"hour={h}") for h in range(24)], dtype=np.uint64)
_TOKEN_POS = np.array([vw_id(f"pos={b}") for b in _POSITION_BUCKETS], dtype=np.uint64)


def _token_media(spec: FeatureSpec) -> np.ndarray:
    return np.array([vw_id(f"media={m}") for m in spec.media_types], dtype=np.uint64)
