"""``feedrank demo``: the embedded default end to end.

Trains a small bundle on simulated impressions, starts ``feedrank serve`` (with its online learner)
on a free loopback port, and drives it with simulated users: each request ranks ~300 candidates, the
user looks at the top of the feed and engages by the world's true probabilities, and the views and
engagements go back through ``LogEvents``. Prints live latency and engagement, then a summary that
compares the served ranking with a chronological feed and with the oracle (true probabilities) on
the same requests — an A/B test in a box.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from stacker.schema import TASKS

KIND = {"click": 2, "like": 3, "comment": 4, "share": 5, "hide": 6}


def _bundle(workdir: Path, impressions: int, trees: int, quiet: bool) -> Path:
    from feedsim.simulate import simulate
    from stacker import bundle as bundles
    from stacker.dnn import DNNConfig
    from stacker.gbdt import GBDTConfig
    from stacker.progress import Progress
    from stacker.train import TrainConfig, config_key, train_bundle
    from stacker.vwstack import VWConfig

    path, stamp = workdir / "bundle", workdir / "bundle.settings"
    config = TrainConfig(gbdt=GBDTConfig(trees=trees), dnn=DNNConfig(epochs=4), vw=VWConfig(bits=25))
    # A bundle from an earlier run is reused only if it was trained on the same impressions with the
    # same settings (this version's defaults included).
    key = f"{impressions} {config_key(config)}"
    try:
        bundles.verify(path)
        if stamp.is_file() and stamp.read_text() == key:
            print(f"using the bundle in {path} (delete it to retrain)")
            return path
    except bundles.BundleError:
        pass
    print(f"training a bundle on {impressions:,} simulated impressions ({trees} trees) ...")
    t0 = time.time()
    df = simulate(impressions, progress=not quiet)
    stamp.unlink(missing_ok=True)
    train_bundle(df, path, config, progress=Progress(not quiet))
    stamp.write_text(key)
    print(f"bundle ready in {time.time() - t0:.0f}s")
    return path


def _wait_serving(channel, proc, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"feedrank serve exited with code {proc.returncode}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become SERVING in time")


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.client_ms, self.server_ms = [], []
        self.shown = 0
        self.engaged = {t: 0 for t in TASKS}
        self.expected = {"served": 0.0, "chronological": 0.0, "oracle": 0.0}
        self.requests = self.errors = self.events = 0
        self.version = ""
        self.window = []          # (time, client_ms, clicks, shown) since the last report


def _events(feed, out, t_ms):
    """VIEW for every shown post, then its engagements, a few simulated seconds apart."""
    from feedrank.v1 import ranking_pb2 as pb
    events = []
    for k, pid in enumerate(out["post_ids"]):
        base = f"{feed.request_id}/{pid}"
        events.append(pb.Event(event_id=base + "/view", request_id=feed.request_id, post_id=pid,
                               kind=pb.EVENT_KIND_VIEW, ts_ms=t_ms + 500 * k))
        for task, kind in KIND.items():
            if out["labels"][task][k]:
                events.append(pb.Event(event_id=f"{base}/{task}", request_id=feed.request_id,
                                       post_id=pid, kind=kind, ts_ms=t_ms + 500 * k + 3_000))
        if out["labels"]["dwell"][k]:
            events.append(pb.Event(event_id=base + "/dwell", request_id=feed.request_id, post_id=pid,
                                   kind=pb.EVENT_KIND_DWELL, ts_ms=t_ms + 500 * k + 15_000,
                                   dwell_ms=15_000))
    return events


def _expected_clicks(users, feed, order) -> float:
    positions = np.full(len(feed), 10_000)
    top = order[:feed.n_show]
    positions[top] = np.arange(len(top))
    return float(users.true_probabilities(feed, positions)[top, TASKS.index("click")].sum())


def _drive(stub, users, lock, clock, stats: _Stats, stop: threading.Event, candidates: int):
    from serving.client import rank_request
    from feedrank.v1 import ranking_pb2 as pb
    while not stop.is_set():
        with lock:
            now = clock()
            feed = users.next_request(now)
        request = rank_request(feed, limit=feed.n_show, n=candidates)
        t0 = time.perf_counter()
        try:
            response = stub.Rank(request, timeout=2.0)
        except grpc.RpcError as e:
            with stats.lock:
                stats.errors += 1
            print(f"  Rank failed: {e.code().name} {e.details()}", file=sys.stderr)
            time.sleep(0.2)
            continue
        client_ms = (time.perf_counter() - t0) * 1000
        ranked = [p.post_id for p in response.posts]
        with lock:
            out = users.engage(feed, ranked)
            truth = users.true_probabilities(feed)[:, TASKS.index("click")]
            chrono = np.argsort(-feed.created_at[:candidates], kind="stable")
            oracle = np.argsort(-truth[:candidates], kind="stable")
            exp_chrono = _expected_clicks(users, feed, chrono)
            exp_oracle = _expected_clicks(users, feed, oracle)
        try:
            stub.LogEvents(pb.LogEventsRequest(events=_events(feed, out, feed.ts)), timeout=5.0)
        except grpc.RpcError as e:
            print(f"  LogEvents failed: {e.code().name} {e.details()}", file=sys.stderr)
        with stats.lock:
            stats.requests += 1
            stats.client_ms.append(client_ms)
            stats.server_ms.append(response.server_ms)
            stats.shown += out["n_shown"]
            for t in TASKS:
                stats.engaged[t] += out["realised"][t]
            stats.expected["served"] += out["expected"]["click"]
            stats.expected["chronological"] += exp_chrono
            stats.expected["oracle"] += exp_oracle
            stats.version = response.model_version.version
            stats.window.append((client_ms, out["realised"]["click"], out["n_shown"]))


def run_demo(args) -> int:
    from feedsim.closed_loop import FeedUsers
    from feedsim.simulate import get_world
    from feedrank.v1 import ranking_pb2_grpc as rpc

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = _bundle(workdir, args.impressions, args.trees, args.quiet)
    manifest = json.loads((bundle / "manifest.json").read_text())
    from serving.bench import free_port
    port = free_port()
    events_dir = workdir / "events"
    # A fresh stream each run: simulated time restarts where the bundle's data ended.
    for stale in (events_dir, workdir / "learner", workdir / "models"):
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "feedrank.cli", "serve", "--bundle", str(bundle), "--port", str(port),
           "--eventlog-dir", str(events_dir), "--model-dir", str(workdir / "models"),
           "--attribution-window-ms", str(args.window_ms), "--learner-state-dir", str(workdir / "learner")]
    print(f"starting: feedrank serve on 127.0.0.1:{port} (event log {events_dir})")
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stats = _Stats()
    stop = threading.Event()
    try:
        _wait_serving(channel, proc, 180)
        stub = rpc.RankerStub(channel)
        world = get_world()
        users = FeedUsers(world, seed=args.seed, min_candidates=args.candidates,
                          max_candidates=args.candidates)
        sim_start = int(manifest["offline_metrics"]["test_time_range_ms"][1]) \
            if "offline_metrics" in manifest else int(manifest["training"]["time_range_ms"][1])
        wall_start = time.time()

        def clock():  # simulated time runs `speed` times faster than the wall clock
            return sim_start + int((time.time() - wall_start) * 1000 * args.speed)

        lock = threading.Lock()
        workers = [threading.Thread(target=_drive, daemon=True,
                                    args=(stub, users, lock, clock, stats, stop, args.candidates))
                   for _ in range(args.concurrency)]
        for w in workers:
            w.start()
        print(f"driving {args.concurrency} simulated clients for {args.seconds:.0f}s "
              f"({args.candidates} candidates per request, simulated time x{args.speed:g})")
        print(f"{'t':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CTR':>7}  model version")
        next_report = wall_start + args.report_every
        while time.time() - wall_start < args.seconds:
            time.sleep(max(0.0, min(next_report, wall_start + args.seconds) - time.time()))
            with stats.lock:
                window, stats.window = stats.window, []
                version = stats.version
            if window:
                ms = np.array([w[0] for w in window])
                ctr = sum(w[1] for w in window) / max(1, sum(w[2] for w in window))
                print(f"{time.time() - wall_start:5.0f} {len(window) / args.report_every:7.1f} "
                      f"{np.percentile(ms, 50):7.2f} {np.percentile(ms, 99):7.2f} {ctr:7.2%}  {version}")
            next_report += args.report_every
        stop.set()
        for w in workers:
            w.join(timeout=10)
        _summary(stats, time.time() - wall_start, channel, workdir)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        channel.close()
        print(f"server stopped (exit code {proc.returncode}); its log is {workdir / 'serve.log'}")
    if stats.requests:
        print(f"retrain from what was served: feedrank train --data {events_dir} --served-by {bundle} "
              f"--window-ms {args.window_ms} --out bundles/retrained")
    return 0 if stats.requests and not stats.errors else 1


def _summary(stats: _Stats, seconds: float, channel, workdir: Path) -> None:
    from feedrank.v1 import ranking_pb2 as pb
    from feedrank.v1 import ranking_pb2_grpc as rpc
    client = np.array(stats.client_ms or [0.0])
    server = np.array(stats.server_ms or [0.0])
    print("\nsummary")
    print(f"  requests {stats.requests:,} in {seconds:.0f}s ({stats.requests / seconds:.1f}/s), "
          f"errors {stats.errors}")
    print(f"  latency ms: client p50 {np.percentile(client, 50):.2f} p99 {np.percentile(client, 99):.2f}; "
          f"server p50 {np.percentile(server, 50):.2f} p99 {np.percentile(server, 99):.2f}")
    print(f"  shown {stats.shown:,} posts; engagements: " +
          ", ".join(f"{t} {n} ({n / max(1, stats.shown):.2%})" for t, n in stats.engaged.items()))
    e = stats.expected
    if e["oracle"] > 0:
        print(f"  expected clicks per request: served {e['served'] / stats.requests:.3f}, "
              f"chronological {e['chronological'] / stats.requests:.3f}, oracle {e['oracle'] / stats.requests:.3f}"
              f"  (served = {e['served'] / e['oracle']:.0%} of oracle, "
              f"{e['served'] / max(e['chronological'], 1e-9) - 1:+.0%} vs chronological)")
    try:
        info = rpc.RankerStub(channel).Info(pb.InfoRequest(), timeout=2)
        print(f"  model version at the end: {info.model_version.version}")
    except grpc.RpcError:
        pass
    _plot(client, server, workdir / "demo-latency.png")
    print(f"  latency histogram: {workdir / 'demo-latency.png'}")


def _plot(client, server, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, max(np.percentile(client, 99.5), 1.0) * 1.1, 60)
    ax.hist(client, bins=bins, alpha=0.6, label="client-observed")
    ax.hist(server, bins=bins, alpha=0.6, label="server-side")
    ax.set_xlabel("Rank latency (ms)")
    ax.set_ylabel("requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(sub) -> None:
    from feedrank import argtypes as T
    p = sub.add_parser("demo", help="train, serve and drive the embedded default with simulated users")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--impressions", type=T.positive_int, default=200_000, help="simulated impressions to train on")
    p.add_argument("--trees", type=T.positive_int, default=100)
    p.add_argument("--seconds", type=T.positive_float, default=30.0)
    p.add_argument("--concurrency", type=T.positive_int, default=2)
    p.add_argument("--candidates", type=T.positive_int, default=300)
    p.add_argument("--speed", type=T.positive_float, default=60.0, help="simulated seconds per wall second")
    p.add_argument("--window-ms", type=T.positive_int, default=300_000, help="attribution window (simulated ms)")
    p.add_argument("--report-every", type=T.positive_float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_demo)
