"""The two-process learner: same learning as the single-process one, restarts, and live following."""
from __future__ import annotations

import multiprocessing
import time

import numpy as np

from online.checkpoint import load_latest
from online.eventlog import EventLog
from online.learner import OnlineLearner
from online.pipeline import PipelinedLearner
from online.publish import UpdateWatcher
from online.records import ServedRecord
from online.replay import replay
from online.reproduce import batch_from_records
from stacker.ranker import StackedRanker
from tests.conftest_online import WINDOW_MS, event_log, tiny_records  # noqa: F401


def test_pipeline_learns_exactly_what_the_single_process_learner_learns(tmp_path, tiny_bundle, event_log,
                                                                        tiny_records):
    ref = OnlineLearner(tiny_bundle, tmp_path / "ref", attribution_window_ms=WINDOW_MS, batch_size=300)
    replay(ref, event_log, progress=False)
    with PipelinedLearner(tiny_bundle, tmp_path / "pipe", attribution_window_ms=WINDOW_MS,
                          model_dir=tmp_path / "models", publish_every_s=0.0, batch_size=300) as pipe:
        out = pipe.replay(event_log)
        assert out["records"] == len(tiny_records)
        assert out["learned_examples"] == ref.counters["learned_examples"] > 3_000
        assert pipe.task_learned == ref.task_learned
        assert pipe.trainer.front_state["joiner"]["stats"] == ref.joiner.stats.as_dict()
        # Same examples in the same order: the same models.
        np.testing.assert_allclose(pipe.learners.weights(), ref.learners.weights(), atol=1e-4)  # float32 text widths differ per batch cut: ~1e-5 drift
        for t in ref.tasks:
            # Each example is scored with the weights of the examples before it, wherever the batches
            # are cut (the replay's read chunks end batches early in one process only): the progressive
            # losses agree up to the text widths' drift.
            got, want = pipe.metrics.get()[t]["overall"], ref.metrics.get()[t]["overall"]
            assert got["count"] == want["count"] and got["positives"] == want["positives"]
            np.testing.assert_allclose(got["logloss"], want["logloss"], rtol=1e-5)
        # The published updates make numpy serving equal VW.
        serving = StackedRanker.load(tiny_bundle)
        for u in UpdateWatcher(tmp_path / "models", serving.bundle_id).poll():
            serving.apply_update(u.rows, u.values, u.seq)
        assert serving.update_seq == pipe.update_seq > 1
        served = [r for r in tiny_records if isinstance(r, ServedRecord)][:300]
        feats = serving.features(batch_from_records(served, serving.spec))
        np.testing.assert_allclose(serving.predict_features(feats), pipe.learners.predict(feats.vw_lines()),
                                   atol=1e-6)
        state, _ = load_latest(tmp_path / "pipe" / "checkpoints")
        assert state["learned_through"] == len(tiny_records) - 1
        assert state["counters"]["learned_examples"] == state["joiner"]["stats"]["examples"]
    ref.close()


def test_pipeline_restart_continues_without_relearning(tmp_path, tiny_bundle, event_log):
    with PipelinedLearner(tiny_bundle, tmp_path / "a", attribution_window_ms=WINDOW_MS) as a:
        a.replay(event_log)
        want_tasks, want_n, want_w = dict(a.task_learned), a.counters["learned_examples"], a.learners.weights()
    with PipelinedLearner(tiny_bundle, tmp_path / "b", attribution_window_ms=WINDOW_MS, batch_size=200) as b:
        b.replay(event_log, stop_after=2_500, chunk=500)
        assert b.trainer.front_state["joiner"]["open"] > 0
    with PipelinedLearner(tiny_bundle, tmp_path / "b", attribution_window_ms=WINDOW_MS) as b:
        assert 0 < b.replay_from < 2_500 and b.learned_through == 2_499
        b.replay(event_log)
        assert b.task_learned == want_tasks and b.counters["learned_examples"] == want_n
        np.testing.assert_allclose(b.learners.weights(), want_w, atol=1e-4)  # float32 text rounding differs with batch cuts


def test_one_learner_per_state_directory(tmp_path, tiny_bundle):
    import pytest
    with PipelinedLearner(tiny_bundle, tmp_path / "s", attribution_window_ms=WINDOW_MS):
        with pytest.raises(RuntimeError, match="another learner"):
            PipelinedLearner(tiny_bundle, tmp_path / "s", attribution_window_ms=WINDOW_MS, lock_timeout_s=0.2)


def test_run_follow_in_a_spawned_process_publishes_live_records_within_a_second(tmp_path, tiny_bundle,
                                                                                tiny_records):
    from online.runner import run_follow
    bundle_id = StackedRanker.load(tiny_bundle).bundle_id
    log_dir, models = tmp_path / "log", tmp_path / "models"
    ctx = multiprocessing.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=run_follow, kwargs=dict(
        log_dir=log_dir, bundle_dir=tiny_bundle, state_dir=tmp_path / "state", model_dir=models,
        attribution_window_ms=WINDOW_MS, stop_event=stop, ready_event=ready))
    proc.start()
    try:
        assert ready.wait(60)
        watcher = UpdateWatcher(models, bundle_id)
        latencies = []
        with EventLog(log_dir) as elog:  # fsync'd appends, as the server writes them
            for a in range(0, 2_400, 300):
                offs = elog.append(tiny_records[a:a + 300])
                t0 = time.monotonic()
                while time.monotonic() - t0 < 5:
                    ups = watcher.poll()
                    if any(u.covered_offset >= offs[-1] for u in ups):
                        latencies.append(time.monotonic() - t0)
                        break
                    time.sleep(0.005)
                else:
                    raise AssertionError(f"records through offset {offs[-1]} not published within 5 s")
        print("append -> published latencies (s):", [round(x, 3) for x in latencies])
        assert np.median(latencies) < 0.6 and max(latencies) < 1.5, latencies  # target: p99 <= 1 s end to end
    finally:
        stop.set()
        proc.join(30)
    assert proc.exitcode == 0
    state, _ = load_latest(tmp_path / "state" / "checkpoints")
    assert state["learned_through"] == 2_399
    assert state["counters"]["learned_examples"] > 0


def _raw_line(payload: bytes) -> bytes:
    import zlib
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def test_malformed_and_far_future_records_are_counted_and_skipped_and_learning_goes_on(tmp_path, tiny_bundle,
                                                                                     tiny_records):
    """Lines that pass their checksum but hold no usable record, in the middle of a log: both learners skip
    and count each one and learn everything around them, exactly as from the log without them."""
    import time as _time
    from online.eventlog import EventLog
    from online.records import Engagement
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    half = len(tiny_records) // 2
    with EventLog(clean, fsync=False) as log:
        log.append(tiny_records)
    with EventLog(dirty, fsync=False) as log:
        log.append(tiny_records[:half])
    junk = [b"{oops", b'["E","e1","r1"]', b'["X",1]', b"{}", b"42",
            b'["S","rq","p","u","a",0,"abc","b",0,"text",0,"ios","home",[],[]]',
            b'["E","e2","rq","p","poke",1,0]', b'["E","e3","rq","p","view",%d,0]' % (1 << 63)]
    with open(sorted(dirty.glob("seg-*.log"))[-1], "ab") as f:
        f.write(b"".join(map(_raw_line, junk)))
    future = int(_time.time() * 1000) + 10 * 86_400_000
    nan = ServedRecord("rn", "pn", "u", "a", 0, tiny_records[half - 1].ts, StackedRanker.load(tiny_bundle).bundle_id,
                       0, "text", 0, "ios", "home", [float("nan")] * 12, [0.0] * 26)
    with EventLog(dirty, fsync=False) as log:
        assert log.end_offset == half + len(junk)      # kept, not cut as a torn tail
        log.append([Engagement("ef", "rf", "pf", "click", future), nan,
                    Engagement("en", "rn", "pn", "view", nan.ts + 1), *tiny_records[half:]])
    ref = OnlineLearner(tiny_bundle, tmp_path / "ref", attribution_window_ms=WINDOW_MS, batch_size=300)
    replay(ref, clean, progress=False)
    one = OnlineLearner(tiny_bundle, tmp_path / "one", attribution_window_ms=WINDOW_MS, batch_size=300)
    out = replay(one, dirty, progress=False)
    assert out["learned_examples"] == ref.counters["learned_examples"] > 3_000
    assert one.task_learned == ref.task_learned
    assert (one.counters["bad_records"], one.counters["future_records"]) == (len(junk) + 1, 1)  # + the NaN row
    with PipelinedLearner(tiny_bundle, tmp_path / "pipe", attribution_window_ms=WINDOW_MS, batch_size=300) as pipe:
        got = pipe.replay(dirty)
        assert got["learned_examples"] == ref.counters["learned_examples"]
        counters = pipe.trainer.front_state["counters"]
        assert (counters["bad_records"], counters["future_records"]) == (len(junk) + 1, 1)
    ref.close()
    one.close()
