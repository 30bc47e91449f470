"""Online learner: features reproduced from served records, progressive validation, publishing, downsampling."""
from __future__ import annotations

import json

import numpy as np
import pytest

from online.learner import OnlineLearner, nonzero_rows
from online.publish import UpdateWatcher, read_update
from online.records import ServedRecord
from online.replay import read_records, replay
from online.reproduce import batch_from_records
from stacker.bundle import VW_MODEL
from stacker.features import CandidateBatch
from stacker.ranker import StackedRanker
from tests.conftest_online import WINDOW_MS, event_log, redis_url, tiny_records  # noqa: F401


def test_features_from_served_records_equal_serve_time_features(tiny_bundle):
    r = StackedRanker.load(tiny_bundle)
    rng = np.random.default_rng(0)
    n, u, p = 40, len(r.spec.user_features), len(r.spec.post_features)
    uf = rng.normal(size=u).astype(np.float32)
    batch = CandidateBatch(ts=1_700_000_123_456, user_id="u42", user_features=uf,
                           post_ids=np.array([f"p{i}" for i in range(n)], object),
                           author_ids=np.array([f"a{i % 7}" for i in range(n)], object),
                           media=rng.integers(0, len(r.spec.media_types), n).astype(np.int8),
                           created_at=1_700_000_000_000 - rng.integers(0, 10**8, n),
                           post_features=rng.normal(size=(n, p)).astype(np.float32), device="ios",
                           surface="explore", position=np.arange(n, dtype=np.int32))
    served = r.features(batch)
    records = [ServedRecord("req", f"p{i}", "u42", f"a{i % 7}", i, 1_700_000_123_456, r.bundle_id, 3,
                            r.spec.media_types[batch.media[i]], int(batch.created_at[i]), "ios", "explore",
                            uf.tolist(), batch.post_features[i].tolist()) for i in range(n)]
    # Through JSON, as the event log stores them.
    records = [ServedRecord.from_dict(json.loads(json.dumps(x.to_dict()))) for x in records]
    again = r.features(batch_from_records(records, r.spec))
    for name in ("dense", "leaves", "hidden", "ids", "context"):
        np.testing.assert_array_equal(getattr(served, name), getattr(again, name), err_msg=name)
    assert served.vw_lines() == again.vw_lines()


def test_log_to_learner_to_published_weights(tmp_path, tiny_bundle, event_log, tiny_records):
    learner = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS,
                            model_dir=tmp_path / "models", publish_every_s=0.0)
    out = replay(learner, event_log, progress=False)
    assert out["learned_examples"] == learner.joiner.stats.examples > 3_000
    assert sum(learner.task_learned.values()) > 0
    prog = learner.metrics.get()
    assert set(prog) == set(learner.tasks)
    assert prog["click"]["overall"]["count"] == learner.task_learned["click"] == 3_000
    assert 0.3 < prog["click"]["overall"]["ne"] < 1.5
    # Every task learned each impression exactly once; VW (whose counter lives in the workspace that
    # parses and finishes examples) counted exactly the examples learned.
    r0 = OnlineLearner(tiny_bundle, tmp_path / "fresh")
    before = r0.vw_weighted_examples()
    r0.close()
    after = learner.vw_weighted_examples()
    assert learner.task_learned == dict.fromkeys(learner.tasks, 3_000)
    assert after["all"] - before["all"] == out["learned_examples"]  # one parsed example per row, every task
    updates = UpdateWatcher(tmp_path / "models", learner.bundle_id).poll()
    assert updates and [u.seq for u in updates] == list(range(1, len(updates) + 1))
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["update_seq"] == learner.update_seq == updates[-1].seq
    assert status["lag"] == 0 and status["join"]["examples"] == out["learned_examples"]
    assert status["progressive"]["click"]["overall"]["count"] == 3_000
    learner.close()


def test_leaf_rows_go_out_on_their_own_cadence_and_every_base_holds_them(tmp_path, tiny_bundle, event_log):
    """Publishing holds the GBDT leaves' rows back for ``leaves_every_s`` (ids' rows go out at once); an
    explicit publish ships them, and a base written while some are held back includes them."""
    learner = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS,
                            model_dir=tmp_path / "models", publish_every_s=0.0)
    tr = learner.trainer
    tr.leaves_every_s = 3600.0
    r = learner.ranker
    records = list(read_records(event_log))
    learner.process(records[:1500])
    assert tr._has_dirty_leaves and not tr._has_dirty  # process() published all but the leaves
    watcher = UpdateWatcher(tmp_path / "models", learner.bundle_id)
    shipped = np.concatenate([u.rows for u in watcher.poll()])
    sample = next(iter(r.features(batch_from_records([records[0][1]], r.spec)).leaves))
    leaf_rows = np.unique(r.scorer.rows_of(r.scorer.index("l", sample[None, :])))
    held = np.flatnonzero(tr._dirty_leaves)
    assert len(held) > 0 and set(leaf_rows) <= set(held)
    only_leaves = np.setdiff1d(held, shipped)  # (the tiny bundle's few bits make some rows shared)
    assert len(only_leaves) > len(held) // 2
    assert not np.array_equal(r.scorer.weights[only_leaves], tr.learners.get_weights(only_leaves))

    # More publishes until a base is due: the base holds the rows held back, as VW has them.
    learner.process(records[1500:])
    updates = tr.publisher.dir
    assert not list(updates.glob("base-*.npz"))
    tr.publisher.base_every = 1
    tr._has_dirty = True  # as if an example had been learned: a delta without the leaves, then a base
    tr.publish(leaves=False)
    base = read_update(sorted(updates.glob("base-*.npz"))[-1])
    assert not tr._dirty_leaves.any()
    vw = tr.learners.get_weights(held)
    np.testing.assert_array_equal(r.scorer.weights[held], vw)
    in_base = np.searchsorted(base.rows, held)
    np.testing.assert_array_equal(base.rows[in_base], held)
    np.testing.assert_array_equal(base.values[in_base], vw)
    # The base holds every row that differs from zero in the served copy (and the bundle's rows).
    w = r.scorer.weights
    assert set(np.flatnonzero(np.any(w != 0, axis=1))) <= set(base.rows)
    np.testing.assert_array_equal(base.values, w[base.rows])
    np.testing.assert_array_equal(nonzero_rows(w), np.any(w != 0, axis=1))
    learner.close()


def test_restart_from_checkpoint_continues_without_relearning(tmp_path, tiny_bundle, event_log):
    a = OnlineLearner(tiny_bundle, tmp_path / "a", attribution_window_ms=WINDOW_MS)
    replay(a, event_log, progress=False)
    b = OnlineLearner(tiny_bundle, tmp_path / "b", attribution_window_ms=WINDOW_MS)
    replay(b, event_log, progress=False, chunk=500, stop_after=2_500)
    assert b.joiner.open_count > 0
    b.close()
    b = OnlineLearner(tiny_bundle, tmp_path / "b", attribution_window_ms=WINDOW_MS)
    assert b.replay_from < 2_500 and b.learned_through == 2_499
    replay(b, event_log, progress=False)
    assert b.task_learned == a.task_learned
    assert b.counters["learned_examples"] == a.counters["learned_examples"]
    assert b.joiner.stats == a.joiner.stats
    # Same examples in the same order: the resumed models equal the uninterrupted ones (up to the
    # float rounding of VW's save/resume state).
    np.testing.assert_allclose(b.learners.weights(), a.learners.weights(), atol=1e-5)
    a.close()
    b.close()


def test_downsampling_drops_only_all_negative_finals_and_stays_calibrated(tmp_path, tiny_bundle, event_log):
    full = OnlineLearner(tiny_bundle, tmp_path / "full", attribution_window_ms=WINDOW_MS, audit=True)
    replay(full, event_log, progress=False)
    ds = OnlineLearner(tiny_bundle, tmp_path / "ds", attribution_window_ms=WINDOW_MS, downsample_rate=0.25,
                       audit=True)
    replay(ds, event_log, progress=False)

    def audit(d):
        rows = [line.split("\t") for p in sorted((d / "audit").glob("*.tsv")) for line in p.read_text().splitlines()]
        return {(r[1], r[2], r[3]): float(r[4]) for r in rows}
    a, b = audit(tmp_path / "full"), audit(tmp_path / "ds")
    assert set(b) <= set(a)
    dropped = set(a) - set(b)
    assert ds.counters["downsampled_out"] == len(dropped) > 0.5 * len(a) * 0.5
    assert all(k[2] == ",".join(ds.tasks) for k in dropped)  # a final example learning every task ...
    # ... of an impression with no positive at all (no early example of the same key)
    keys_with_early = {(k[0], k[1]) for k in a if k[2] != ",".join(ds.tasks)}
    assert not {(k[0], k[1]) for k in dropped} & keys_with_early
    assert all(w == 4.0 for k, w in b.items() if k in a and k[2] == ",".join(ds.tasks)
               and (k[0], k[1]) not in keys_with_early)
    # Importance weights keep the (weighted) calibration of learning from every example: what the
    # tiny 20-tree bundle predicts on this stream is off either way, downsampling must not move it.
    for t in ("click", "dwell"):
        p, y = ds.weighted[t]
        pf, yf = full.weighted[t]
        assert abs((p / y) / (pf / yf) - 1) < 0.1, (t, p / y, pf / yf)
    full.close()
    ds.close()


def test_fast_batch_text_means_the_same_to_vw_as_example_lines(tiny_bundle, tiny_records):
    from stacker.vwstack import learn_text
    from stacker.vwtext import batch_text
    f, labels, mask, weights, (a, b) = _random_batch(tiny_bundle, tiny_records, 400, 1, 0.2, 0.8)
    pa = a.learn(f.vw_lines(), labels, mask, weights)
    pb = learn_text(b, batch_text(f.leaves, f.hidden, f.ids, f.context, f.values, interactions=f.interactions),
                    labels, mask, weights)
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(a.weights(), b.weights())
    a.close()
    b.close()


def test_learner_following_a_new_bundle_archives_the_old_checkpoints(tmp_path, tiny_bundle, other_bundle,
                                                                     event_log):
    """A state directory holding another bundle's checkpoints is refused, unless the learner follows
    its server's bundle (``archive_foreign``): then they are moved to ``archive/`` intact, and moved back
    when the server returns to that bundle."""
    import pytest

    state = tmp_path / "state"
    a = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS)
    replay(a, event_log, progress=False)
    old_id, learned = a.bundle_id, a.counters["learned_examples"]
    a.close()
    with pytest.raises(ValueError, match=f"checkpoint is for bundle {old_id}"):
        OnlineLearner(other_bundle, state, attribution_window_ms=WINDOW_MS)
    b = OnlineLearner(other_bundle, state, attribution_window_ms=WINDOW_MS, archive_foreign=True)
    assert b.bundle_id != old_id and b.replay_from == 0 and b.counters.get("learned_examples", 0) == 0
    b.close()
    (archived,) = (state / "archive").iterdir()
    assert archived.name.startswith(old_id + "-")
    # Back on the old bundle (a rollback), the learner that follows its server moves them back and resumes
    # from them as if nothing had happened, instead of starting over from the bundle as trained.
    c = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS, archive_foreign=True)
    assert c.counters["learned_examples"] == learned and c.replay_from > 0
    assert not list((state / "archive").glob(old_id + "-*"))
    c.close()
    # archived again, then damaged: the learner back on that bundle starts afresh instead of failing
    OnlineLearner(other_bundle, state, attribution_window_ms=WINDOW_MS, archive_foreign=True).close()
    (archived,) = (state / "archive").glob(old_id + "-*")
    damaged = next(p for p in (archived / "checkpoints").rglob("*") if p.is_file() and p.suffix != ".json")
    damaged.write_bytes(damaged.read_bytes()[:10])
    d = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS, archive_foreign=True)
    assert d.replay_from == 0 and d.counters.get("learned_examples", 0) == 0
    d.close()


@pytest.mark.parametrize("namespaces", ["ldupac", "l", "d", "upac"])
def test_fast_batch_text_subsets_predict_like_example_lines(tiny_bundle, tiny_records, namespaces):
    """Offline training and evaluation write ablation variants (leaves only, DNN only, ids only) with the
    fast writer: VW must score its text exactly as it scores example_lines."""
    from online.learner import vw_config
    from stacker.vwstack import TaskLearners, example_lines, predict_text
    from stacker.vwtext import batch_text
    r = StackedRanker.load(tiny_bundle)
    served = [x for x in tiny_records if isinstance(x, ServedRecord)][:300]
    f = r.features(batch_from_records(served, r.spec))
    learners = TaskLearners(r.tasks, vw_config(r.manifest), tiny_bundle / VW_MODEL)
    slow = learners.predict(example_lines(f.leaves, f.hidden, f.ids, f.context, namespaces, f.values, f.interactions))
    fast = predict_text(learners, batch_text(f.leaves, f.hidden, f.ids, f.context, f.values, namespaces, f.interactions))
    learners.close()
    np.testing.assert_array_equal(slow, fast)
    assert fast.shape == (len(served), len(r.tasks)) and np.ptp(fast[:, 0]) > 0


def test_switching_a_parsed_row_from_task_to_task_learns_as_one_parsed_example_per_task(tiny_bundle, tiny_records):
    """learn_text parses a row once and switches it from task to task in place; VW must learn and score
    exactly as if each (row, task) were its own text line carrying that task's tokens: the same
    progressive predictions (a row's later shared tasks scored before the row is learned) and the same
    weights. Random task masks switch between shared tasks and hide (which drops the shared token)."""
    from stacker.vwstack import learn_text
    from stacker.vwtext import batch_text
    f, labels, mask, weights, (fast, ref) = _random_batch(tiny_bundle, tiny_records, 300, 7, 0.3, 0.7)
    text = batch_text(f.leaves, f.hidden, f.ids, f.context, f.values, interactions=f.interactions)
    assert ref.shared.any() and not ref.shared.all()
    got = learn_text(fast, text, labels, mask, weights)

    lib, ws = ref._pylibvw, ref.workspace

    def run(line: bytes, k: int, label: bytes, learn: bool) -> float:
        (ex,) = ws._parse(label + ref._tokens[k] + line + b"\n")
        (lib.vw.learn if learn else lib.vw.predict)(ws, ex)
        p = lib.example.get_simplelabel_prediction(ex)
        lib.vw._finish_example(ws, ex)
        return p

    want = np.full(labels.shape, np.nan)
    for i, line in enumerate(text.split(b"\n")[:len(labels)]):
        todo = np.flatnonzero(mask[i]).tolist()
        scored = [k for k in todo if ref.shared[k]][1:]
        for k in scored:
            want[i, k] = run(line, k, b"", learn=False)
        for k in todo:
            p = run(line, k, b"%d %g " % (1 if labels[i, k] else -1, weights[i]), learn=True)
            if k not in scored:
                want[i, k] = p
    assert np.isnan(got).sum() == (~mask).sum()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast.weights(), ref.weights(), rtol=0, atol=1e-6)
    fast.close()
    ref.close()


def _random_batch(bundle, records, n: int, seed: int, p_label: float, p_learn: float):
    """Features of ``n`` served records with random labels, task masks and importance weights (1 or 4),
    and two learners resumed from the same bundle."""
    from online.learner import vw_config
    from stacker.vwstack import TaskLearners
    r = StackedRanker.load(bundle)
    served = [x for x in records if isinstance(x, ServedRecord)][:n]
    f = r.features(batch_from_records(served, r.spec))
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(len(served), len(r.tasks))) < p_label).astype(np.int8)
    mask = rng.uniform(size=labels.shape) < p_learn
    weights = np.where(rng.uniform(size=len(served)) < 0.5, 1.0, 4.0)
    learners = tuple(TaskLearners(r.tasks, vw_config(r.manifest), bundle / VW_MODEL) for _ in range(2))
    return f, labels, mask, weights, learners


def test_a_shifted_bias_moves_every_score_by_its_shift_and_learning_goes_on_from_it(tmp_path, tiny_bundle,
                                                                                     tiny_records):
    """``TaskLearners.shift_biases`` (the LR's bias refit after training) moves each task's logit by its
    shift, in VW and in the served numpy copy of the weights alike; FTRL's state follows the new weight,
    so a saved and resumed model learning again goes on from the shifted bias instead of snapping back."""
    from online.learner import vw_config
    from stacker.vwstack import SparseScorer, TaskLearners, predict_text, token_index
    from stacker.vwtext import batch_text
    f, labels, mask, weights, (a, b) = _random_batch(tiny_bundle, tiny_records, 300, 2, 0.2, 1.0)
    b.close()
    text = batch_text(f.leaves, f.hidden, f.ids, f.context, f.values, interactions=f.interactions)
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    before = predict_text(a, text)
    shifts = np.linspace(-1.0, 1.0, len(a.tasks))
    a.shift_biases(shifts)
    after = predict_text(a, text)
    np.testing.assert_allclose(logit(after) - logit(before), np.broadcast_to(shifts, after.shape), atol=2e-4)
    r = StackedRanker.load(tiny_bundle)
    scorer = SparseScorer(a.weights(), a.namespace_hashes(), a.config, a.tasks,
                          leaf_space=r.extractor.trees * r.extractor.node_stride)
    np.testing.assert_allclose(scorer.predict(f.leaves, f.hidden, f.ids, f.context), after, rtol=1e-5, atol=1e-7)

    a.save(tmp_path / "shifted.model")
    a.close()
    config = vw_config(r.manifest)
    resumed = TaskLearners(r.tasks, config, tmp_path / "shifted.model")
    np.testing.assert_allclose(predict_text(resumed, text), after, rtol=1e-6)
    bias = [token_index(k, config.bits) for k in range(len(r.tasks))]
    shifted = np.array([resumed.workspace.get_weight(i, 0) for i in bias])
    one = slice(0, 1)
    resumed.learn(f.vw_lines()[one], labels[one], np.ones((1, len(r.tasks)), bool))
    learned = np.array([resumed.workspace.get_weight(i, 0) for i in bias])
    resumed.close()
    # one example moves a bias by a small step, far less than the shifts (up to 1) it would lose if FTRL's
    # state still described the bias before the shift
    assert np.all(learned != shifted) and np.max(np.abs(learned - shifted)) < 0.05, learned - shifted


def test_a_learner_on_a_snapshot_goes_on_from_the_weights_it_serves(tmp_path, tiny_bundle, event_log):
    """A snapshot holds the weights its source learned online beside the source's VW model as trained: a
    learner started on it takes the served weights into VW, so what it publishes does not undo them."""
    from serving.snapshot import write_snapshot
    from stacker.ranker import StackedRanker
    source = OnlineLearner(tiny_bundle, tmp_path / "a", attribution_window_ms=WINDOW_MS)
    replay(source, event_log, progress=False, chunk=500, stop_after=2_000)
    served = StackedRanker.load(tiny_bundle)
    served.scorer.weights[:] = source.learners.weights()          # as the server holds them after updates
    snapshot = write_snapshot(served, tmp_path / "snapshots")
    learned = np.flatnonzero(np.any(served.scorer.weights != StackedRanker.load(tiny_bundle).scorer.weights, axis=1))
    assert len(learned) > 100
    on_snapshot = OnlineLearner(snapshot, tmp_path / "s", attribution_window_ms=WINDOW_MS)
    np.testing.assert_array_equal(on_snapshot.learners.weights(), served.scorer.weights)
    # FTRL's z matches each weight taken in, so the next update of a coordinate starts from it
    ws, cfg = on_snapshot.learners.workspace, on_snapshot.learners.config
    for i in learned[:50].tolist():
        for k in np.flatnonzero(served.scorer.weights[i]).tolist():
            index, w = k * on_snapshot.learners.rows + i, float(served.scorer.weights[i, k])
            n = ws.get_weight(index, 2)
            assert ws.get_weight(index, 1) == pytest.approx(
                -w * (cfg.l2 + (cfg.ftrl_beta + np.sqrt(n)) / cfg.ftrl_alpha), rel=1e-5, abs=1e-9)
    for learner in (source, on_snapshot):
        learner.close()


def _log(path, records):
    from online.eventlog import EventLog
    with EventLog(path, fsync=False) as log:
        log.append(records)
    return path


def _learned_fresh(tmp_path, bundle, records, name: str) -> int:
    fresh = OnlineLearner(bundle, tmp_path / name, attribution_window_ms=WINDOW_MS)
    replay(fresh, _log(tmp_path / f"{name}-log", records), progress=False)
    fresh.close()
    return fresh.counters["learned_examples"]


def test_a_learner_resumed_on_another_log_at_its_path_reads_that_log_from_its_start(tmp_path, tiny_bundle,
                                                                                  tiny_records, caplog):
    import shutil
    first, second = tiny_records[:4_000], tiny_records[4_000:]
    path = _log(tmp_path / "log", first)
    a = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    replay(a, path, progress=False)
    before, weights = a.counters["learned_examples"], a.learners.weights()
    a.close()
    shutil.rmtree(path)                       # the old log is gone; a new one starts at offset 0
    _log(path, second)
    assert len(second) < len(first)           # every offset of the new log is below the checkpoint's
    b = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    assert b.replay_from == 4_000
    np.testing.assert_allclose(b.learners.weights(), weights, atol=1e-5)   # what was learned is kept
    replay(b, path, progress=False)
    assert "another event log" in caplog.text
    learned = b.counters["learned_examples"] - before
    assert learned == _learned_fresh(tmp_path, tiny_bundle, second, "fresh") > 100
    assert b.counters["log_rebased"] == 1
    b.close()
    # The checkpoint now counts in the new log: resuming on it again reads nothing twice.
    c = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    replay(c, path, progress=False)
    assert c.counters["learned_examples"] == b.counters["learned_examples"]
    assert c.counters["log_rebased"] == 1
    c.close()


def _restored_copy(tmp_path, bundle, records):
    """A learner learns a log of 4,000 records, which is then restored from a copy taken at 2,000 (the same
    log id); returns the log, the examples learned, and 2,000 more records to append."""
    import shutil

    from online.eventlog import EventLog
    one, two, three = records[:2_000], records[2_000:4_000], records[4_000:6_000]
    path = _log(tmp_path / "log", one)
    shutil.copytree(path, tmp_path / "backup")
    with EventLog(path, fsync=False) as log:
        log.append(two)
    a = OnlineLearner(bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    replay(a, path, progress=False)
    before = a.counters["learned_examples"]
    assert a.learned_through == 3_999
    a.close()
    shutil.rmtree(path)
    shutil.copytree(tmp_path / "backup", path)
    return path, before, three


def test_a_learner_resumed_on_its_log_restored_from_an_older_copy_learns_what_is_appended(tmp_path, tiny_bundle,
                                                                                       tiny_records, caplog):
    from online.eventlog import EventLog
    path, before, three = _restored_copy(tmp_path, tiny_bundle, tiny_records)
    with EventLog(path, fsync=False) as log:
        assert log.append(three)[0] == 2_000
    b = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    replay(b, path, progress=False)
    assert "(2000 records are no longer in the log" in caplog.text
    assert b.learned_through == 3_999
    # ``three`` joins only with itself: the impressions of ``two`` closed when the first replay finished.
    assert b.counters["learned_examples"] - before == _learned_fresh(tmp_path, tiny_bundle, three, "fresh") > 100
    b.close()


def test_the_pipelined_learner_reads_a_new_log_at_its_path_from_its_start(tmp_path, tiny_bundle, tiny_records):
    import shutil

    from online.pipeline import PipelinedLearner
    first, second = tiny_records[:4_000], tiny_records[4_000:]
    path = _log(tmp_path / "log", first)
    a = PipelinedLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    before = a.replay(path)["learned_examples"]
    a.close()
    shutil.rmtree(path)
    _log(path, second)
    b = PipelinedLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    out = b.replay(path)
    b.close()
    assert out["learned_examples"] - before == _learned_fresh(tmp_path, tiny_bundle, second, "fresh") > 100
    assert out["log_rebased"] == 1


def test_a_restart_keeps_the_events_logged_before_their_served_record(tmp_path, tiny_bundle, tiny_records):
    """The server logs served records in batches and events at once, so a view often precedes its served
    record in the log. A learner stopped anywhere and resumed learns exactly what an uninterrupted one
    learns: the replay starts at such an event, not at the served record it waits for."""
    from online.records import ServedRecord
    delayed, held = [], []
    for rec in tiny_records:                  # every served record written 40 records late
        if isinstance(rec, ServedRecord):
            held.append([rec, 40])
        else:
            delayed.append(rec)
        for h in held:
            h[1] -= 1
        while held and held[0][1] <= 0:
            delayed.append(held.pop(0)[0])
    delayed.extend(r for r, _ in held)
    path = _log(tmp_path / "log", delayed)
    ref = OnlineLearner(tiny_bundle, tmp_path / "ref", attribution_window_ms=WINDOW_MS)
    replay(ref, path, progress=False)
    assert ref.joiner.stats.expired_unviewed < ref.joiner.stats.served // 2   # most views do join
    state = tmp_path / "state"
    for stop in (700, 1_900, 3_100, 4_300):   # stopped (a checkpoint), resumed, four times
        b = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS)
        replay(b, path, progress=False, chunk=100, stop_after=stop - b.replay_from)
        b.close()
    b = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS)
    replay(b, path, progress=False)
    assert b.joiner.stats == ref.joiner.stats
    assert b.task_learned == ref.task_learned
    assert b.counters["learned_examples"] == ref.counters["learned_examples"]
    # Progressive metrics go on across the restarts (the checkpoint holds them)
    got, want = b.progressive(0.0), ref.progressive(0.0)
    for task in ("click", "like"):
        assert got[task]["overall"]["count"] == want[task]["overall"]["count"] > 0
        assert got[task]["overall"]["ne"] == pytest.approx(want[task]["overall"]["ne"], rel=1e-4)
        assert got[task]["recent"]["count"] == want[task]["recent"]["count"]
    b.close()
    ref.close()


def test_a_pause_in_traffic_stamped_in_the_past_does_not_make_what_follows_late(tmp_path, tiny_bundle,
                                                                                 tiny_records):
    """A live log of records stamped with times far from the wall clock (a simulation or a backfill through
    a live server) that goes quiet: event time moves on by the wall time elapsed, not to the wall clock,
    so the records after the pause are learned as an uninterrupted replay learns them (they were all late)."""
    import threading
    import time

    from online.eventlog import EventLog
    from online.replay import follow_log
    ref = OnlineLearner(tiny_bundle, tmp_path / "ref", attribution_window_ms=WINDOW_MS)
    replay(ref, _log(tmp_path / "whole", tiny_records), progress=False)
    ref.close()
    live = tmp_path / "live"
    writer = EventLog(live, fsync=False)
    writer.append(tiny_records[:3_000])
    learner = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    stop = threading.Event()
    t = threading.Thread(target=follow_log, args=(learner, live),
                         kwargs={"poll_s": 0.02, "idle_close_s": 0.3, "should_stop": stop.is_set})
    t.start()
    try:
        time.sleep(1.5)                                   # quiet for longer than idle_close_s
        writer.append(tiny_records[3_000:])
        time.sleep(1.5)
    finally:
        stop.set()
        t.join(30)
        writer.close()
    learner.finish()
    assert learner.joiner.stats.late <= ref.joiner.stats.late + 30
    assert learner.counters["learned_examples"] >= 0.98 * ref.counters["learned_examples"]
    learner.close()


def test_a_running_follower_whose_log_is_replaced_learns_the_new_log_once(tmp_path, tiny_bundle, tiny_records):
    """The server's log is deleted and a new one started while the learner follows it: the learner notices,
    checkpoints, attaches again and learns the new log from its start; restarted later, it learns nothing
    twice (it went on reading the new log at the old offsets, under the old log's id)."""
    import json
    import shutil
    import threading
    import time

    from online.runner import run_follow
    first, second = tiny_records[:4_000], tiny_records[4_000:]
    want_first = _learned_fresh(tmp_path, tiny_bundle, first, "ref1")
    want_second = _learned_fresh(tmp_path, tiny_bundle, second, "ref2")
    path, state = _log(tmp_path / "log", first), tmp_path / "state"

    def learned() -> int:
        try:
            return json.loads((state / "status.json").read_text())["counters"]["learned_examples"]
        except (OSError, ValueError, KeyError):
            return -1

    def follow_until(n: int) -> None:
        stop = threading.Event()
        t = threading.Thread(target=run_follow, kwargs=dict(
            log_dir=path, bundle_dir=tiny_bundle, state_dir=state, model_dir=None, attribution_window_ms=WINDOW_MS,
            allowed_lateness_ms=100, idle_close_s=0.2, stop_event=stop))
        t.start()
        try:
            deadline = time.time() + 60
            while learned() < n and time.time() < deadline:
                time.sleep(0.05)
            if n == want_first:
                shutil.rmtree(path)                      # the server's log is replaced under the learner
                _log(path, second)
                deadline = time.time() + 60
                while learned() < n + want_second and time.time() < deadline:
                    time.sleep(0.05)
            time.sleep(1.0)                              # and nothing more comes
        finally:
            stop.set()
            t.join(60)

    follow_until(want_first)
    assert learned() == want_first + want_second
    follow_until(want_first + want_second)               # restarted: nothing learned twice
    assert learned() == want_first + want_second


def test_a_log_directory_not_there_yet_is_not_taken_for_a_log_that_lost_its_records(tmp_path, tiny_bundle,
                                                                                    tiny_records, caplog):
    """Resumed on an empty log directory (a volume mounted late, a server not started yet), the learner does
    not re-base: when the same log comes back, nothing is learned twice."""
    import os
    path = _log(tmp_path / "log", tiny_records)
    a = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    replay(a, path, progress=False)
    learned = a.counters["learned_examples"]
    a.close()
    os.rename(path, tmp_path / "away")
    path.mkdir()
    b = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    assert b.attach_log(path) is None and b.counters["log_rebased"] == 0
    assert not b.front.log_changed(path)
    path.rmdir()
    os.rename(tmp_path / "away", path)                 # the same log is back
    replay(b, path, progress=False)
    assert b.counters["learned_examples"] == learned and b.counters["log_rebased"] == 0
    assert "lost records" not in caplog.text
    b.close()


def test_a_learner_attached_to_its_restored_log_before_the_server_reopens_it_rebases_once(tmp_path, tiny_bundle,
                                                                                        tiny_records):
    """The other order: the learner looks first (the copy's end tells it), then the server reopens the copy
    and appends; the reopen is not taken for a second loss."""
    from online.eventlog import EventLog
    path, before, three = _restored_copy(tmp_path, tiny_bundle, tiny_records)
    b = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS)
    assert "(2000 records are no longer in the log" in b.attach_log(path)
    with EventLog(path, fsync=False) as log:                 # the server reopens it and appends
        assert log.append(three)[0] == 2_000
    assert b.front.log_changed(path)                         # a follower attaches again:
    assert b.attach_log(path) is None                         # the reopen lost nothing more
    replay(b, path, progress=False)
    assert b.counters["log_rebased"] == 1
    assert b.counters["learned_examples"] - before == _learned_fresh(tmp_path, tiny_bundle, three, "fresh")
    b.close()


def test_a_reopen_between_the_check_and_the_read_is_caught_and_nothing_is_learned_twice(tmp_path, tiny_bundle,
                                                                                       tiny_records, monkeypatch):
    """The server reopens its log and appends just after the follower checked it and before it reads: the
    follower re-checks after reading, drops what it read and attaches again, so the restart is not taken
    for a loss and nothing is learned twice."""
    import threading
    import time

    from online.eventlog import EventLog
    from online.learner import Featurizer
    from online.replay import follow_log
    path, state = _log(tmp_path / "log", tiny_records[:3_000]), tmp_path / "state"
    original, calls = Featurizer.log_changed, {"n": 0}

    def racing(self, where):
        changed = original(self, where)
        calls["n"] += 1
        if calls["n"] == 3:                       # checked; now the server restarts and appends
            with EventLog(path, fsync=False) as log:
                log.append(tiny_records[3_000:3_060])
        return changed
    monkeypatch.setattr(Featurizer, "log_changed", racing)
    stop, restarts = threading.Event(), []

    def follower():
        while not stop.is_set():
            learner = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS)
            try:
                again = follow_log(learner, path, poll_s=0.02, idle_close_s=None, should_stop=stop.is_set)
            finally:
                learner.close()
            restarts.append(again)
            if not again:
                return
    t = threading.Thread(target=follower)
    t.start()
    time.sleep(2.0)
    stop.set()
    t.join(60)
    assert restarts[:1] == [True]                   # it noticed and attached again
    with EventLog(path, fsync=False) as log:        # the rest arrives; one last learner finishes the log
        log.append(tiny_records[3_060:])
    b = OnlineLearner(tiny_bundle, state, attribution_window_ms=WINDOW_MS)
    replay(b, path, progress=False)
    assert b.counters["log_rebased"] == 0
    assert b.counters["learned_examples"] == _learned_fresh(tmp_path, tiny_bundle, tiny_records, "ref")
    b.close()
