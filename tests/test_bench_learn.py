"""``feedrank bench learn``: every source measured in rounds over one workload, reported by its median."""
from __future__ import annotations

import numpy as np
import pytest


def test_bench_learn_reports_the_median_of_its_rounds_beside_bare_pylibvw(tiny_bundle):
    from online.bench import bench_learn
    results = bench_learn(n=4_000, bundle=tiny_bundle, progress=False, redis=False, single=False, repeat=2)
    by = {r["source"]: r for r in results}
    assert list(by) == ["log", "bare_vw"]
    log, bare = by["log"], by["bare_vw"]
    assert log["examples"] == bare["examples"] > 0            # the same joined examples, every source
    for r in (log, bare):
        assert len(r["runs_events_per_s"]) == 2 and r["tasks"] == 6
        assert r["events_per_s"] == pytest.approx(np.median(r["runs_events_per_s"]), rel=1e-5) and r["events_per_s"] > 0
    assert "vs_bare" in log and "vs_bare" not in bare
    assert log["vs_bare"] > 0 and log["updates"] >= 1 and log["processes"] == 2
