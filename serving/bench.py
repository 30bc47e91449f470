"""Benchmarks of the serving path against a server in a separate process on loopback.

- ``serve``: server-side and client-observed latency (p50/p99), requests/s at several concurrencies,
  mean stage breakdown; ``--json`` writes the figures and a latency histogram PNG.
- ``swap``: ten+ hot swaps (Reload) under load at concurrency 4; counts failed requests.
- ``flood``: malformed requests; checks the server still reports SERVING and its RSS growth.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedrank.v1 import ranking_pb2 as pb
from feedrank.v1 import ranking_pb2_grpc as pb_grpc

from .client import feed_requests, rank_request

SETUPS = ("alone", "with_learner")  # with_learner: the online learner runs beside the server, fed events
TOKEN = "bench-token"


def ensure_bundle(args) -> Path:
    """``--bundle``, or the benchmark bundle (200k simulated impressions, default training) kept in
    ``--cache-dir``: the same one ``feedrank bench learn`` uses."""
    if args.bundle:
        return Path(args.bundle)
    from online.bench import ensure_bench_bundle
    return ensure_bench_bundle(Path(args.cache_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``feedrank serve`` in a child process; ``setup`` selects what runs beside it."""

    def __init__(self, bundle: Path, workers: int = 1, threads: int = 4, setup: str = "alone",
                 xgb_threads: int = 1, extra: tuple[str, ...] = (), max_queue_ms: float = 0.0):
        if setup not in SETUPS:
            raise ValueError(f"setup {setup!r}: one of {SETUPS}")
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="feedrank-bench-")
        learner = ["--learner", "--learner-state-dir", f"{self.tmp}/learner"] if setup == "with_learner" \
            else ["--no-learner"]
        cmd = [sys.executable, "-m", "feedrank.cli", "serve", "--bundle", str(bundle), "--port", str(self.port),
               "--workers", str(workers), "--threads", str(threads), "--eventlog-dir", f"{self.tmp}/eventlog",
               "--admin-token", TOKEN, *learner, *extra]
        # Shedding off unless asked for: the benchmark measures what the server can do, every call answered.
        env = dict(os.environ, FEEDRANK_XGB_THREADS=str(xgb_threads), FEEDRANK_MAX_QUEUE_MS=str(max_queue_ms))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{self.tmp}/server.log", "wb"))
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=options)
        # The kernel spreads connections over the workers, and gRPC Python shares one connection among a
        # process's channels: with several workers the load goes out over connections of their own.
        self.load_channels = [self.channel] if workers == 1 else [
            grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[*options, ("grpc.use_local_subchannel_pool", 1)])
            for _ in range(4 * workers)]
        self.wait_serving()

    def wait_serving(self, timeout: float = 120.0) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.tmp, 'server.log').read_text()[-2000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become SERVING")

    def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(stub.Check(health_pb2.HealthCheckRequest()).status)

    def pids(self) -> list[int]:
        pids = [self.proc.pid]
        try:
            pids += [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except OSError:
            pass
        return pids

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the server and its worker processes."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        """Resident memory of the server and its worker processes."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024.0

    def stop(self) -> None:
        for channel in {self.channel, *self.load_channels}:
            channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _payloads(n_requests: int, candidates: int, server_time: bool = False) -> list[bytes]:
    """Serialized Rank requests; ``server_time`` leaves context.time_ms at 0 (the server stamps the
    wall clock), so events sent for their posts can use the wall clock as event time."""
    feeds = feed_requests(n_requests, min_candidates=candidates, max_candidates=candidates)
    out = []
    for f in feeds:
        r = rank_request(f, request_id="")
        if server_time:
            r.context.time_ms = 0
        out.append(r.SerializeToString())
    return out


class EventFeeder(threading.Thread):
    """Sends LogEvents for posts the server returned, at a target rate: a VIEW for every returned
    post and clicks, likes and long dwells for some, stamped with the wall clock (event time)."""

    def __init__(self, channel, rate: float = 5000.0, batch: int = 250, seed: int = 0):
        super().__init__(name="event-feeder", daemon=True)
        self.log_events = pb_grpc.RankerStub(channel).LogEvents
        self.rate, self.batch = rate, batch
        self.rng = np.random.default_rng(seed)
        self.served: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.sent = self.accepted = self.failed = 0
        self._n = 0

    def on_response(self, resp) -> None:
        with self.lock:
            if len(self.served) < 10_000:
                self.served.append((resp.request_id, [p.post_id for p in resp.posts]))

    def _events(self, want: int) -> list:
        now = int(time.time() * 1000)
        out = []
        while len(out) < want:
            with self.lock:
                if not self.served:
                    break
                request_id, posts = self.served.pop(0)
            for pid in posts:
                self._n += 1
                base = f"bench-{self._n}"
                out.append(pb.Event(event_id=base + "v", request_id=request_id, post_id=pid,
                                    kind=pb.EVENT_KIND_VIEW, ts_ms=now))
                u = self.rng.random()
                if u < 0.06:
                    out.append(pb.Event(event_id=base + "c", request_id=request_id, post_id=pid,
                                        kind=pb.EVENT_KIND_CLICK, ts_ms=now))
                elif u < 0.09:
                    out.append(pb.Event(event_id=base + "l", request_id=request_id, post_id=pid,
                                        kind=pb.EVENT_KIND_LIKE, ts_ms=now))
                elif u < 0.17:
                    out.append(pb.Event(event_id=base + "d", request_id=request_id, post_id=pid,
                                        kind=pb.EVENT_KIND_DWELL, ts_ms=now, dwell_ms=12_000))
        return out

    def run(self) -> None:
        t_start = time.perf_counter()
        while not self.stopped.is_set():
            due = int((time.perf_counter() - t_start) * self.rate) - self.sent
            if due < self.batch:
                time.sleep(self.batch / self.rate / 4)
                continue
            events = self._events(min(due, 4 * self.batch))
            if not events:
                time.sleep(0.01)
                continue
            try:
                resp = self.log_events(pb.LogEventsRequest(events=events), timeout=10)
                self.accepted += sum(r.status == pb.EventResult.STATUS_ACCEPTED for r in resp.results)
            except grpc.RpcError:
                self.failed += len(events)
            self.sent += len(events)

    def stop(self) -> float:
        self.stopped.set()
        self.join(timeout=10)
        return self.sent


def run_load(channels, payloads: list[bytes], concurrency: int, total: int,
             stop: threading.Event | None = None, on_response=None, rate: float | None = None) -> dict:
    """Send ``total`` requests (or until ``stop``) from ``concurrency`` threads, thread i over
    ``channels[i % len(channels)]`` (or the one channel given); latencies in ms."""
    channels = channels if isinstance(channels, (list, tuple)) else [channels]
    ranks = [c.unary_unary("/feedrank.v1.Ranker/Rank", request_serializer=None,
                           response_deserializer=pb.RankResponse.FromString) for c in channels]
    client, server, stages, errors = [], [], [], []
    counter = iter(range(10**12))
    lock = threading.Lock()

    def worker(rank) -> None:
        while True:
            with lock:
                i = next(counter)
            if (stop is None and i >= total) or (stop is not None and stop.is_set()):
                return
            if rate:  # open-loop pacing: request i is due at i / rate seconds
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            t0 = time.perf_counter()
            try:
                resp = rank(payloads[i % len(payloads)], timeout=10)
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                continue
            if on_response is not None:
                on_response(resp)
            client.append((time.perf_counter() - t0) * 1000)
            server.append(resp.server_ms)
            stages.append(dict(resp.stage_ms))

    threads = [threading.Thread(target=worker, args=(ranks[i % len(ranks)],)) for i in range(concurrency)]
    start = t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    mean_stages = {k: float(np.mean([s.get(k, 0.0) for s in stages])) for k in (stages[0] if stages else {})}
    return {"client": np.array(client), "server": np.array(server), "errors": errors, "wall": wall,
            "stages": mean_stages}


def bench_serve(args) -> int:
    bundle = ensure_bundle(args)
    manifest = json.loads((bundle / "manifest.json").read_text())
    levels = [int(c) for c in args.concurrency.split(",")]
    setups = ["alone", "with_learner"] if args.setup == "both" else [args.setup]
    runs, samples = [], {}
    for setup in setups:
        _bench_setup(args, bundle, setup, levels, runs, samples)
    out = {"candidates": args.candidates, "load_average_1m_at_end": os.getloadavg()[0], "cpus": os.cpu_count(),
           "trees": int(manifest["gbdt"]["trees"]), "tasks": manifest["tasks"],
           "workers": args.workers, "runs": runs,
           "stages_ms": {k: samples[k]["stages"] for k in samples}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        png = Path(args.json).with_suffix(".png")
        _histogram(samples, png)
        print(f"wrote {args.json} and {png}")
    return 0


def _bench_setup(args, bundle: Path, setup: str, levels, runs: list, samples: dict) -> None:
    learning = setup == "with_learner"
    payloads = _payloads(64, args.candidates, server_time=learning)
    server = ServerProcess(bundle, args.workers, args.threads, setup, args.xgb_threads,
                           max_queue_ms=args.max_queue_ms)
    feeder = None
    try:
        run_load(server.load_channels, payloads, 2, 40)  # warm-up
        if learning:
            feeder = EventFeeder(server.channel, rate=args.events_per_s)
            feeder.start()
            # keep served posts flowing to the feeder between measured runs
            pace = threading.Event()
            keep = threading.Thread(target=run_load, daemon=True, args=(server.load_channels, payloads, 1, 0, pace),
                                    kwargs=dict(on_response=feeder.on_response, rate=10.0))
            keep.start()
            time.sleep(3.0)  # the learner starts, follows the log and begins publishing
        for c in levels:
            cpu0 = server.cpu_seconds()
            sent0 = feeder.sent if feeder else 0
            r = run_load(server.load_channels, payloads, c, max(args.requests, 25 * c),
                         on_response=feeder.on_response if feeder else None)
            cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / max(len(r["client"]), 1)
            events_per_s = ((feeder.sent - sent0) / r["wall"]) if feeder else 0.0
            row = {"setup": setup, "concurrency": c,
                   "server_p50_ms": float(np.percentile(r["server"], 50)),
                   "server_p99_ms": float(np.percentile(r["server"], 99)),
                   "client_p50_ms": float(np.percentile(r["client"], 50)),
                   "client_p99_ms": float(np.percentile(r["client"], 99)),
                   "rps": len(r["client"]) / r["wall"],
                   "shed": sum(e.startswith("RESOURCE_EXHAUSTED: overloaded") for e in r["errors"]),
                   "server_cpu_ms_per_request": cpu_ms, "events_per_s": events_per_s}
            row["errors"] = len(r["errors"]) - row["shed"]
            runs.append(row)
            samples[f"{setup} c={c}"] = r
            print(f"{setup} c={c:<3} server p50 {row['server_p50_ms']:6.2f} p99 {row['server_p99_ms']:6.2f} ms | "
                  f"client p50 {row['client_p50_ms']:6.2f} p99 {row['client_p99_ms']:6.2f} ms | "
                  f"{row['rps']:6.1f} req/s | errors {row['errors']}"
                  + (f" | shed {row['shed']} ({row['shed'] / (row['shed'] + len(r['client'])):.0%})"
                     if args.max_queue_ms else "")
                  + f" | server CPU {cpu_ms:.1f} ms/request"
                  + (f" | events {events_per_s:,.0f}/s" if feeder else ""))
            print("   stages (mean ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
        if feeder:
            status = Path(server.tmp) / "learner" / "status.json"
            if status.is_file():
                st = json.loads(status.read_text())
                rate = st.get("events_per_s")
                print(f"   learner: lag {st.get('lag')}, update seq {st.get('update_seq')}, "
                      f"learning {rate:,.0f} examples/s" if isinstance(rate, (int, float)) else
                      f"   learner: lag {st.get('lag')}, update seq {st.get('update_seq')}")
    finally:
        if feeder:
            pace.set()
            feeder.stop()
        server.stop()


def _histogram(samples: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "server", "server-side"), (axes[1], "client", "client-observed")):
        for label, r in samples.items():
            ax.hist(r[key], bins=60, histtype="step", label=label)
        ax.set_xlabel("latency (ms)")
        ax.set_title(f"Rank, {title} latency")
        ax.legend()
    axes[0].set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_swap(args) -> int:
    bundle = ensure_bundle(args)
    work = Path(tempfile.mkdtemp(prefix="feedrank-swap-"))
    from stacker.bundle import copy_bundle
    copies = [copy_bundle(bundle, work / f"b{i}") for i in range(2)]
    bad = copy_bundle(bundle, work / "bad")
    with open(bad / "lr_weights.npz", "ab") as f:
        f.write(b"tampered")
    payloads = _payloads(32, args.candidates)
    server = ServerProcess(bundle, 1, args.threads, xgb_threads=args.xgb_threads)
    admin = pb_grpc.AdminStub(server.channel)
    meta = (("authorization", f"Bearer {TOKEN}"),)
    run_load(server.load_channels, payloads, 2, 40)  # warm-up
    steady_stop = threading.Event()
    threading.Timer(args.steady_s, steady_stop.set).start()
    steady = run_load(server.load_channels, payloads, 4, 0, steady_stop)
    stop = threading.Event()
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(run_load(server.load_channels, payloads, 4, 0, stop)))
    load.start()
    swaps = refused = 0
    try:
        time.sleep(0.5)
        for i in range(args.swaps):
            t0 = time.perf_counter()
            admin.Reload(pb.ReloadRequest(bundle_path=str(copies[i % 2])), metadata=meta)
            swaps += 1
            print(f"swap {i + 1}: live in {(time.perf_counter() - t0) * 1000:.0f} ms")
            if i == args.swaps // 2:
                try:
                    admin.Reload(pb.ReloadRequest(bundle_path=str(bad)), metadata=meta)
                except grpc.RpcError as e:
                    refused += 1
                    print(f"bad bundle refused: {e.code().name}: {e.details()[:120]}")
            time.sleep(0.3)
    finally:
        stop.set()
        load.join()
        health = server.health()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    n = len(result["client"])
    p99_steady = float(np.percentile(steady["client"], 99))
    p99_swaps = float(np.percentile(result["client"], 99))
    print(f"steady state, concurrency 4: {len(steady['client'])} requests, client p99 {p99_steady:.1f} ms")
    print(f"{swaps} hot swaps (+{refused} refused) under load at concurrency 4: {n} requests, "
          f"{len(result['errors'])} failed, client p99 {p99_swaps:.1f} ms "
          f"({p99_swaps / p99_steady:.2f}x steady state), health {health}")
    for e in result["errors"][:5]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps({"swaps": swaps, "refused": refused, "requests": n,
                                               "errors": len(result["errors"]), "steady_p99_ms": p99_steady,
                                               "swaps_p99_ms": p99_swaps, "health": health}, indent=2))
    return 0 if not result["errors"] and health == "SERVING" else 1


def malformed_requests(payload: bytes) -> list[bytes]:
    """One of each kind of bad request, built from a good one."""
    good = pb.RankRequest.FromString(payload)
    out = []

    def variant(fn) -> None:
        r = pb.RankRequest()
        r.CopyFrom(good)
        fn(r)
        out.append(r.SerializeToString())

    variant(lambda r: r.ClearField("candidates"))
    variant(lambda r: r.candidates.post_ids.__setitem__(1, r.candidates.post_ids[0]))
    variant(lambda r: setattr(r.candidates, "features", r.candidates.features[:-4]))
    variant(lambda r: setattr(r.candidates, "features", np.full(len(r.candidates.features) // 4, np.nan,
                                                                 "<f4").tobytes()))
    variant(lambda r: r.candidates.author_ids.pop())
    variant(lambda r: setattr(r.user, "id", ""))
    variant(lambda r: setattr(r.user, "id", "u" * 100_000))
    variant(lambda r: r.task_weights.__setitem__("poke", 1.0))
    variant(lambda r: setattr(r.context, "time_ms", int(time.time() * 1000) + 86_400_000))
    variant(lambda r: r.candidates.post_ids.extend(f"x{i}" for i in range(5000)))
    out.append(b"\xff\xff\xff garbage")
    return out


def bench_flood(args) -> int:
    bundle = ensure_bundle(args)
    payloads = _payloads(4, args.candidates)
    bad = malformed_requests(payloads[0])
    server = ServerProcess(bundle, 1, args.threads, xgb_threads=args.xgb_threads)
    rank = server.channel.unary_unary("/feedrank.v1.Ranker/Rank", request_serializer=None,
                                      response_deserializer=pb.RankResponse.FromString)
    codes: dict[str, int] = {}
    try:
        for p in bad * 20:  # warm-up, so allocator pools exist before the baseline
            try:
                rank(p)
            except grpc.RpcError:
                pass
        rss0 = server.rss_mib()
        t0 = time.perf_counter()
        counter = iter(range(args.flood))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    rank(bad[i % len(bad)], timeout=10)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if i and i % 20_000 == 0:
                        print(f"  {i:,} sent, RSS {server.rss_mib():.0f} MiB", flush=True)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss1 = server.rss_mib()
        ok = rank(payloads[1])
        health = server.health()
    finally:
        server.stop()
    print(f"{args.flood:,} malformed requests in {wall:.1f}s ({args.flood / wall:.0f}/s): {codes}")
    print(f"RSS {rss0:.1f} → {rss1:.1f} MiB (growth {rss1 - rss0:+.1f} MiB); health {health}; "
          f"a good request afterwards returned {len(ok.posts)} posts")
    return 0 if health == "SERVING" and rss1 - rss0 <= 50 and "INTERNAL" not in codes else 1
