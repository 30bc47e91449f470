"""Scale-out: a replica with ``bus_url`` publishes served records and events to a real Redis stream,
and acknowledges events with the stream offsets the learner's ``covered_offset`` uses."""
from __future__ import annotations

import time

import grpc
import pytest

from feedrank.v1 import ranking_pb2 as pb
from feedrank.v1 import ranking_pb2_grpc as pb_grpc
from online.bus import RedisBus
from online.records import Engagement, ServedRecord
from serving.client import feed_requests, rank_request
from tests.conftest_online import redis_url  # noqa: F401


@pytest.fixture(scope="module")
def feeds():
    return feed_requests(1, min_candidates=60, max_candidates=60)


def test_replica_publishes_served_records_and_events_to_the_bus(serving_server, tiny_bundle, feeds, redis_url):
    rs = serving_server(bundle=tiny_bundle, bus_url=redis_url, learner=False)
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{rs.port}"))
    resp = stub.Rank(rank_request(feeds[0], request_id="bus-1", limit=5))
    post = resp.posts[0].post_id
    ack = stub.LogEvents(pb.LogEventsRequest(events=[pb.Event(
        event_id="bus-e1", request_id="bus-1", post_id=post, kind=pb.EVENT_KIND_CLICK,
        ts_ms=int(time.time() * 1000))]))
    assert ack.results[0].status == pb.EventResult.STATUS_ACCEPTED
    bus = RedisBus(redis_url)
    got, deadline = [], time.time() + 10
    while time.time() < deadline and (not any(isinstance(r, Engagement) for _, r in got)
                                       or sum(isinstance(r, ServedRecord) for _, r in got) < 5):
        got += bus.consume(count=100, block_ms=50)  # served records arrive via the batching sink
    served = [r for _, r in got if isinstance(r, ServedRecord)]
    events = [(o, r) for o, r in got if isinstance(r, Engagement)]
    assert [r.post_id for r in served] == [p.post_id for p in resp.posts]
    assert all(r.request_id == "bus-1" and r.bundle_id == resp.model_version.bundle_id for r in served)
    assert [(o, r.event_id) for o, r in events] == [(ack.results[0].log_offset, "bus-e1")]


def test_embedded_learner_follows_the_bus(tmp_path, tiny_bundle, redis_url):
    """``feedrank serve --bus URL`` starts its learner on the stream; it comes up and reports status."""
    import json

    from serving.learner_process import start_learner, stop_learner
    from serving.settings import load_settings

    settings = load_settings(bundle=tiny_bundle, bus_url=redis_url, eventlog_dir=tmp_path / "log",
                             learner_state_dir=tmp_path / "learner")
    proc = start_learner(settings)
    try:
        deadline = time.time() + 60
        status = tmp_path / "learner" / "status.json"
        while time.time() < deadline and proc.is_alive() and not status.is_file():
            time.sleep(0.2)
        assert proc.is_alive(), f"learner exited with {proc.exitcode}"
        RedisBus(redis_url).publish([Engagement("e1", "r1", "p1", "view", int(time.time() * 1000))])
        deadline = time.time() + 30
        while time.time() < deadline and json.loads(status.read_text() or "{}").get("join", {}).get("events", 0) < 1:
            time.sleep(0.2)
        assert json.loads(status.read_text())["join"]["events"] >= 1
    finally:
        stop_learner(proc, timeout_s=30)
    assert proc.exitcode == 0


def test_an_event_that_did_not_reach_the_stream_is_not_a_duplicate_when_retried(tmp_path):
    """Redis down: LogEvents fails, nothing is written anywhere, and after a restart the client's retry
    is accepted (it used to be in the local log already, so the replica answered DUPLICATE although the
    learner never saw it)."""
    from online.bench import redis_server
    from serving.errors import NotReady
    from serving.events import EventIngest
    from serving.sink import BusEventLog
    event = {"event_id": "e1", "request_id": "r", "post_id": "p", "kind": "view", "ts": 1_700_000_000_000}
    with redis_server(tmp_path) as url:
        log = BusEventLog(tmp_path / "log", url, fsync=False)
        ingest = EventIngest(log)
        RedisBus(url).client.shutdown(nosave=True)
        with pytest.raises(NotReady, match="no event of it was acknowledged, retry it"):
            ingest.log_events([event])
        assert log.log.end_offset == 0                   # not in the local log either
        log.log.close()
    with redis_server(tmp_path) as url:                  # the replica restarts, Redis is back
        log = BusEventLog(tmp_path / "log", url, fsync=False)
        results = EventIngest(log).log_events([event])
        assert [r.status for r in results] == ["accepted"]
        got = RedisBus(url).consume(count=10, block_ms=10)
        assert [(type(r), r.event_id) for _, r in got] == [(Engagement, "e1")]
        log.close()


def test_served_records_the_stream_missed_are_kept_locally_and_counted_apart(tmp_path, caplog):
    """Redis down: served records still reach the local log (export, retraining) and are counted
    not_streamed, not dropped, in feedrank_served_records_total; a run of failures is logged once."""
    from online.bench import redis_server
    from online.eventlog import EventLog
    from serving.metrics import SinkCollector
    from serving.sink import BusEventLog, EventLogSink

    class Batch:                                            # what the handler submits: records of a request
        post_ids = ["p0", "p1", "p2"]

        def records(self):
            return [ServedRecord("r", p, "u", "a", i, 1_700_000_000_000, "b", 0, "text", 0, "ios", "home", [], [])
                    for i, p in enumerate(self.post_ids)]

    with redis_server(tmp_path) as url:
        log = BusEventLog(tmp_path / "log", url, fsync=False)
        sink = EventLogSink(log, flush_ms=5)
        sink.submit(Batch())
        sink.flush()
        RedisBus(url).client.shutdown(nosave=True)
        for _ in range(3):
            sink.submit(Batch())
            sink.flush()
        assert (sink.written, sink.dropped, sink.not_streamed) == (12, 0, 9)
        counted = {s.labels["outcome"]: s.value for m in SinkCollector(sink).collect() for s in m.samples
                   if s.name == "feedrank_served_records_total"}
        assert counted == {"written": 12.0, "dropped": 0.0, "not_streamed": 9.0}
        said = [r for r in caplog.records if "a learner over the bus does not see them" in r.getMessage()]
        assert len(said) == 1 and said[0].getMessage().startswith("3 served records kept in the local log")
        sink.close()
        log.log.close()
    assert [r.post_id for _, r in EventLog(tmp_path / "log", readonly=True).read()] == ["p0", "p1", "p2"] * 4


def test_a_log_that_takes_no_more_sends_nothing_to_the_stream_and_says_to_restart(tmp_path):
    """After an fsync failure the local log takes nothing until it is reopened (online.eventlog): with
    the bus, events are then not published either (each retry would add a copy to the stream), LogEvents
    says a restart is needed, and served records count as dropped."""
    from online.bench import redis_server
    from serving.errors import NotReady
    from serving.events import EventIngest
    from serving.sink import BusEventLog
    event = {"event_id": "e1", "request_id": "r", "post_id": "p", "kind": "view", "ts": 1_700_000_000_000}
    with redis_server(tmp_path) as url:
        log = BusEventLog(tmp_path / "log", url, fsync=False)
        log.log._unusable = "fsync failed (Input/output error)"       # as EventLog.append leaves it
        with pytest.raises(NotReady, match="no event of it was acknowledged, retry once the server has been "
                                           "restarted"):
            EventIngest(log).log_events([event])
        assert RedisBus(url).consume(count=10, block_ms=10) == []
        log.close()
