"""The gRPC ranking service against a real server on port 0: contract, errors, swaps, events."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedrank.v1 import ranking_pb2 as pb
from feedrank.v1 import ranking_pb2_grpc as pb_grpc
from serving.client import feed_requests, rank_request

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def feeds():
    return feed_requests(3, min_candidates=60, max_candidates=60)


@pytest.fixture
def live(serving_server, tiny_bundle):
    rs = serving_server(bundle=tiny_bundle, admin_token=TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{rs.port}")
    yield rs, pb_grpc.RankerStub(channel), pb_grpc.AdminStub(channel), channel
    channel.close()


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status


def test_stubs_are_not_stale(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        checked_in = ROOT / "feedrank" / "v1" / path.name
        assert checked_in.read_bytes() == path.read_bytes(), \
            f"{checked_in} is stale: run `python scripts/gen_proto.py`"


def test_rank_returns_ranked_posts_with_version_and_probabilities(live, feeds):
    rs, stub, _, _ = live
    req = rank_request(feeds[0], limit=10, request_id="")
    resp, call = stub.Rank.with_call(req)
    assert len(resp.posts) == 10
    assert list(resp.tasks) == ["click", "like", "comment", "share", "hide", "dwell"]
    ranker = rs.model.current()
    assert resp.model_version.bundle_id == ranker.bundle_id
    assert resp.model_version.version == f"{ranker.bundle_id}+0"
    assert all(len(p.probabilities) == 6 for p in resp.posts)
    assert len({p.post_id for p in resp.posts}) == 10
    assert resp.request_id  # assigned by the server
    assert {"decode", "features", "gbdt", "dnn", "lr", "rerank", "encode"} <= set(resp.stage_ms)
    assert dict(call.trailing_metadata())["server-ms"]
    weights = np.array([ranker.ev_weights[t] for t in resp.tasks])
    for p in resp.posts:
        assert p.ev == pytest.approx(float(np.array(p.probabilities, np.float64) @ weights), abs=1e-5)


def test_served_probabilities_equal_vw_predictions(live, feeds, tiny_bundle):
    from online.learner import vw_config
    from serving.convert import rank_input
    from stacker.bundle import VW_MODEL
    from stacker.vwstack import TaskLearners

    rs, stub, _, _ = live
    req = rank_request(feeds[1], limit=60, request_id="")
    resp = stub.Rank(req)
    ranker = rs.model.current()
    batch, _ = rs.handler.build_batch(rank_input(req), ranker, int(time.time() * 1000))
    lines = ranker.features(batch).vw_lines()
    tasks = ranker.tasks
    vw = TaskLearners(tasks, vw_config(ranker.manifest), model_path=tiny_bundle / VW_MODEL)
    try:
        expected = vw.predict(lines)
    finally:
        vw.close()
    index = {pid: i for i, pid in enumerate(req.candidates.post_ids)}
    served = np.array([list(p.probabilities) for p in resp.posts])
    rows = [index[p.post_id] for p in resp.posts]
    np.testing.assert_allclose(served, expected[rows], atol=1e-6)


def _mutated(feed, fn, **kw):
    req = rank_request(feed, request_id="", **kw)
    fn(req)
    return req


def _set_features(req, values):
    req.candidates.features = np.asarray(values, "<f4").tobytes()


BAD_INPUT = [
    ("no candidates", lambda r: r.ClearField("candidates"), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.post_ids: no candidates"),
    ("too many", lambda r: r.candidates.post_ids.extend(f"x{i}" for i in range(200)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "candidates.post_ids: 260 candidates, limit 100"),
    ("duplicate ids", lambda r: r.candidates.post_ids.__setitem__(3, r.candidates.post_ids[0]),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates.post_ids: duplicate post id"),
    ("NaN feature", lambda r: _set_features(r, np.where(np.arange(len(r.candidates.features) // 4) == 7, np.nan,
                                                        np.frombuffer(r.candidates.features, "<f4"))),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates.features: non-finite value (nan) at row 0, feature"),
    ("inf user feature", lambda r: r.user.feature_values.__setitem__(0, float("inf")),
     grpc.StatusCode.INVALID_ARGUMENT, "user.feature_values: non-finite value (inf) at feature 'user.activity'"),
    ("wrong feature bytes", lambda r: setattr(r.candidates, "features", r.candidates.features[:-4]),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates.features: "),
    ("user values length", lambda r: r.user.feature_values.append(1.0), grpc.StatusCode.INVALID_ARGUMENT,
     "user.feature_values: has 13 values for 12 user.feature_names"),
    ("missing user id", lambda r: setattr(r.user, "id", ""), grpc.StatusCode.INVALID_ARGUMENT,
     "user.id: missing"),
    ("missing post id", lambda r: r.candidates.post_ids.__setitem__(5, ""), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.post_ids[5]: missing"),
    ("missing author id", lambda r: r.candidates.author_ids.__setitem__(2, ""), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.author_ids[2]: missing"),
    ("oversize user id", lambda r: setattr(r.user, "id", "u" * 1000), grpc.StatusCode.INVALID_ARGUMENT,
     "user.id: 1000 characters, limit 256"),
    ("oversize post id", lambda r: r.candidates.post_ids.__setitem__(1, "p" * 300),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates.post_ids[1]: 300 characters, limit 256"),
    ("unknown task", lambda r: r.task_weights.__setitem__("poke", 1.0), grpc.StatusCode.INVALID_ARGUMENT,
     "task_weights: unknown task 'poke'"),
    ("future time", lambda r: setattr(r.context, "time_ms", int(time.time() * 1000) + 3_600_000),
     grpc.StatusCode.INVALID_ARGUMENT, "context.time_ms: "),
    ("time in seconds", lambda r: setattr(r.context, "time_ms", int(time.time())), grpc.StatusCode.INVALID_ARGUMENT,
     "context.time_ms: 1"),
    ("created_at in seconds", lambda r: r.candidates.created_at_ms.__setitem__(3, int(time.time())),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates.created_at_ms: 1"),
    ("time in microseconds", lambda r: setattr(r.context, "time_ms", int(time.time() * 1e6)),
     grpc.StatusCode.INVALID_ARGUMENT, "context.time_ms: 1"),
    ("author ids short", lambda r: r.candidates.author_ids.pop(), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.author_ids: has 59 entries, candidates.post_ids has 60"),
    ("created_at short", lambda r: r.candidates.created_at_ms.pop(), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.created_at_ms: has 59 entries"),
    ("media short", lambda r: r.candidates.media_types.pop(), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.media_types: has 59 entries"),
    ("unknown media", lambda r: r.candidates.media_types.__setitem__(0, 42), grpc.StatusCode.INVALID_ARGUMENT,
     "candidates.media_types: unknown value 42"),
    ("oversize seen id", lambda r: r.seen_post_ids.extend(["p", "s" * 300]), grpc.StatusCode.INVALID_ARGUMENT,
     "seen_post_ids[1]: 300 characters, limit 256"),
    ("too many, without features", lambda r: (r.candidates.post_ids.extend(f"x{i}" for i in range(200_000)),
                                              r.candidates.feature_names.extend(f"f{i}" for i in range(100_000))),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "candidates.post_ids: 200060 candidates, limit 100"),
    ("user feature among the candidates", lambda r: _swap_names(r.candidates.feature_names, r.user.feature_names),
     grpc.StatusCode.INVALID_ARGUMENT, "candidates.feature_names: 'user.activity' is a user feature of this model: "
                                       "send it in user.feature_names"),
    ("candidate feature among the user's", lambda r: _swap_names(r.user.feature_names, r.candidates.feature_names),
     grpc.StatusCode.INVALID_ARGUMENT, "user.feature_names: 'post."),
    ("duplicate feature name", lambda r: r.user.feature_names.__setitem__(1, r.user.feature_names[0]),
     grpc.StatusCode.INVALID_ARGUMENT, "user.feature_names: duplicate feature name 'user.activity'"),
]


def _swap_names(into, out_of):
    """Send ``out_of``'s first feature in the ``into`` block only (its slot there renamed to an unknown)."""
    into[0] = out_of[0]
    out_of[0] = "zzz.not_a_feature"


@pytest.mark.parametrize("case,mutate,code,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_precise_status(serving_server, tiny_bundle, feeds, case, mutate, code, message):
    rs = serving_server(bundle=tiny_bundle, max_candidates=100)
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{rs.port}"))
    err = _error(stub.Rank, _mutated(feeds[0], mutate))
    assert err.code() == code, err.details()
    assert err.details().startswith(message), err.details()
    if case.endswith(" in seconds"):
        assert "(it looks like seconds: multiply by 1,000)" in err.details()
    if "microseconds" in case:
        assert "(it looks like microseconds: divide by 1,000)" in err.details()
    assert len(stub.Rank(rank_request(feeds[0], request_id="")).posts) > 0  # still serving


def test_unknown_features_ignored_or_rejected(serving_server, tiny_bundle, feeds):
    def with_extra(r):
        r.user.feature_names.append("user.shoe_size")
        r.user.feature_values.append(42.0)

    def with_a_copy(r):    # a candidate feature also sent among the user's: the extra copy is ignored
        r.user.feature_names.append(r.candidates.feature_names[0])
        r.user.feature_values.append(1.0)

    def with_unknown_age(r):
        r.candidates.created_at_ms[0] = 0

    ignoring = serving_server(bundle=tiny_bundle)
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{ignoring.port}"))
    resp = stub.Rank(_mutated(feeds[0], with_extra))
    assert list(resp.ignored_feature_names) == ["user.shoe_size"]
    copy = _mutated(feeds[0], with_a_copy)
    assert list(stub.Rank(copy).ignored_feature_names) == [copy.candidates.feature_names[0]]
    assert len(stub.Rank(_mutated(feeds[0], with_unknown_age)).posts) > 0
    rejecting = serving_server(bundle=tiny_bundle, unknown_features="reject", eventlog_dir="off")
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{rejecting.port}"))
    err = _error(stub.Rank, _mutated(feeds[0], with_extra))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("user.feature_names: unknown feature 'user.shoe_size'")
    err = _error(stub.LogEvents, pb.LogEventsRequest(events=[pb.Event(event_id="e1", request_id="r1", post_id="p1",
                                                                      kind=pb.EVENT_KIND_CLICK)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "without an event log" in err.details()


def test_missing_features_take_manifest_defaults_and_are_named_and_counted(live, feeds):
    rs, stub, _, _ = live
    spec = rs.model.current().spec
    full = stub.Rank(rank_request(feeds[0], request_id=""))
    assert list(full.defaulted_feature_names) == []
    req = rank_request(feeds[0], request_id="")
    req.user.ClearField("feature_names")
    req.user.ClearField("feature_values")
    req.candidates.ClearField("feature_names")
    req.candidates.ClearField("features")
    resp = stub.Rank(req)
    assert len(resp.posts) == 50
    assert list(resp.defaulted_feature_names) == [*spec.user_features, *spec.post_features]
    name = spec.post_features[0]
    assert rs.metrics.defaulted.labels(name)._value.get() == 1


def test_unavailable_until_a_model_is_loaded_then_serving(serving_server, tiny_bundle, feeds):
    rs = serving_server(admin_token=TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{rs.port}")
    assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    err = _error(pb_grpc.RankerStub(channel).Rank, rank_request(feeds[0]))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "feedrank train --simulate 200000 --out bundles/default" in err.details()
    pb_grpc.AdminStub(channel).Reload(pb.ReloadRequest(bundle_path=str(tiny_bundle)), metadata=AUTH)
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert len(pb_grpc.RankerStub(channel).Rank(rank_request(feeds[0])).posts) == 50


def test_model_dir_serves_newest_and_swaps_new_bundles(serving_server, tiny_bundle, tmp_path, feeds):
    import json

    from stacker.bundle import copy_bundle, finalize
    models = tmp_path / "models"
    models.mkdir()
    copy_bundle(tiny_bundle, models / "a")
    rs = serving_server(model_dir=models, poll_interval_s=0.1, admin_token=TOKEN)
    assert rs.model.current().path == models / "a"
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    m.pop("files")

    def arrives(name: str, later_ms: int) -> None:
        """A newer bundle is moved into the directory; the watcher makes it live."""
        bundle = copy_bundle(tiny_bundle, tmp_path / name)
        finalize(bundle, dict(m, bundle_id=name, created_at=m["created_at"] + later_ms))
        shutil.move(str(bundle), models / name)
        deadline = time.time() + 10
        while rs.model.current().bundle_id != name and time.time() < deadline:
            time.sleep(0.05)
        assert rs.model.current().bundle_id == name

    arrives("newer", 1000)
    # a bundle still being copied in when the rollback below comes: refused until its copy completes
    mended = copy_bundle(tiny_bundle, tmp_path / "mended")
    finalize(mended, dict(m, bundle_id="mended", created_at=m["created_at"] + 1500))
    whole = (mended / "gbdt.ubj").read_bytes()
    (mended / "gbdt.ubj").write_bytes(whole[:100])
    shutil.move(str(mended), models / "mended")
    time.sleep(0.5)
    # a Reload back to the older bundle (a rollback) stays live: the watcher does not load "newer" again
    admin = pb_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{rs.port}"))
    rolled = admin.Reload(pb.ReloadRequest(bundle_path=str(models / "a")), metadata=AUTH)
    assert rs.model.current().path == models / "a" and rolled.previous_version.bundle_id == "newer"
    time.sleep(1.0)                                      # ten polls of the directory
    assert rs.model.current().path == models / "a"
    (models / "mended" / "gbdt.ubj").write_bytes(whole)  # its copy completes: it goes live
    deadline = time.time() + 10
    while rs.model.current().bundle_id != "mended" and time.time() < deadline:
        time.sleep(0.05)
    assert rs.model.current().bundle_id == "mended"
    arrives("newest", 2000)                              # and the next new bundle


def test_a_pinned_model_directory_serves_its_pin_on_every_server_and_after_a_restart(serving_server, tiny_bundle,
                                                                                     tmp_path, feeds, capsys, caplog):
    """`feedrank pin DIR BUNDLE`: every server watching DIR serves that bundle in place of the newest, one
    started later too; Reload of another bundle is refused while it holds; `--clear` brings the newest
    back; a bad pin is ignored and named in the log."""
    import json

    from feedrank.cli import main
    from stacker.bundle import copy_bundle, finalize
    models = tmp_path / "models"
    models.mkdir()
    copy_bundle(tiny_bundle, models / "a")
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    m.pop("files")
    newer = copy_bundle(tiny_bundle, tmp_path / "b")
    finalize(newer, dict(m, bundle_id="b", created_at=m["created_at"] + 1000))
    shutil.move(str(newer), models / "b")
    first = serving_server(model_dir=models, poll_interval_s=0.1, admin_token=TOKEN)
    assert first.model.current().bundle_id == "b"

    def serves(rs, bundle_id: str) -> None:
        deadline = time.time() + 10
        while rs.model.current().bundle_id != bundle_id and time.time() < deadline:
            time.sleep(0.05)
        assert rs.model.current().bundle_id == bundle_id

    assert main(["pin", str(models), str(models / "a")]) == 0
    assert f"{models} pinned to a (bundle {m['bundle_id']})" in capsys.readouterr().out
    serves(first, m["bundle_id"])
    second = serving_server(model_dir=models, poll_interval_s=0.1, admin_token=TOKEN,
                            eventlog_dir=tmp_path / "eventlog2")          # a server started (or restarted) now
    assert second.model.current().bundle_id == m["bundle_id"]
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{second.port}"))
    assert stub.Rank(rank_request(feeds[0])).model_version.bundle_id == m["bundle_id"]
    admin = pb_grpc.AdminStub(grpc.insecure_channel(f"127.0.0.1:{second.port}"))
    err = _error(admin.Reload, pb.ReloadRequest(bundle_path=str(models / "b")), metadata=AUTH)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith(f"{models} is pinned to a ({models / 'PINNED'})")
    time.sleep(0.5)
    assert second.model.current().bundle_id == m["bundle_id"]   # a newer bundle does not displace the pin
    assert main(["pin", str(models)]) == 0
    assert capsys.readouterr().out.strip() == f"{models} is pinned to a"
    assert main(["pin", str(models), "--clear"]) == 0
    for rs in (first, second):
        serves(rs, "b")
    (models / "PINNED").write_text("gone\n")                  # a pin naming no bundle: ignored, said
    time.sleep(0.5)
    assert second.model.current().bundle_id == "b"
    assert f"ignoring the pin: {models / 'PINNED'}: names 'gone', which is not a directory in {models}" in caplog.text
    assert main(["pin", str(models), str(tmp_path)]) == 2      # not a bundle in the directory
    assert "not a bundle directory in" in capsys.readouterr().err


def test_admin_rpcs_need_the_bearer_token(live):
    _, _, admin, _ = live
    err = _error(admin.Snapshot, pb.SnapshotRequest())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details().startswith("authorization: missing metadata")
    err = _error(admin.Reload, pb.ReloadRequest(bundle_path="x"), metadata=(("authorization", "Bearer nope"),))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "authorization: token not accepted"
    err = _error(admin.Reload, pb.ReloadRequest(bundle_path="x"), metadata=(("authorization", "Basic abc"),))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    for twice in ((("authorization", "Bearer nope"),) + AUTH, AUTH + (("authorization", "Bearer nope"),)):
        err = _error(admin.Snapshot, pb.SnapshotRequest(), metadata=twice)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "authorization: 2 'authorization' metadata entries, expected one"


def test_retry_with_same_request_id_gets_same_answer(live, feeds):
    rs, stub, _, _ = live
    first = stub.Rank(rank_request(feeds[0], request_id="retry-1", limit=20))
    req = rank_request(feeds[0], request_id="retry-1", limit=20)
    req.context.time_ms = int(time.time() * 1000)  # a retry may stamp its own time
    again = stub.Rank(req)
    assert again.request_id == "retry-1"
    assert [p.post_id for p in again.posts] == [p.post_id for p in first.posts]
    assert [p.score for p in again.posts] == [p.score for p in first.posts]


def test_a_request_id_reused_for_another_request_is_refused(live, feeds):
    rs, stub, _, _ = live
    first = stub.Rank(rank_request(feeds[0], request_id="used", limit=20))
    changed = [rank_request(feeds[1], request_id="used", limit=20),           # another user's request
               _mutated(feeds[0], lambda r: r.seen_post_ids.append(first.posts[0].post_id), limit=20),
               _mutated(feeds[0], lambda r: r.task_weights.__setitem__("poke", 1.0), limit=20),  # also bad
               _mutated(feeds[0], lambda r: r.candidates.post_ids.extend(f"x{i}" for i in range(2000)), limit=20)]
    for req in changed:
        req.request_id = "used"
        err = _error(stub.Rank, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith("request_id: 'used' was already used for a different request")
    again = stub.Rank(rank_request(feeds[0], request_id="used", limit=20))
    assert [p.post_id for p in again.posts] == [p.post_id for p in first.posts]


def test_seen_posts_dropped_and_weights_override(live, feeds):
    _, stub, _, _ = live
    base = stub.Rank(rank_request(feeds[0], request_id="", limit=60))
    seen = [p.post_id for p in base.posts[:5]]
    req = rank_request(feeds[0], request_id="", limit=60)
    req.seen_post_ids.extend(seen)
    resp = stub.Rank(req)
    assert resp.dropped_seen == 5 and len(resp.posts) == 55
    assert not set(seen) & {p.post_id for p in resp.posts}
    req = rank_request(feeds[0], request_id="", limit=60)
    for t in resp.tasks:
        req.task_weights[t] = 0.0
    req.task_weights["share"] = 1.0
    shares = stub.Rank(req)
    k = list(resp.tasks).index("share")
    assert [p.ev for p in shares.posts] == pytest.approx([p.probabilities[k] for p in shares.posts], abs=1e-6)


def test_explain_returns_named_contributions(live, feeds):
    _, stub, _, _ = live
    resp = stub.Rank(rank_request(feeds[0], request_id="", limit=3, explain=True))
    names = {c.name for p in resp.posts for c in p.contributions}
    assert len(resp.posts[0].contributions) == 10
    assert names & {"leaves", "dnn", "user×author", "user×post", "constant"}


def test_explained_blocks_add_up_to_the_served_logit(tiny_bundle):
    """Every block's contribution, leaves to constant, with the bundle's feature values: for one task
    at weight 1 the EV contributions sum to p(1 - p) times the logit the scorer serves."""
    from feedsim.simulate import simulate
    from serving.explain import contributions
    from stacker.features import CandidateBatch
    from stacker.ranker import StackedRanker
    ranker = StackedRanker.load(tiny_bundle)
    assert ranker.scorer.values["l"] != 1.0                    # the default values are not all 1
    f = ranker.features(CandidateBatch.from_table(simulate(2_000, seed=5).head(40), ranker.spec))
    z = ranker.scorer.logits(f.leaves, f.hidden, f.ids, f.context)                # [K, T]
    p = 1.0 / (1.0 + np.exp(-z))
    sel = np.arange(len(z))
    for k in range(len(ranker.tasks)):
        weights = np.eye(len(ranker.tasks))[k]
        out = contributions(ranker, f, sel, p, weights, ["device", "surface", "hour", "media", "pos"], top_k=100)
        total = np.array([sum(v for _, v in row) for row in out])
        np.testing.assert_allclose(total, p[:, k] * (1 - p[:, k]) * z[:, k], rtol=1e-9, atol=1e-12)


def test_reload_swaps_and_a_bad_bundle_is_refused(live, feeds, tiny_bundle, tmp_path):
    from stacker.bundle import copy_bundle, finalize
    rs, stub, admin, _ = live
    good = copy_bundle(tiny_bundle, tmp_path / "good")
    resp = admin.Reload(pb.ReloadRequest(bundle_path=str(good)), metadata=AUTH)
    assert resp.model_version.bundle_id == resp.previous_version.bundle_id  # same bundle, new copy
    assert rs.model.current().path == good
    bad = copy_bundle(tiny_bundle, tmp_path / "bad")
    with open(bad / "dnn.npz", "ab") as f:
        f.write(b"x")
    err = _error(admin.Reload, pb.ReloadRequest(bundle_path=str(bad)), metadata=AUTH)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "bundle refused" in err.details() and "dnn.npz" in err.details()
    assert rs.model.current().path == good
    assert len(stub.Rank(rank_request(feeds[0], request_id="")).posts) == 50
    err = _error(admin.Reload, pb.ReloadRequest(bundle_path=str(tmp_path / "nope")), metadata=AUTH)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a bundle directory" in err.details()
    listed = copy_bundle(tiny_bundle, tmp_path / "list")
    (listed / "manifest.json").write_text("[]")
    no_depth = copy_bundle(tiny_bundle, tmp_path / "nodepth")
    m = json.loads((no_depth / "manifest.json").read_text())
    del m["gbdt"]["depth"]
    finalize(no_depth, m)                                  # a consistent manifest the loader cannot use
    edited = copy_bundle(tiny_bundle, tmp_path / "edited")
    m = json.loads((edited / "manifest.json").read_text())
    m["tasks"] = m["tasks"][::-1]                          # every task's scores under another's name
    (edited / "manifest.json").write_text(json.dumps(m))
    for path, why in ((str(tmp_path / "nul\x00byte"), "not a bundle directory"), ("/" + "x" * 10_000, "File name too long"),
                      (str(listed), "manifest is a JSON list, not an object"),
                      (str(no_depth), "manifest.json: gbdt.depth None is not a positive integer"),
                      (str(edited), "manifest.json: checksum mismatch (the manifest was edited")):
        err = _error(admin.Reload, pb.ReloadRequest(bundle_path=path), metadata=AUTH)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and why in err.details(), err.details()
        assert rs.model.current().path == good
    assert len(stub.Rank(rank_request(feeds[0], request_id="")).posts) == 50


def test_swaps_under_load_fail_no_request(live, feeds, tiny_bundle, tmp_path):
    import threading
    from stacker.bundle import copy_bundle
    rs, stub, admin, _ = live
    copies = [copy_bundle(tiny_bundle, tmp_path / f"c{i}") for i in range(2)]
    stop, errors, done = threading.Event(), [], []

    def load():
        while not stop.is_set():
            try:
                done.append(len(stub.Rank(rank_request(feeds[2], request_id="")).posts))
            except grpc.RpcError as e:
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        admin.Reload(pb.ReloadRequest(bundle_path=str(copies[i % 2])), metadata=AUTH)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and done


def test_snapshot_writes_a_loadable_bundle(live):
    from stacker.ranker import StackedRanker
    rs, _, admin, _ = live
    resp = admin.Snapshot(pb.SnapshotRequest(), metadata=AUTH)
    snap = StackedRanker.load(resp.path)
    assert snap.manifest["snapshot_of"]["bundle_id"] == rs.model.current().bundle_id


def test_a_snapshot_under_a_relative_directory_is_answered_with_its_absolute_path(tiny_bundle, tmp_path,
                                                                                  monkeypatch):
    from serving.snapshot import write_snapshot
    from stacker.ranker import StackedRanker
    monkeypatch.chdir(tmp_path)                           # the server's working directory, not the caller's
    path = write_snapshot(StackedRanker.load(tiny_bundle), Path("runs/snapshots"))
    assert path.is_absolute() and path.parent == tmp_path / "runs" / "snapshots"
    assert StackedRanker.load(path).manifest["snapshot_of"]["bundle_id"]


def test_info(live, tiny_bundle):
    _, stub, _, _ = live
    info = stub.Info(pb.InfoRequest())
    assert info.trees == 20 and list(info.tasks)[0] == "click"
    assert info.ev_weights["hide"] < 0
    assert info.training_start_ms < info.training_end_ms
    assert "click" in info.offline_metrics["tasks"]


def test_log_events_per_event_results_and_durability(live, tmp_path):
    from online.eventlog import EventLog
    from online.records import Engagement
    _, stub, _, _ = live
    E = pb.Event
    t = int(time.time() * 1000) - 60_000
    events = [E(event_id="e1", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_CLICK, ts_ms=t),
              E(event_id="e2", request_id="r1", post_id="p2", kind=pb.EVENT_KIND_DWELL, ts_ms=t + 1, dwell_ms=12_000),
              E(event_id="e1", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_CLICK, ts_ms=t),
              E(event_id="e3", request_id="r1", post_id="", kind=pb.EVENT_KIND_LIKE, ts_ms=t + 2),
              E(event_id="e4", request_id="r1", post_id="p4", kind=pb.EVENT_KIND_DWELL, ts_ms=t + 2),
              E(event_id="e5", request_id="r1", post_id="p5", ts_ms=t + 2)]
    resp = stub.LogEvents(pb.LogEventsRequest(events=events))
    S = pb.EventResult
    assert [r.status for r in resp.results] == [S.STATUS_ACCEPTED, S.STATUS_ACCEPTED, S.STATUS_DUPLICATE,
                                                S.STATUS_REJECTED, S.STATUS_REJECTED, S.STATUS_REJECTED]
    assert resp.results[3].reason.startswith("event.post_id: must be a non-empty string")
    assert resp.results[4].reason == "event.dwell_ms: must be > 0 for kind 'dwell'"
    assert resp.results[5].reason.startswith("event.kind: unknown kind 'EVENT_KIND_UNSPECIFIED'")
    again = stub.LogEvents(pb.LogEventsRequest(events=events[:1]))
    assert again.results[0].status == S.STATUS_DUPLICATE
    now = int(time.time() * 1000)
    timed = stub.LogEvents(pb.LogEventsRequest(events=[
        E(event_id="f1", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_VIEW, ts_ms=2**63 - 1),
        E(event_id="f2", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_VIEW, ts_ms=now + 60_000),
        E(event_id="f3", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_VIEW, ts_ms=now // 1000),
        E(event_id="f4", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_VIEW, ts_ms=10),
        E(event_id="f5", request_id="r1", post_id="p1", kind=pb.EVENT_KIND_CLICK)]))    # no time: the server's
    assert [r.status for r in timed.results] == [S.STATUS_REJECTED] * 4 + [S.STATUS_ACCEPTED]
    assert timed.results[1].reason.startswith("event.ts_ms: ") and \
        timed.results[1].reason.endswith("s ahead of the server's clock (limit 5 s)")
    assert timed.results[2].reason == f"event.ts_ms: {now // 1000} is not a time between 1990 and 2100 in " \
        "milliseconds since the epoch (it looks like seconds: multiply by 1,000) (0: the server's clock)"
    assert timed.results[3].reason.startswith("event.ts_ms: 10 is not a time between 1990 and 2100")
    err = _error(stub.LogEvents, pb.LogEventsRequest(events=[E(event_id=f"m{i}", request_id="r", post_id="p",
                                                                 kind=pb.EVENT_KIND_VIEW, ts_ms=now)
                                                               for i in range(10_001)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "events: 10001 events, limit 10000 per call"
    logged = [r for _, r in EventLog(tmp_path / "eventlog", readonly=True).read() if isinstance(r, Engagement)]
    assert [e.event_id for e in logged] == ["e1", "e2", "f5"]
    assert logged[1].dwell_ms == 12_000 and logged[0].kind == "click" and logged[0].ts == t
    assert now <= logged[2].ts <= int(time.time() * 1000)


def test_duplicates_are_recognised_after_a_restart_past_any_number_of_served_records(tmp_path):
    from online.records import ServedRecord
    from serving.events import EventIngest
    from serving.sink import SharedEventLog
    def events(ids):
        return [{"event_id": f"e{i}", "request_id": "r", "post_id": "p", "kind": "view", "ts": 1_700_000_000_000}
                for i in ids]
    log = SharedEventLog(tmp_path / "log", fsync=False)
    ingest = EventIngest(log, dedup_window=3)
    assert [r.status for r in ingest.log_events(events(range(5)))] == ["accepted"] * 5
    log.append([ServedRecord(f"r{i}", "p", "u", "a", 0, 1, "b", 0, "text", 0, "ios", "home", [], [])
                for i in range(50)])
    log.close()
    log = SharedEventLog(tmp_path / "log", fsync=False)  # the last 3 records are served ones, not events
    restarted = [r.status for r in EventIngest(log, dedup_window=3).log_events(events(range(5)))]
    log.close()
    # as before the restart: the last three ids accepted are remembered, the two before them forgotten
    assert restarted == ["accepted", "accepted", "duplicate", "duplicate", "duplicate"]


def test_an_event_id_reused_for_another_event_is_refused_not_taken_for_a_duplicate(tmp_path):
    from serving.events import EventIngest
    from serving.sink import SharedEventLog
    click = {"event_id": "e1", "request_id": "r", "post_id": "p", "kind": "click", "ts": 1_700_000_000_000}
    log = SharedEventLog(tmp_path / "log", fsync=False)
    ingest = EventIngest(log)
    first = ingest.log_events([click, {**click, "kind": "like"}, {**click, "event_id": "e2", "post_id": "q"},
                               {**click, "event_id": "e2", "post_id": "p"}])
    assert [r.status for r in first] == ["accepted", "rejected", "accepted", "rejected"]
    assert first[1].reason.startswith("event.event_id: 'e1' was already used for another event")
    log.close()
    log = SharedEventLog(tmp_path / "log", fsync=False)
    again = EventIngest(log).log_events([{**click, "ts": 0}, {**click, "kind": "like"}])
    log.close()
    assert [r.status for r in again] == ["duplicate", "rejected"]      # a retry may restamp its time


def test_an_event_for_a_post_its_request_did_not_return_is_accepted_with_a_warning(live, feeds):
    _, stub, _, _ = live
    resp = stub.Rank(rank_request(feeds[0], request_id="warn-1", limit=5))
    returned = [p.post_id for p in resp.posts]
    skipped = next(p for p in feeds[0].post_ids if p not in returned)
    E = pb.Event
    results = stub.LogEvents(pb.LogEventsRequest(events=[
        E(event_id="w1", request_id="warn-1", post_id=returned[0], kind=pb.EVENT_KIND_CLICK),
        E(event_id="w2", request_id="warn-1", post_id=skipped, kind=pb.EVENT_KIND_CLICK),
        E(event_id="w3", request_id="not-known-here", post_id=skipped, kind=pb.EVENT_KIND_CLICK)])).results
    assert [r.status for r in results] == [pb.EventResult.STATUS_ACCEPTED] * 3
    assert results[0].reason == "" and results[2].reason == ""
    assert results[1].reason == (f"accepted, but post {skipped!r} is not among the 5 posts request 'warn-1' "
                                 f"returned: it will not be learned")


def test_served_records_reach_the_event_log(live, feeds, tmp_path):
    from online.eventlog import EventLog
    from online.records import ServedRecord
    rs, stub, _, _ = live
    resp = stub.Rank(rank_request(feeds[0], request_id="served-1", limit=7))
    rs.sink.flush()
    records = [r for _, r in EventLog(tmp_path / "eventlog", readonly=True).read()
               if isinstance(r, ServedRecord) and r.request_id == "served-1"]
    assert [r.post_id for r in records] == [p.post_id for p in resp.posts]
    assert [r.position for r in records] == list(range(7))
    spec = rs.model.current().spec
    assert all(len(r.user_features) == len(spec.user_features) for r in records)
    assert all(len(r.post_features) == len(spec.post_features) for r in records)
    assert records[0].bundle_id == resp.model_version.bundle_id and records[0].device == feeds[0].device


def test_an_answer_the_client_can_no_longer_receive_is_neither_logged_nor_kept_for_retries(live, feeds, tmp_path):
    from online.eventlog import EventLog
    from online.records import ServedRecord
    from serving import convert
    from serving.errors import Cancelled, DeadlineExceeded
    rs, stub, _, _ = live
    left = iter([1.0, 1.0, 0.0])                       # time enough for every stage, none left at the end
    with pytest.raises(DeadlineExceeded, match="passed before the answer was ready"):
        rs.handler.rank(convert.rank_input(rank_request(feeds[0], request_id="late-1")), lambda: next(left))
    with pytest.raises(Cancelled, match="cancelled by the client"):
        rs.handler.rank(convert.rank_input(rank_request(feeds[1], request_id="gone-1")), alive=lambda: False)
    retried = stub.Rank(rank_request(feeds[0], request_id="late-1", limit=7))
    rs.sink.flush()
    served = [r.request_id for _, r in EventLog(tmp_path / "eventlog", readonly=True).read()
              if isinstance(r, ServedRecord)]
    assert served == ["late-1"] * 7 and len(retried.posts) == 7


def test_deadline_is_respected(live, feeds):
    _, stub, _, _ = live
    err = _error(stub.Rank, rank_request(feeds[0], request_id=""), timeout=0.001)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_ranks_that_queue_too_long_are_shed_while_events_and_health_checks_get_through(serving_server, tiny_bundle,
                                                                                        feeds):
    import threading
    rs = serving_server(bundle=tiny_bundle, threads=1, max_queue_ms=20)
    big = feed_requests(1, min_candidates=1000, max_candidates=1000, seed=5)[0]
    with grpc.insecure_channel(f"127.0.0.1:{rs.port}") as channel:
        stub = pb_grpc.RankerStub(channel)
        served = stub.Rank(rank_request(feeds[0], request_id="seen-1"))
        calls = [stub.Rank.future(rank_request(big, request_id="")) for _ in range(60)]
        side = {"events": [], "health": []}

        def alongside():
            for i in range(5):
                ev = pb.Event(event_id=f"v{i}", request_id="seen-1", post_id=served.posts[i].post_id,
                              kind=pb.EVENT_KIND_VIEW)
                side["events"] += [r.status for r in stub.LogEvents(pb.LogEventsRequest(events=[ev])).results]
                side["health"].append(_health(channel))
        t = threading.Thread(target=alongside)
        t.start()
        codes, refusals = [], []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                refusals.append(e.details())
        t.join()
        assert grpc.StatusCode.OK in codes and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert refusals and all(d.startswith("overloaded: this call waited") and "max_queue_ms" in d for d in refusals)
        assert side["events"] == [pb.EventResult.STATUS_ACCEPTED] * 5
        assert side["health"] == [health_pb2.HealthCheckResponse.SERVING] * 5
        shed = rs.metrics.errors.labels("Rank", "RESOURCE_EXHAUSTED")._value.get()
        assert shed == len(refusals)
        assert len(stub.Rank(rank_request(big, request_id="")).posts) > 0


def test_a_request_slow_to_arrive_on_an_idle_server_is_not_taken_for_a_queued_one(serving_server, tiny_bundle,
                                                                                   feeds):
    rs = serving_server(bundle=tiny_bundle, max_queue_ms=100)
    with grpc.insecure_channel(f"127.0.0.1:{rs.port}") as channel:
        # a unary call on the wire: headers first, then its one message, here 300 ms later
        rank = channel.stream_unary("/feedrank.v1.Ranker/Rank", request_serializer=pb.RankRequest.SerializeToString,
                                    response_deserializer=pb.RankResponse.FromString)

        def slow():
            time.sleep(0.3)
            yield rank_request(feeds[0], request_id="")
        assert len(rank(slow(), timeout=5).posts) == 50
    assert rs.metrics.errors.labels("Rank", "RESOURCE_EXHAUSTED")._value.get() == 0


def test_calls_past_the_concurrency_cap_are_refused_at_once_and_the_server_goes_on(serving_server, tiny_bundle):
    rs = serving_server(bundle=tiny_bundle, threads=1, max_concurrent_rpcs=2, max_queue_ms=0)
    big = feed_requests(1, min_candidates=1000, max_candidates=1000, seed=5)[0]
    with grpc.insecure_channel(f"127.0.0.1:{rs.port}") as channel:
        stub = pb_grpc.RankerStub(channel)
        stub.Rank(rank_request(big, request_id=""))                  # connected and warm
        calls = [stub.Rank.future(rank_request(big, request_id="")) for _ in range(40)]
        codes = []
        for call in calls:
            try:
                codes.append(grpc.StatusCode.OK if call.result().posts else None)
            except grpc.RpcError as e:
                codes.append(e.code())
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "concurrent rpc limit" in e.details().lower()
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes.count(grpc.StatusCode.OK) >= 2
        assert len(stub.Rank(rank_request(big, request_id="")).posts) > 0
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_misspelt_settings_variable_is_refused_naming_the_setting_meant(monkeypatch):
    from serving.settings import load_settings
    monkeypatch.setenv("FEEDRANK_DEFAULT_LIMT", "3")
    with pytest.raises(ValueError, match="FEEDRANK_DEFAULT_LIMT is not a setting \\(did you mean FEEDRANK_DEFAULT_LIMIT"):
        load_settings()
    monkeypatch.delenv("FEEDRANK_DEFAULT_LIMT")
    monkeypatch.setenv("FEEDRANK_DEFAULT_LIMIT", "3")
    monkeypatch.setenv("FEEDRANK_DEBUG", "1")
    assert load_settings().default_limit == 3
    # a Kubernetes Service named feedrank puts its service links in every pod of the namespace
    links = {"FEEDRANK_SERVICE_HOST": "10.96.0.12", "FEEDRANK_SERVICE_PORT": "50051",
             "FEEDRANK_PORT_50051_TCP": "tcp://10.96.0.12:50051", "FEEDRANK_PORT_50051_TCP_ADDR": "10.96.0.12"}
    for k, v in links.items():
        monkeypatch.setenv(k, v)
    assert load_settings().default_limit == 3
    monkeypatch.setenv("FEEDRANK_PORT", "tcp://10.96.0.12:50051")
    with pytest.raises(ValueError, match="service link Kubernetes sets for a Service named feedrank"):
        load_settings()
    assert load_settings(port=50051).port == 50051


def test_settings_from_file_env_and_flags(tmp_path, monkeypatch):
    from serving.settings import load_settings
    cfg = tmp_path / "serve.toml"
    cfg.write_text('port = 7000\nmax_candidates = 321\nunknown_features = "reject"\n')
    monkeypatch.setenv("FEEDRANK_MAX_CANDIDATES", "654")
    s = load_settings(cfg, port=7001)
    assert (s.port, s.max_candidates, s.unknown_features) == (7001, 654, "reject")
    with pytest.raises(Exception):
        load_settings(cfg, not_a_setting=1)
    for name, text in (("serve.yaml", "port: 7002\nmax_candidates: 222\n"),
                       ("serve.json", '{"port": 7003, "max_candidates": 333}')):
        (tmp_path / name).write_text(text)
        monkeypatch.delenv("FEEDRANK_MAX_CANDIDATES")
        s = load_settings(tmp_path / name)
        assert (s.port, s.max_candidates) == ((7002, 222) if name.endswith("yaml") else (7003, 333))
        monkeypatch.setenv("FEEDRANK_MAX_CANDIDATES", "654")
    # the event log: "off" turns it off (from the environment too); an empty path is no directory
    monkeypatch.setenv("FEEDRANK_EVENTLOG_DIR", "off")
    assert load_settings().eventlog_dir is None and load_settings().online_metrics_file is None
    monkeypatch.setenv("FEEDRANK_EVENTLOG_DIR", "")
    with pytest.raises(ValueError, match="eventlog_dir\n.*empty: give a directory, or off"):
        load_settings()
    monkeypatch.delenv("FEEDRANK_EVENTLOG_DIR")
    (tmp_path / "off.yaml").write_text("eventlog_dir: off\n")          # YAML reads a bare off as false
    assert load_settings(tmp_path / "off.yaml").eventlog_dir is None


def test_docs_grpcurl_example_is_a_valid_rank_request(live):
    import re
    from google.protobuf import json_format
    _, stub, _, _ = live
    text = (ROOT / "docs" / "serving.md").read_text()
    body = re.search(r"<<'JSON'\n(.*?)\nJSON", text, re.S).group(1)
    req = json_format.Parse(body, pb.RankRequest())
    req.context.time_ms = int(time.time() * 1000)
    resp = stub.Rank(req)
    assert [p.post_id for p in resp.posts] and resp.posts[0].contributions


def test_undecodable_request_is_invalid_argument(live):
    rs, _, _, channel = live
    rank = channel.unary_unary("/feedrank.v1.Ranker/Rank", request_serializer=None,
                               response_deserializer=pb.RankResponse.FromString)
    err = _error(rank, b"\xff\xff\xff garbage")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("request: not a valid feedrank.v1.RankRequest")
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_metrics_count_latency_errors_and_model(live, feeds):
    rs, stub, _, _ = live
    stub.Rank(rank_request(feeds[0], request_id=""))
    _error(stub.Rank, pb.RankRequest(user=pb.User(id="u")))
    reg = rs.metrics.registry
    assert reg.get_sample_value("feedrank_rpc_latency_seconds_count", {"method": "Rank"}) == 2
    assert reg.get_sample_value("feedrank_rpc_errors_total", {"method": "Rank", "code": "INVALID_ARGUMENT"}) == 1
    assert reg.get_sample_value("feedrank_rank_candidates_count") == 2
    assert reg.get_sample_value("feedrank_model_info", {"bundle_id": rs.model.current().bundle_id,
                                                        "update_seq": "0", "version": rs.model.current().version,
                                                        "path": str(rs.model.current().path)}) == 1


def test_inputs_outside_the_training_range_are_counted_per_feature(live, feeds):
    """A candidate value past what the bundle's DNN was trained on is counted in
    ``feedrank_rank_inputs_out_of_range_total{feature}`` (the network clips it to its range); the
    request is ranked as usual."""
    import copy
    rs, stub, _, _ = live
    reg = rs.metrics.registry
    ranker = rs.model.current()
    feed = copy.deepcopy(feeds[1])
    name = feed.feature_names[0]
    col = ranker.spec.dense_names.index(name)
    lo, hi = float(ranker.mlp.lo[col]), float(ranker.mlp.hi[col])
    feed.features[:, 0] = (lo + hi) / 2
    feed.features[:5, 0] = hi + 10 * (hi - lo) + 1      # above the range
    feed.features[5:7, 0] = lo - 1                        # below it
    feed.features[7, 0], feed.features[8, 0] = lo, hi     # at its edges: inside
    counted = lambda: reg.get_sample_value("feedrank_rank_inputs_out_of_range_total", {"feature": name}) or 0.0  # noqa: E731
    before = counted()
    resp = stub.Rank(rank_request(feed, request_id=""))
    assert len(resp.posts) == 50 and len({p.post_id for p in resp.posts}) == 50
    assert counted() - before == 7


def test_info_returns_online_metrics_when_the_learner_publishes_them(serving_server, tiny_bundle, tmp_path):
    path = tmp_path / "online.json"
    rs = serving_server(bundle=tiny_bundle, online_metrics_file=path)
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{rs.port}"))
    assert not stub.Info(pb.InfoRequest()).HasField("online_metrics")
    path.write_text('{"click": {"ne": 0.91}, "learned": 1200}')
    info = stub.Info(pb.InfoRequest())
    assert info.online_metrics["click"]["ne"] == 0.91 and info.online_metrics["learned"] == 1200


def test_feedrank_serve_drains_on_sigterm(tiny_bundle, tmp_path, feeds):
    import os
    import signal
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "feedrank.cli", "serve", "--bundle", str(tiny_bundle),
                             "--port", str(port), "--eventlog-dir", str(tmp_path / "log"),
                             "--learner-state-dir", str(tmp_path / "learner")], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEEDRANK_DRAIN_DELAY_S": "1.5", "FEEDRANK_ADMIN_TOKEN": TOKEN})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        deadline = time.time() + 30
        while _health(channel) != health_pb2.HealthCheckResponse.SERVING and time.time() < deadline:
            time.sleep(0.05)
        assert len(pb_grpc.RankerStub(channel).Rank(rank_request(feeds[0])).posts) == 50
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING and time.time() < deadline:
            time.sleep(0.02)
        # the drain delay: balancers see NOT_SERVING while calls already on their way are still answered,
        # and a bundle swapped in meanwhile does not make the process SERVING again
        assert len(pb_grpc.RankerStub(channel).Rank(rank_request(feeds[1])).posts) == 50
        pb_grpc.AdminStub(channel).Reload(pb.ReloadRequest(bundle_path=str(tiny_bundle)), metadata=AUTH)
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert "still answering for 1.5s" in err and "draining" in err
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()


def test_embedded_learner_follows_a_hot_swapped_bundle(tiny_bundle, other_bundle, tmp_path, feeds):
    """`feedrank serve --model-dir`: the learner starts on the bundle that goes live and, when a newer
    bundle is swapped in, checkpoints, steps aside (its checkpoints archived) and learns the new one."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    models, state = tmp_path / "models", tmp_path / "learner"
    models.mkdir()
    shutil.copytree(tiny_bundle, models / "a")
    old_id = json.loads((models / "a" / "manifest.json").read_text())["bundle_id"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FEEDRANK_POLL_INTERVAL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "feedrank.cli", "serve", "--model-dir", str(models), "--port",
                             str(port), "--eventlog-dir", str(tmp_path / "log"), "--learner-state-dir", str(state)],
                            cwd=ROOT, env=env, stderr=open(tmp_path / "serve.log", "w"))

    def status_bundle(deadline_s: float, want: str) -> str | None:
        deadline = time.time() + deadline_s
        while time.time() < deadline:
            try:
                found = json.loads((state / "status.json").read_text()).get("bundle_id")
            except (OSError, ValueError):
                found = None
            if found == want:
                return found
            time.sleep(0.2)
        return None

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        deadline = time.time() + 60  # listening comes before the model is loaded: health says when
        while _health(channel) != health_pb2.HealthCheckResponse.SERVING and time.time() < deadline:
            time.sleep(0.1)
        stub = pb_grpc.RankerStub(channel)
        assert stub.Rank(rank_request(feeds[0])).model_version.bundle_id == old_id
        assert status_bundle(60, old_id) == old_id
        shutil.copytree(other_bundle, models / "b")  # newer than the copy of tiny_bundle: swapped in
        new_id = json.loads((other_bundle / "manifest.json").read_text())["bundle_id"]
        deadline, served = time.time() + 30, None
        for i in range(10_000):  # a fresh request id each time: a repeated one replays its response
            served = stub.Rank(rank_request(feeds[1], request_id=f"swap-{i}")).model_version.bundle_id
            if served == new_id or time.time() > deadline:
                break
            time.sleep(0.2)
        assert served == new_id
        assert status_bundle(60, new_id) == new_id
        (archived,) = (state / "archive").iterdir()
        assert archived.name.startswith(old_id + "-") and any((archived / "checkpoints").iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()


def test_learner_supervisor_restarts_a_dead_learner_and_starts_none_after_stop(tiny_bundle, tmp_path):
    """A learner that dies is started again (after the back-off); once stopped, no swap starts one."""
    import json
    import os
    import signal

    from serving.learner_process import LearnerSupervisor
    from serving.settings import load_settings

    settings = load_settings(bundle=tiny_bundle, eventlog_dir=tmp_path / "log", learner_state_dir=tmp_path / "learner")
    bundle_id = json.loads((tiny_bundle / "manifest.json").read_text())["bundle_id"]
    sup = LearnerSupervisor(settings, check_s=0.2, restart_backoff_s=0.5)
    sup.start()
    try:
        sup.follow(tiny_bundle, bundle_id)
        deadline = time.time() + 30
        while (sup.proc is None or not sup.proc.is_alive()) and time.time() < deadline:
            time.sleep(0.05)
        first = sup.proc
        assert first is not None and first.is_alive()
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while (sup.proc is first or sup.proc is None or not sup.proc.is_alive()) and time.time() < deadline:
            time.sleep(0.05)
        assert sup.proc is not first and sup.proc.is_alive() and sup.restarts == 1
    finally:
        sup.stop()
    assert not sup.is_alive() and not sup.proc.is_alive()
    last = sup.proc
    sup.follow(tiny_bundle, "another-bundle")
    time.sleep(0.5)
    assert sup.proc is last and not last.is_alive()


def test_serve_without_a_model_says_how_to_make_one():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "feedrank.cli", "serve"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "feedrank train --simulate 200000 --out bundles/default" in out.stderr


def test_tls(serving_server, tiny_bundle, tmp_path, feeds):
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    rs = serving_server(bundle=tiny_bundle, tls_cert=cert, tls_key=key)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{rs.port}", creds) as channel:
        assert len(pb_grpc.RankerStub(channel).Rank(rank_request(feeds[0], request_id="")).posts) == 50
    with grpc.insecure_channel(f"127.0.0.1:{rs.port}") as plain:
        assert _error(pb_grpc.RankerStub(plain).Rank, rank_request(feeds[0]), timeout=2).code() in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _raised_biases(ranker, delta: float):
    """Weight rows holding every task's bias, and their values with each bias raised by ``delta``."""
    at, slot = ranker.scorer.bias_slots()
    rows, where = np.unique(at, return_inverse=True)
    values = ranker.scorer.weights[rows].copy()
    values[where, slot] += delta
    return rows, values


def test_published_weight_updates_change_scores_and_version(tiny_bundle, feeds):
    from serving.convert import rank_input
    from serving.handler import RankingHandler
    from serving.model import LiveModel
    from serving.settings import load_settings
    from stacker.ranker import StackedRanker

    ranker = StackedRanker.load(tiny_bundle)
    handler = RankingHandler(LiveModel(), load_settings(eventlog_dir=None))
    batch, _ = handler.build_batch(rank_input(rank_request(feeds[0])), ranker, int(time.time() * 1000))
    before = ranker.predict(batch)
    rows, values = _raised_biases(ranker, 0.5)
    ranker.apply_update(rows, values, update_seq=3)
    after = ranker.predict(batch)
    assert np.all(after > before)  # every task's bias rose
    assert ranker.version.endswith("+3")


def test_reload_reaches_sibling_workers(serving_server, tiny_bundle, tmp_path):
    from stacker.bundle import copy_bundle
    control = tmp_path / "control"
    control.mkdir()
    a = serving_server(bundle=tiny_bundle, admin_token=TOKEN, control_dir=control, eventlog_dir=tmp_path / "a")
    b = serving_server(bundle=tiny_bundle, admin_token=TOKEN, control_dir=control, eventlog_dir=tmp_path / "b")
    new = copy_bundle(tiny_bundle, tmp_path / "new")
    with grpc.insecure_channel(f"127.0.0.1:{a.port}") as channel:
        pb_grpc.AdminStub(channel).Reload(pb.ReloadRequest(bundle_path=str(new)), metadata=AUTH)
    deadline = time.time() + 10
    while b.model.current().path != new and time.time() < deadline:
        time.sleep(0.05)
    assert a.model.current().path == new and b.model.current().path == new


def test_a_bundle_copied_in_file_by_file_loads_once_complete(serving_server, tiny_bundle, tmp_path, feeds):
    models = tmp_path / "models"
    (models / "b").mkdir(parents=True)
    shutil.copy(tiny_bundle / "manifest.json", models / "b")          # the manifest first, the rest later
    rs = serving_server(model_dir=models, poll_interval_s=0.1)
    channel = grpc.insecure_channel(f"127.0.0.1:{rs.port}")
    assert not rs.model.ready and _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    time.sleep(0.3)                                                   # polled and refused again meanwhile
    assert "listed in the manifest but missing" in rs.model.refused[(models / "b").resolve()][1]
    for f in tiny_bundle.rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            (models / "b" / f.relative_to(tiny_bundle)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, models / "b" / f.relative_to(tiny_bundle))
    deadline = time.time() + 10
    while not rs.model.ready and time.time() < deadline:
        time.sleep(0.05)
    assert rs.model.current().path == models / "b"
    assert len(pb_grpc.RankerStub(channel).Rank(rank_request(feeds[0], request_id="")).posts) == 50


def test_published_online_updates_are_applied(serving_server, tiny_bundle, tmp_path, feeds):
    from online.publish import UpdatePublisher
    from stacker.bundle import copy_bundle
    models = tmp_path / "models"
    models.mkdir()
    copy_bundle(tiny_bundle, models / "live")
    rs = serving_server(model_dir=models, update_poll_s=0.05)
    stub = pb_grpc.RankerStub(grpc.insecure_channel(f"127.0.0.1:{rs.port}"))
    req = rank_request(feeds[0], request_id="", limit=5)
    before = stub.Rank(req)
    ranker = rs.model.current()
    rows, values = _raised_biases(ranker, 3.0)                 # every logit up by 3
    UpdatePublisher(models, ranker.bundle_id).publish(rows, values, covered_offset=0)
    deadline = time.time() + 10
    while rs.model.current().update_seq == 0 and time.time() < deadline:
        time.sleep(0.02)
    after = stub.Rank(req)
    assert after.model_version.update_seq == 1 and after.model_version.version.endswith("+1")
    assert after.posts[0].probabilities[0] > before.posts[0].probabilities[0]
    info = stub.Info(pb.InfoRequest()).model_version
    assert (info.update_seq, info.covered_offset) == (1, 0) == (after.model_version.update_seq,
                                                                after.model_version.covered_offset)


def test_learner_status_is_exported_to_prometheus(tmp_path):
    import json as _json
    from prometheus_client import generate_latest
    from serving.metrics import LearnerStatusCollector, ServingMetrics
    status = tmp_path / "status.json"
    status.write_text(_json.dumps({
        "lag": 12, "events_per_s": 5000.0, "update_seq": 7, "open_impressions": 3,
        "join": {"examples": 40, "late": 2, "unmatched": 1}, "counters": {"checkpoints": 4},
        "progressive": {"click": {"overall": {"ne": 0.8, "auc": 0.75, "calibration": 1.01},
                                  "recent": {"ne": 0.79, "auc": float("nan"), "calibration": 0.99}}}}))
    metrics = ServingMetrics()
    metrics.registry.register(LearnerStatusCollector(status))
    text = generate_latest(metrics.registry).decode()
    assert "feedrank_learner_lag_records 12.0" in text
    assert 'feedrank_learner_join_total{outcome="late"} 2.0' in text
    assert "feedrank_learner_checkpoints_total 4.0" in text
    assert 'feedrank_progressive_ne{task="click",window="recent"} 0.79' in text
    assert 'feedrank_progressive_auc{task="click",window="recent"}' not in text  # NaN left out


FAIL_FSYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
/* fsync fails with EIO while the file named by FEEDRANK_TEST_FSYNC_FAILS exists: an I/O error the disk
   reports at fsync, after the write itself succeeded (the case a later successful fsync does not undo). */
int fsync(int fd) {
    static int (*real)(int) = 0;
    const char *flag = getenv("FEEDRANK_TEST_FSYNC_FAILS");
    if (!real) real = (int (*)(int)) dlsym(RTLD_NEXT, "fsync");
    if (flag && access(flag, F_OK) == 0) { errno = EIO; return -1; }
    return real(fd);
}
"""


def test_an_fsync_failure_acknowledges_nothing_stops_appends_and_a_restart_finds_every_record(tiny_bundle,
                                                                                             tmp_path, feeds):
    """A real `feedrank serve` whose fsync fails (libc's fsync replaced through LD_PRELOAD while a flag file
    exists): LogEvents acknowledges nothing of that batch, says a restart is needed and refuses every later
    batch even once fsync works again; Rank goes on; after a restart every acknowledged event is at its
    offset and the retried batch is taken (its events already in the log come back DUPLICATE)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from online.eventlog import EventLog
    from online.records import Engagement

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the fsync fault injector")
    (tmp_path / "failfsync.c").write_text(FAIL_FSYNC_C)
    shim = tmp_path / "failfsync.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "failfsync.c"), "-ldl"], check=True)
    flag = tmp_path / "disk-fails"
    env = {**os.environ, "LD_PRELOAD": str(shim), "FEEDRANK_TEST_FSYNC_FAILS": str(flag)}
    log_dir = tmp_path / "log"
    E, S = pb.Event, pb.EventResult
    t = int(time.time() * 1000) - 1_000

    def batch(first: int, n: int = 3):
        return pb.LogEventsRequest(events=[E(event_id=f"e{i}", request_id="r1", post_id=f"p{i}",
                                             kind=pb.EVENT_KIND_CLICK, ts_ms=t + i) for i in range(first, first + n)])

    def start():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "feedrank.cli", "serve", "--bundle", str(tiny_bundle),
                                 "--port", str(port), "--eventlog-dir", str(log_dir), "--no-learner"],
                                cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        deadline = time.time() + 30
        while _health(channel) != health_pb2.HealthCheckResponse.SERVING and time.time() < deadline:
            time.sleep(0.05)
        return proc, channel, pb_grpc.RankerStub(channel)

    def stop(proc, channel):
        channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.stderr.read()

    proc, channel, stub = start()
    try:
        first = stub.LogEvents(batch(0))
        assert [r.status for r in first.results] == [S.STATUS_ACCEPTED] * 3
        assert [r.log_offset for r in first.results] == [0, 1, 2]
        flag.touch()                                           # the disk starts failing
        err = _error(stub.LogEvents, batch(3))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "fsync failed" in err.details() and "no event of it was acknowledged" in err.details()
        assert "the first 3 of them are in the log all the same" in err.details()
        assert err.details().endswith("retry once the server has been restarted")
        flag.unlink()                                          # fsync works again: the log still takes nothing
        err = _error(stub.LogEvents, batch(6))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "reopened (restart the server)" in err.details()
        assert len(stub.Rank(rank_request(feeds[0])).posts) == 50    # ranking goes on
    finally:
        said = stop(proc, channel)
    assert "fsync failed" in said
    proc, channel, stub = start()                              # the restart the answer asked for
    try:
        retried = stub.LogEvents(batch(3))
        assert [r.status for r in retried.results] == [S.STATUS_DUPLICATE] * 3   # in the log since the failure
        later = stub.LogEvents(batch(6))
        assert [r.status for r in later.results] == [S.STATUS_ACCEPTED] * 3
    finally:
        stop(proc, channel)
    logged = {o: r.event_id for o, r in EventLog(log_dir, readonly=True).read() if isinstance(r, Engagement)}
    assert {o: logged[o] for o in (0, 1, 2)} == {0: "e0", 1: "e1", 2: "e2"}
    assert sorted(logged.values()) == [f"e{i}" for i in range(9)]
    assert [logged[r.log_offset] for r in later.results] == ["e6", "e7", "e8"]
