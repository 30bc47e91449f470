"""Joiner: event-time windows, early positives, held positives, duplicates, late/unmatched, eviction."""
from __future__ import annotations

import random
import time

from online.joiner import Joiner
from online.records import Engagement, ServedRecord
from stacker.schema import TASKS

W = 1_000  # attribution window, ms


def served(req: str, ts: int, post: str = "p") -> ServedRecord:
    return ServedRecord(req, post, "u", "a", 0, ts, "b", 0, "text", 0, "ios", "home", [1.0], [2.0])


def ev(eid: str, req: str, kind: str, ts: int, post: str = "p", dwell_ms: int = 0) -> Engagement:
    return Engagement(eid, req, post, kind, ts, dwell_ms)


def run(joiner: Joiner, records) -> list:
    out = []
    for off, r in enumerate(records):
        out += joiner.add_served(r, off) if isinstance(r, ServedRecord) else joiner.add_event(r, off)
    return out + joiner.flush()


def summary(examples) -> list:
    return [(x.served.request_id, tuple(sorted(k for k, v in x.labels.items() if v)), x.tasks, x.final, x.offset)
            for x in examples]


def test_early_positive_then_window_close_emits_the_rest():
    j = Joiner(TASKS, W, allowed_lateness_ms=0)
    assert j.add_served(served("r1", 0), 0) == []
    assert j.add_event(ev("v", "r1", "view", 10), 1) == []
    early = j.add_event(ev("c", "r1", "click", 20), 2)
    assert [(x.tasks, x.labels["click"], x.final) for x in early] == [(("click",), 1, False)]
    assert j.add_event(ev("c2", "r1", "click", 30), 3) == []  # a second click is not a second example
    assert j.add_served(served("r2", 900), 4) == []  # watermark 900 < deadline 1000: still open
    closed = j.add_served(served("r3", 1_001), 5)  # watermark passes r1's deadline
    assert [(x.served.request_id, x.tasks, x.final) for x in closed] == [
        ("r1", tuple(t for t in TASKS if t != "click"), True)]
    assert closed[0].labels == {t: int(t == "click") for t in TASKS}
    assert j.stats.early_positives == 1 and j.stats.examples == 2


def test_positives_before_view_are_held_until_viewed():
    j = Joiner(TASKS, W)
    out = run(j, [served("r1", 0), ev("l", "r1", "like", 5), ev("s", "r1", "share", 6), ev("v", "r1", "view", 7)])
    assert summary(out)[0] == ("r1", ("like", "share"), ("like", "share"), False, 3)
    assert summary(out)[1][2:4] == (("click", "comment", "hide", "dwell"), True)


def test_unviewed_impressions_expire_without_example():
    j = Joiner(TASKS, W)
    assert run(j, [served("r1", 0), ev("c", "r1", "click", 5)]) == []
    assert j.stats.expired_unviewed == 1


def test_returned_is_viewed_emits_at_close():
    out = run(Joiner(("click",), W, returned_is_viewed=True), [served("r1", 0)])
    assert summary(out) == [("r1", (), ("click",), True, 0)]


def test_dwell_threshold():
    recs = [served("r1", 0), ev("v", "r1", "view", 1), ev("d1", "r1", "dwell", 2, dwell_ms=9_999),
            served("r2", 0), ev("v2", "r2", "view", 1), ev("d2", "r2", "dwell", 2, dwell_ms=10_000)]
    out = run(Joiner(("dwell",), W), recs)
    assert [(x.served.request_id, x.labels["dwell"], x.final) for x in out] == [
        ("r2", 1, False), ("r1", 0, True), ("r2", 1, True)]
    out = run(Joiner(("dwell",), W, dwell_threshold_ms=5_000), recs)
    assert sum(x.labels["dwell"] for x in out if x.final) == 2


def test_duplicates_late_and_unmatched_are_counted():
    j = Joiner(("click",), W, allowed_lateness_ms=100)
    run(j, [served("r1", 0), ev("v", "r1", "view", 1), ev("v", "r1", "view", 1),  # duplicate id
            ev("c", "r1", "click", 1_500),  # after r1's window (deadline 1000): late
            served("r2", 5_000),  # watermark 4900 closes r1
            ev("c1", "r1", "click", 600),  # r1 already closed: late
            ev("x", "nobody", "click", 5_000),  # no served record: waits, then unmatched
            ev("v2", "r2", "view", 5_001)])
    s = j.stats
    assert (s.served, s.events, s.duplicates, s.late, s.unmatched) == (2, 6, 1, 2, 1)


def test_event_before_its_served_record_waits_for_it():
    out = run(Joiner(("click",), W), [ev("v", "r1", "view", 3), ev("c", "r1", "click", 4), served("r1", 0)])
    assert [(x.tasks, x.final) for x in out] == [(("click",), False), ((), True)]


def test_eviction_closes_the_oldest_open_impression_when_full():
    j = Joiner(("click",), 10 * W, max_open=2, returned_is_viewed=True)
    assert j.add_served(served("r1", 0), 0) == []
    assert j.add_event(ev("c", "r1", "click", 1), 1)[0].tasks == ("click",)
    assert j.add_served(served("r2", 2), 2) == []
    assert j.oldest_open_offset == 0
    out = j.add_served(served("r3", 3), 3)
    assert summary(out) == [("r1", ("click",), (), True, 3)]
    assert j.stats.evicted == 1 and j.open_count == 2 and j.oldest_open_offset == 2


def random_stream(seed: int, n: int = 300) -> list:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        t = i * 50
        recs.append(served(f"r{i}", t))
        for k, kind in enumerate(("view", "click", "like", "dwell")):
            if rng.random() < 0.6:
                recs.append(ev(f"e{i}-{k}", f"r{i}", kind, t + rng.randrange(0, 1_500), dwell_ms=rng.randrange(20_000)))
    rng.shuffle(recs[len(recs) // 2:])  # out-of-order tail
    return recs


def test_replay_is_deterministic_and_independent_of_wall_clock(monkeypatch):
    recs = random_stream(0)
    first = summary(run(Joiner(TASKS, W, max_open=50), recs))
    monkeypatch.setattr(time, "time", lambda: 4e9)
    monkeypatch.setattr(time, "monotonic", lambda: 123.0)
    j = Joiner(TASKS, W, max_open=50)
    assert summary(run(j, recs)) == first
    assert j.stats.examples == len(first) > 0


def test_resume_from_checkpoint_learns_nothing_twice():
    recs = random_stream(1)
    ref = Joiner(TASKS, W)
    full = summary(run(ref, recs))
    cut = len(recs) // 3
    j = Joiner(TASKS, W)
    before = []
    for off, r in enumerate(recs[:cut]):
        before += j.add_served(r, off) if isinstance(r, ServedRecord) else j.add_event(r, off)
    state = j.state()
    r2 = Joiner(TASKS, W)
    r2.resume(state["through_offset"], state["max_ts"], state["stats"])
    start = state["oldest_open_offset"]
    assert start is not None and start < cut - 10 and state["open"] > 1
    after = []
    for off in range(start, len(recs)):
        r = recs[off]
        after += r2.add_served(r, off) if isinstance(r, ServedRecord) else r2.add_event(r, off)
    after += r2.flush()
    assert summary(before) + summary(after) == full
    assert r2.stats == ref.stats


def test_doctests():
    import doctest

    import online.joiner

    assert doctest.testmod(online.joiner).failed == 0


def test_a_quiet_source_after_a_restart_closes_the_checkpoint_s_open_impressions_once():
    """Restarted at the checkpoint with nothing new in the log: the idle clock (``advance``) must close
    the impressions the checkpoint left open and emit them, with the checkpoint's counters."""
    recs = random_stream(2, n=60)
    cut = len(recs)
    j = Joiner(TASKS, W)
    for off, r in enumerate(recs):
        j.add_served(r, off) if isinstance(r, ServedRecord) else j.add_event(r, off)
    state = j.state()
    far = j.max_ts + 10 * W
    expected = summary(j.advance(far))
    assert state["open"] > 0 and expected
    r2 = Joiner(TASKS, W)
    r2.resume(state["through_offset"], state["max_ts"], state["stats"])
    for off in range(state["oldest_open_offset"], cut):  # the replay: everything already learned
        r = recs[off]
        assert (r2.add_served(r, off) if isinstance(r, ServedRecord) else r2.add_event(r, off)) == []
    got = r2.advance(far)
    assert [x[:4] for x in summary(got)] == [x[:4] for x in expected]
    assert all(x.offset > state["through_offset"] for x in got)   # not suppressed as learned
    assert r2.stats == j.stats and r2.open_count == 0
