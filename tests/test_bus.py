"""Redis Streams bus (real redis-server): publish → consume → ack only after checkpoint → redelivery."""
from __future__ import annotations

from online.bus import RedisBus, id_to_offset, offset_to_id
from online.learner import OnlineLearner
from online.records import Engagement
from online.replay import follow_redis, replay
from tests.conftest_online import WINDOW_MS, event_log, redis_url, tiny_records  # noqa: F401


def test_publish_consume_ack_and_redelivery(redis_url):
    recs = [Engagement(f"e{i}", "r", "p", "view", i) for i in range(10)]
    RedisBus(redis_url).publish(recs)
    bus = RedisBus(redis_url)
    got = bus.consume(count=6, block_ms=10)
    assert [r.event_id for _, r in got] == [f"e{i}" for i in range(6)]
    assert offset_to_id(got[0][0]) and id_to_offset(offset_to_id(got[0][0])) == got[0][0]
    assert bus.ack_through(got[3][0]) == 3  # e0..e2 covered by a "checkpoint"
    assert bus.pending_count() == 3
    # The consumer dies; a new one under the same name first gets back what was not acknowledged.
    again = RedisBus(redis_url)
    got2 = again.consume(count=100, block_ms=10)
    assert [r.event_id for _, r in got2] == ["e3", "e4", "e5"]
    got3 = again.consume(count=100, block_ms=10)
    assert [r.event_id for _, r in got3] == [f"e{i}" for i in range(6, 10)]
    assert again.consume(count=100, block_ms=10) == []
    again.ack_through(got3[-1][0] + 1)
    assert again.pending_count() == 0


def test_learner_over_redis_acks_only_checkpointed_and_resumes(tmp_path, redis_url, tiny_bundle, tiny_records,
                                                               event_log):
    ref = OnlineLearner(tiny_bundle, tmp_path / "ref", attribution_window_ms=WINDOW_MS)
    replay(ref, event_log, progress=False, finish=False)  # same records from the log: the reference
    RedisBus(redis_url).publish(tiny_records)
    bus = RedisBus(redis_url)
    a = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS, checkpoint_every_s=1e9)
    a.process(bus.consume(count=2_000, block_ms=10))
    a.checkpoint()
    bus.ack_through(a.replay_from)
    assert bus.pending_count() == len(bus._unacked) < 2_000
    assert all(o >= a.replay_from for o, _ in bus._unacked)  # open impressions are still needed
    a.process(bus.consume(count=1_500, block_ms=10))  # learned but never checkpointed: lost on "crash"
    a.close()
    b = OnlineLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS, checkpoint_every_s=1e9)
    bus2 = RedisBus(redis_url)
    follow_redis(b, bus2, block_ms=10, idle_close_s=None, max_idle_polls=1)
    assert bus2.pending_count() == len(bus2._unacked)
    assert b.counters["learned_examples"] == ref.counters["learned_examples"]
    assert b.task_learned == ref.task_learned
    b.close()
    ref.close()


def test_pipelined_learner_over_redis_acks_only_what_a_checkpoint_covers(tmp_path, redis_url, tiny_bundle,
                                                                         tiny_records, event_log):
    """The two-process learner consuming the stream, stopped halfway and restarted: it learns what the
    single-process learner learns from the same records in the log, and the entries left pending are
    exactly those its last checkpoint still needs."""
    from online.pipeline import PipelinedLearner
    ref = OnlineLearner(tiny_bundle, tmp_path / "ref", attribution_window_ms=WINDOW_MS)
    replay(ref, event_log, progress=False, finish=False)
    half = len(tiny_records) // 2
    RedisBus(redis_url).publish(tiny_records[:half])
    with PipelinedLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS,
                          checkpoint_every_s=1e9) as a:
        out = a.follow_redis(redis_url, stop_when_idle=True, finish=False)
        covered = a.trainer.replay_from
    bus = RedisBus(redis_url)
    rows = bus.client.xpending_range("feedrank:records", "learner", min="-", max="+", count=100_000)
    assert out["acked"] > 0 and len(rows) == half - out["acked"] > 0  # open impressions stay pending
    assert all(id_to_offset(r["message_id"]) >= covered for r in rows)
    RedisBus(redis_url).publish(tiny_records[half:])
    with PipelinedLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS,
                          checkpoint_every_s=1e9) as b:
        b.follow_redis(redis_url, stop_when_idle=True, finish=False)
        assert b.counters["learned_examples"] == ref.counters["learned_examples"]
        assert b.task_learned == ref.task_learned
        rows = bus.client.xpending_range("feedrank:records", "learner", min="-", max="+", count=100_000)
        assert len(rows) == len(tiny_records) - out["acked"] - b.acked
        assert all(id_to_offset(r["message_id"]) >= b.trainer.replay_from for r in rows)
    ref.close()


def test_entries_that_hold_no_record_come_out_malformed_in_their_place(redis_url):
    from online.records import Malformed
    bus = RedisBus(redis_url)
    bus.publish([Engagement("e0", "r", "p", "view", 1)])
    for fields in ({b"x": b"1"}, {b"r": b"{oops"}, {b"r": b'["E","e1"]'}, {b"r": b'["E","e2","r","p","view","1",0]'}):
        bus.client.xadd(bus.stream, fields)
    bus.publish([Engagement("e3", "r", "p", "view", 2)])
    got = [r for _, r in RedisBus(redis_url).consume(count=100, block_ms=10)]
    assert [type(r) for r in got] == [Engagement, Malformed, Malformed, Malformed, Malformed, Engagement]
    assert [r.reason.split(" (")[0] for r in got[1:5]] == [
        "stream entry without field 'r'", "payload is not JSON", "not a record", "event.ts: not an int64"]


def test_the_learner_rides_out_a_redis_restart_that_lost_the_stream(tmp_path, tiny_bundle, tiny_records, caplog):
    """Redis goes away while the two-process learner follows it and comes back empty: the learner waits,
    logs, recreates its group and learns what is published afterwards (it used to exit)."""
    import logging
    import subprocess
    import threading
    import time

    from online.bench import REDIS_SERVER, free_port
    from online.pipeline import PipelinedLearner
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_path)]

    def start():
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                RedisBus(url).client.ping()
                return proc
            except Exception:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    half = len(tiny_records) // 2
    server = start()
    stop = threading.Event()
    caplog.set_level(logging.WARNING)
    try:
        RedisBus(url).publish(tiny_records[:half])
        with PipelinedLearner(tiny_bundle, tmp_path / "state", attribution_window_ms=WINDOW_MS,
                              checkpoint_every_s=0.5) as learner:
            follow = threading.Thread(target=learner.follow_redis, args=(url,),
                                      kwargs={"should_stop": stop.is_set, "idle_close_s": 1.0})
            follow.start()
            deadline = time.time() + 60
            while learner.counters["learned_examples"] < 1000 and time.time() < deadline:
                time.sleep(0.1)
            first = learner.counters["learned_examples"]
            assert first >= 1000
            server.terminate()
            server.wait(10)
            time.sleep(3)                         # the outage: the learner must neither exit nor stall for good
            assert follow.is_alive()
            server = start()                      # back, empty: no stream, no group
            RedisBus(url).publish(tiny_records[half:])
            while learner.counters["learned_examples"] < first + 1000 and time.time() < deadline + 60:
                time.sleep(0.1)
            assert learner.counters["learned_examples"] >= first + 1000
            assert follow.is_alive()
            stop.set()
            follow.join(60)
            assert not follow.is_alive()
    finally:
        stop.set()
        server.terminate()
        server.wait(10)


def test_the_stream_is_trimmed_of_what_every_group_acknowledged(redis_url):
    recs = [Engagement(f"e{i}", "r", "p", "view", i) for i in range(1000)]
    RedisBus(redis_url).publish(recs)
    bus = RedisBus(redis_url)
    got = bus.consume(count=1000, block_ms=10)
    bus.ack_through(got[600][0])                                   # e0..e599 acknowledged
    other = RedisBus(redis_url, group="shadow")                    # a second group that read nothing yet
    other.ensure_group()
    assert bus.trim_acknowledged() == 0 and bus.client.xlen(bus.stream) == 1000
    other.client.xgroup_destroy(other.stream, "shadow")
    assert bus.trim_acknowledged() >= 500                           # whole radix-tree nodes only
    left = bus.client.xrange(bus.stream)
    assert len(left) <= 500 and id_to_offset(left[0][0]) <= got[600][0]   # nothing pending went
    again = RedisBus(redis_url).consume(count=1000, block_ms=10)  # the pending entries come back
    assert [r.event_id for _, r in again] == [f"e{i}" for i in range(600, 1000)]


def test_a_learner_without_a_bundle_learns_the_one_the_servers_on_its_model_dir_serve(tmp_path, redis_url,
                                                                                      tiny_bundle, other_bundle,
                                                                                      tiny_records):
    """`feedrank learn --redis URL --model-dir DIR` without --bundle (the scale-out learner): it learns the
    bundle the servers on DIR serve, moves to a newer one when it arrives (the old one's checkpoints
    archived), and back when DIR is pinned to the old one (resuming from them)."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from feedsim.simulate import simulate
    from online.workload import workload
    from stacker.bundle import copy_bundle
    from stacker.ranker import StackedRanker

    root = Path(__file__).resolve().parents[1]
    models, state = tmp_path / "models", tmp_path / "state"
    models.mkdir()
    copy_bundle(tiny_bundle, models / "a")
    old, new = StackedRanker.load(tiny_bundle), StackedRanker.load(other_bundle)
    proc = subprocess.Popen([sys.executable, "-m", "feedrank.cli", "learn", "--redis", redis_url, "--model-dir",
                             str(models), "--state", str(state), "--poll-s", "0.2", "--window-ms", str(WINDOW_MS),
                             "--quiet"], cwd=root, stderr=open(tmp_path / "learn.err", "w"), text=True)

    def status(bundle_id: str, learned_more_than: int = 0) -> dict:
        deadline = time.time() + 60
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "learn.err").read_text()
            try:
                st = json.loads((state / "status.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                st = {}
            if st.get("bundle_id") == bundle_id and st["counters"]["learned_examples"] > learned_more_than:
                return st
            time.sleep(0.1)
        raise AssertionError(f"the learner did not learn bundle {bundle_id} past {learned_more_than} examples:\n"
                             + (tmp_path / "learn.err").read_text())

    try:
        RedisBus(redis_url).publish(tiny_records)
        on_old = status(old.bundle_id)["counters"]["learned_examples"]
        copy_bundle(other_bundle, models / "b")                 # a newer bundle: the servers move to it
        moved_at = time.time() + 60
        while not list((state / "archive").glob(f"{old.bundle_id}-*")) and time.time() < moved_at:
            time.sleep(0.05)
        later = simulate(3_000, seed=7)                          # served after the records above
        shift = max(r.ts for r in tiny_records) + 60_000 - int(later["ts"].min())
        later["ts"] += shift
        later["created_at"] += shift
        RedisBus(redis_url).publish(workload(later, new.spec, new.bundle_id, WINDOW_MS))
        assert status(new.bundle_id)["counters"]["learned_examples"] > 0
        assert list((state / "archive").glob(f"{old.bundle_id}-*"))    # the old bundle's checkpoints, kept
        from feedrank.cli import main
        assert main(["pin", str(models), "a"]) == 0               # a rollback: back to the old one
        back = status(old.bundle_id, learned_more_than=on_old - 1)
        assert back["counters"]["learned_examples"] >= on_old    # resumed from what it had learned
        assert list((state / "archive").glob(f"{new.bundle_id}-*"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    said = (tmp_path / "learn.err").read_text()
    assert "moved to b: checkpointing and learning it" in said and "moved to a: checkpointing" in said
