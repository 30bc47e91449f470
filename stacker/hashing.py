"""The one id hash used everywhere ids enter a model.

User, post and author ids (and context tokens) are strings on the wire. Inside, each is hashed with
BLAKE2b to 64 bits (little-endian digest, ``digest_size=8``); the low 31 bits become the integer
feature name given to Vowpal Wabbit, which adds the namespace hash and masks to ``-b`` bits. Two
distinct ids collide in the 31-bit name space with probability 2**-31 per pair; what matters in
practice is the ``-b``-bit weight table, whose expected collision rate the manifest records.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

HASH_NAME = "blake2b-64, low 31 bits as VW integer feature name"
ID_BITS = 31
_ID_MASK = (1 << ID_BITS) - 1


def id_hash64(value: str) -> int:
    """64-bit BLAKE2b of the UTF-8 string, as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


@lru_cache(maxsize=1 << 18)
def vw_id(value: str) -> int:
    """The integer feature name of an id (cached: users, authors and tokens repeat)."""
    return id_hash64(value) & _ID_MASK


def vw_ids(values) -> np.ndarray:
    """Vector of integer feature names (uint64) for a sequence of string ids."""
    return np.fromiter((vw_id(v) for v in values), dtype=np.uint64, count=len(values))


def collision_rate(n_features: int, bits: int) -> float:
    """Expected share of features sharing a weight with another, for n features in 2**bits slots."""
    slots = float(1 << bits)
    return float(1.0 - np.exp(-max(n_features - 1, 0) / slots))
