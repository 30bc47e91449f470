"""Greedy re-ranking: seen posts dropped, repetition penalised, both implementations agree."""
from __future__ import annotations

import numpy as np
import pytest

from serving.rerank import RerankPolicy, _penalise, rerank


def reference(ev, authors, media, keep, limit, policy):
    """Straight from the definition: at each position the best penalised score wins."""
    left = [i for i in range(len(ev)) if keep[i]]
    order, final = [], []
    for _ in range(min(limit, len(left))):
        def adj(i):
            s = ev[i]
            if order and authors[i] == authors[order[-1]]:
                s = _penalise(np.array([s]), policy.author_mult, policy.author_add)[0]
            if order and media[i] == media[order[-1]]:
                s = _penalise(np.array([s]), policy.media_mult, policy.media_add)[0]
            return s
        best = max(left, key=lambda i: (adj(i), -left.index(i)))
        final.append(adj(best))
        order.append(best)
        left.remove(best)
    return order, final


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("policy", [RerankPolicy(), RerankPolicy(0.5, 0.1, 0.9, 0.05), RerankPolicy(1.2, -0.1)])
def test_greedy_matches_the_definition(seed, policy):
    rng = np.random.default_rng(seed)
    n = 80
    ev = rng.normal(0.5, 1.0, n)
    authors, media = rng.integers(0, 6, n), rng.integers(0, 3, n)
    keep = rng.uniform(size=n) > 0.1
    order, final = rerank(ev, authors, media, np.zeros(n), keep, 30, policy)
    ref_order, ref_final = reference(ev, authors, media, keep, 30, policy)
    assert order.tolist() == ref_order
    np.testing.assert_allclose(final, ref_final)


def test_seen_dropped_and_same_author_pushed_down():
    ev = np.array([3.0, 2.9, 2.0, 1.0])
    authors = np.array([0, 0, 1, 2])
    order, _ = rerank(ev, authors, np.zeros(4), np.zeros(4), np.array([True, True, True, False]), 10,
                      RerankPolicy(author_mult=0.5, media_mult=1.0))
    assert order.tolist() == [0, 2, 1]


def test_freshness_boost_prefers_new_posts():
    ev = np.array([1.0, 0.95])
    order, _ = rerank(ev, np.arange(2), np.arange(2), np.array([48.0, 0.0]), np.ones(2, bool), 2,
                      RerankPolicy(freshness_boost=0.5, freshness_half_life_h=6.0))
    assert order.tolist() == [1, 0]
