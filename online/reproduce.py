"""Rebuild the candidates a server scored from the served records it logged.

A :class:`~online.records.ServedRecord` carries the raw inputs exactly as the server used them: dense
user and post features already in the bundle's spec order (defaults filled), ids, media type, created_at,
context and the position the post was returned at. Feeding the records of a batch back through the
same bundle's frozen extractors gives the very features the server computed (the extractors are
deterministic), so the learner never learns from a later state of the world.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from online.records import ServedRecord
from stacker.features import CandidateBatch, FeatureSpec


class RecordMismatch(ValueError):
    """A served record whose raw inputs do not fit the bundle's feature spec."""


def batch_from_records(records: Sequence[ServedRecord], spec: FeatureSpec) -> CandidateBatch:
    """One :class:`CandidateBatch` of N served records (each row its own user, time and position)."""
    n = len(records)
    u, p = len(spec.user_features), len(spec.post_features)
    media_index = {m: i for i, m in enumerate(spec.media_types)}
    try:
        uf = np.array([r.user_features for r in records], dtype=np.float32).reshape(n, u)
        pf = np.array([r.post_features for r in records], dtype=np.float32).reshape(n, p)
    except ValueError as e:
        raise RecordMismatch(f"served record features do not match the spec ({u} user, {p} post): {e}") from None
    return CandidateBatch(
        ts=np.fromiter((r.ts for r in records), np.int64, n),
        user_id=np.array([r.user_id for r in records], dtype=object),
        user_features=uf,
        post_ids=np.array([r.post_id for r in records], dtype=object),
        author_ids=np.array([r.author_id for r in records], dtype=object),
        media=np.fromiter((media_index.get(r.media_type, 0) for r in records), np.int8, n),
        created_at=np.fromiter((r.created_at for r in records), np.int64, n),
        post_features=pf,
        device=np.array([r.device for r in records], dtype=object),
        surface=np.array([r.surface for r in records], dtype=object),
        position=np.fromiter((r.position for r in records), np.int32, n))


def fits_spec(rec: ServedRecord, spec: FeatureSpec) -> bool:
    """The record's features have the spec's lengths and are finite numbers (the extractors take nothing else)."""
    if len(rec.user_features) != len(spec.user_features) or len(rec.post_features) != len(spec.post_features):
        return False
    try:
        return all(map(_fits_float32, rec.user_features)) and all(map(_fits_float32, rec.post_features))
    except (TypeError, OverflowError):  # a string, None, a list, an integer too large for a float...
        return False


def _fits_float32(v) -> bool:
    return math.isfinite(v) and -_F32_MAX <= v <= _F32_MAX


_F32_MAX = float(np.finfo(np.float32).max)
