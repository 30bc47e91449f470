"""``feedrank bench freshness``: from an engagement acknowledged to a Rank response that includes it.

Under load (about 100 Rank requests/s and 5,000 events/s for the posts they return), each sample
ranks a fresh feed, reports a VIEW of every returned post, then a CLICK on the top post and takes
the time once LogEvents acknowledges it (durably in the event log, with its ``log_offset``). It then
re-ranks the same candidates until a response's ``model_version.covered_offset`` reaches that
offset and the post's click probability differs from the last one served before — the learner has
learned the click, published the weights and the server swapped them in.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np

from feedrank.v1 import ranking_pb2 as pb
from feedrank.v1 import ranking_pb2_grpc as pb_grpc

from .bench import EventFeeder, ServerProcess, _payloads, ensure_bundle, run_load
from .client import feed_requests, rank_request


def _sample(stub, feed, i: int, candidates: int, timeout_s: float) -> float | None:
    req = rank_request(feed, request_id=f"fresh-{i}-0", limit=20, n=candidates)
    req.context.time_ms = 0
    first = stub.Rank(req, timeout=5)
    click = list(first.tasks).index("click")
    post = first.posts[0].post_id
    now = int(time.time() * 1000)
    views = [pb.Event(event_id=f"fresh-{i}-v{k}", request_id=first.request_id, post_id=p.post_id,
                      kind=pb.EVENT_KIND_VIEW, ts_ms=now) for k, p in enumerate(first.posts)]
    stub.LogEvents(pb.LogEventsRequest(events=views), timeout=5)
    ack = stub.LogEvents(pb.LogEventsRequest(events=[pb.Event(
        event_id=f"fresh-{i}-click", request_id=first.request_id, post_id=post,
        kind=pb.EVENT_KIND_CLICK, ts_ms=now + 1)]), timeout=5)
    t0 = time.perf_counter()
    offset = ack.results[0].log_offset
    # The first response was served before the click existed: its probability is the baseline, so a
    # learner quick enough to cover the click before the next Rank still counts (it used to be missed).
    before = first.posts[0].probabilities[click]
    k = 0
    while time.perf_counter() - t0 < timeout_s:
        k += 1
        req.request_id = f"fresh-{i}-{k}"
        resp = stub.Rank(req, timeout=5)
        p = next((x.probabilities[click] for x in resp.posts if x.post_id == post), None)
        if resp.model_version.covered_offset >= offset and before is not None and p != before:
            return time.perf_counter() - t0
        if resp.model_version.covered_offset < offset:
            before = p
        time.sleep(0.01)
    return None


def bench_freshness(args) -> int:
    bundle = ensure_bundle(args)
    results = []
    for mode in (["embedded", "redis"] if args.mode == "both" else [args.mode]):
        results.append(_run(args, bundle, mode))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([{k: r[k] for k in ("mode", "p50_s", "p99_s", "samples")}
                                               for r in results], indent=2))
        _plot(results, Path(args.json).with_suffix(".png"))
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.png')}")
    return 0 if all(r["samples"] for r in results) else 1


def _run(args, bundle: Path, mode: str) -> dict:
    extra = ("--attribution-window-ms", str(args.window_ms))
    redis = None
    if mode == "redis":
        import tempfile
        from online.bench import redis_server
        redis = redis_server(Path(tempfile.mkdtemp(prefix="feedrank-redis-")))
        extra += ("--bus", redis.__enter__())
    server = ServerProcess(bundle, 1, args.threads, "with_learner", args.xgb_threads, extra=extra)
    stub = pb_grpc.RankerStub(server.channel)
    feeder = EventFeeder(server.channel, rate=args.events_per_s)
    stop = None
    load = None
    try:
        import threading
        stop = threading.Event()
        payloads = _payloads(64, args.candidates, server_time=True)
        feeder.start()
        background: dict = {}
        load = threading.Thread(daemon=True, target=lambda: background.update(run_load(
            server.channel, payloads, 2, 0, stop, on_response=feeder.on_response, rate=args.rank_per_s)))
        load.start()
        time.sleep(args.warmup_s)
        sent0, t_start = feeder.sent, time.time()
        feeds = feed_requests(args.samples, seed=7, min_candidates=args.candidates,
                              max_candidates=args.candidates)
        times, missed = [], 0
        for i, feed in enumerate(feeds):
            try:
                dt = _sample(stub, feed, i, args.candidates, args.timeout_s)
            except grpc.RpcError as e:
                print(f"  sample {i}: {e.code().name} {e.details()}")
                dt = None
            if dt is None:
                missed += 1
            else:
                times.append(dt)
            if (i + 1) % 25 == 0:
                arr = np.array(times) if times else np.array([np.nan])
                print(f"  {mode}: {i + 1}/{len(feeds)} samples, p50 {np.nanpercentile(arr, 50):.3f}s "
                      f"p99 {np.nanpercentile(arr, 99):.3f}s, missed {missed}, "
                      f"events {(feeder.sent - sent0) / max(1e-9, time.time() - t_start):,.0f}/s", flush=True)
        elapsed = time.time() - t_start
        events_per_s = (feeder.sent - sent0) / elapsed
        learner = _learner_status(server)
        stop.set()
        load.join(timeout=30)
        rank_per_s = len(background.get("client", [])) / max(background.get("wall", 1e-9), 1e-9)
        print(f"  load during the samples: {rank_per_s:.0f} background Rank requests/s (plus the samples' "
              f"own), {events_per_s:,.0f} events/s")
        if learner:
            print(f"  learner: {learner['learned']:,} examples learned, {learner['updates']:,} updates published, "
                  f"{learner['publish_ms']:.0f} ms per publish, learning {learner['learn_ms']:.0f} ms per update")
        arr = np.array(times)
        out = {"mode": mode, "learner": learner, "p50_s": float(np.percentile(arr, 50)) if len(arr) else float("nan"),
               "p99_s": float(np.percentile(arr, 99)) if len(arr) else float("nan"),
               "samples": len(arr), "missed": missed, "times": arr.tolist(),
               "rank_per_s": rank_per_s, "events_per_s": events_per_s}
        print(f"freshness ({mode}): p50 {out['p50_s']:.3f}s p99 {out['p99_s']:.3f}s over {len(arr)} samples "
              f"({missed} not seen within {args.timeout_s:.0f}s)")
        if missed:  # what the server and its learner said about it
            log = Path(server.tmp, "server.log").read_text(errors="replace").splitlines()
            for line in [x for x in log if " WARNING " in x or " ERROR " in x][-10:]:
                print(f"  server log: {line[:300]}")
        return out
    finally:
        if stop is not None:
            stop.set()
        feeder.stop()
        server.stop()
        if redis is not None:
            redis.__exit__(None, None, None)


def _learner_status(server) -> dict | None:
    """What the server's learner says it spent its time on (``status.json``), for the report."""
    try:
        st = json.loads(Path(server.tmp, "learner", "status.json").read_text())
    except (OSError, ValueError):
        return None
    updates = max(1, st["counters"].get("updates", 0))
    sec = st.get("seconds") or {}
    return {"learned": st["counters"].get("learned_examples", 0), "updates": st["counters"].get("updates", 0),
            "publish_ms": 1e3 * sec.get("publish", 0.0) / updates, "learn_ms": 1e3 * sec.get("vw", 0.0) / updates,
            "seconds": sec}


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        if r["times"]:
            ax.hist(r["times"], bins=40, histtype="step", label=f"{r['mode']} (p99 {r['p99_s']:.2f}s)")
    ax.set_xlabel("engagement acknowledged → Rank response including it (s)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
