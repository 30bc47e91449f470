"""Publishing: watchers get updates in order; applying them makes numpy serving equal VW."""
from __future__ import annotations

import numpy as np
import pytest

from online.learner import OnlineLearner
from online.publish import PublisherInUseError, UpdatePublisher, UpdateWatcher
from online.replay import replay
from online.reproduce import batch_from_records
from online.records import ServedRecord
from stacker.ranker import StackedRanker
from tests.conftest_online import WINDOW_MS, event_log, tiny_records  # noqa: F401


def test_watcher_follows_deltas_in_order_and_new_replicas_start_from_a_base(tmp_path):
    pub = UpdatePublisher(tmp_path, "b1", base_every=3, keep_bases=1)
    w = UpdateWatcher(tmp_path, "b1")
    seen = []
    for i in range(1, 8):
        pub.publish(np.array([i]), np.full((1, 2), i, np.float32), covered_offset=10 * i)
        if pub.base_due:
            pub.publish_base(np.arange(1, i + 1), np.ones((i, 2), np.float32), covered_offset=10 * i)
        seen += [(u.seq, u.kind) for u in w.poll()]
    assert seen == [(s, "delta") for s in range(1, 8)]
    fresh = [(u.seq, u.kind) for u in UpdateWatcher(tmp_path, "b1").poll()]
    assert fresh == [(6, "base"), (7, "delta")]  # deltas <= 3 pruned, base 6 then delta 7
    # One publisher per bundle's directory: a second learner publishing there is refused, naming the first.
    with pytest.raises(PublisherInUseError, match=r"another learner \(pid \d+\) publishes this bundle's updates"):
        UpdatePublisher(tmp_path, "b1", lock_timeout_s=0.1)
    pub.close()
    # A learner restart publishes a base under a new number; followers jump to it.
    pub2 = UpdatePublisher(tmp_path, "b1")
    assert pub2.seq == 7
    pub2.publish_base(np.array([1]), np.zeros((1, 2), np.float32), 80, new_seq=True)
    assert [(u.seq, u.kind) for u in w.poll()] == [(8, "base")]
    assert w.poll() == []


def test_applied_updates_make_numpy_predictions_equal_vw(tmp_path, tiny_bundle, event_log, tiny_records):
    learner = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS,
                            model_dir=tmp_path / "models", publish_every_s=0.0, base_every=2,
                            batch_size=200)
    serving = StackedRanker.load(tiny_bundle)
    watcher = UpdateWatcher(tmp_path / "models", serving.bundle_id)
    served = [r for r in tiny_records if isinstance(r, ServedRecord)][:300]
    feats = serving.features(batch_from_records(served, serving.spec))
    lines = feats.vw_lines()
    np.testing.assert_allclose(serving.predict_features(feats), learner.learners.predict(lines), atol=1e-6)
    replay(learner, event_log, progress=False, chunk=700, finish=False)  # several publishes in between
    for u in watcher.poll():
        serving.apply_update(u.rows, u.values, u.seq)
    learner.finish()
    for u in watcher.poll():
        serving.apply_update(u.rows, u.values, u.seq)
    assert serving.update_seq == learner.update_seq > 2
    vw = learner.learners.predict(lines)
    np.testing.assert_allclose(serving.predict_features(feats), vw, atol=1e-6)
    before = StackedRanker.load(tiny_bundle).predict_features(feats)
    assert np.abs(before - vw).max() > 1e-3  # the updates did change the model
    # A new replica starts from the newest base, then the deltas after it, and agrees as well.
    late_joiner = StackedRanker.load(tiny_bundle)
    ups = UpdateWatcher(tmp_path / "models", serving.bundle_id).poll()
    assert ups[0].kind == "base" and all(u.kind == "delta" for u in ups[1:])
    for v in ups:
        late_joiner.apply_update(v.rows, v.values, v.seq)
    np.testing.assert_allclose(late_joiner.predict_features(feats), vw, atol=1e-6)
    learner.close()
