"""``feedrank bench learn``: joined examples/s through joiner + learner, from the log (two-process pipeline,
and single-process) and over Redis, beside bare pylibvw learning the same examples (prebuilt text lines)
in the same run."""
from __future__ import annotations

import contextlib
import gc
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REDIS_SERVER = "/usr/bin/redis-server"
WINDOW_MS = 10_000
BENCH_CACHE_DIR = "runs/bench-cache"   # where every benchmark trains and keeps its bundle (--cache-dir)


def ensure_bench_bundle(cache_dir: Path, progress: bool = True) -> Path:
    from stacker.train import TrainConfig, config_key
    from stacker.vwstack import VWConfig
    config = TrainConfig(vw=VWConfig(bits=25))
    path = Path(cache_dir) / f"bench-bundle-{config_key(config)}"     # retrained when the defaults change
    if (path / "manifest.json").is_file():
        return path
    from feedsim.simulate import simulate
    from stacker.progress import Progress
    from stacker.train import train_bundle
    print(f"training the bench bundle into {path} (once)", file=sys.stderr)
    return train_bundle(simulate(200_000, progress=progress), path, config, progress=Progress(progress))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(workdir: Path):
    """A private redis-server on a free port (no persistence); yields its URL and stops it after."""
    import redis
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            raise RuntimeError(f"redis-server did not start on port {port}")
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bare_vw(bundle: Path, records, tasks, batch: int = 1024) -> dict:
    """Join and featurize (untimed), then time bare TaskLearners.learn over the prebuilt lines."""
    from online.joiner import Joiner
    from online.learner import vw_config
    from online.records import Engagement
    from online.reproduce import batch_from_records
    from stacker.ranker import StackedRanker
    from stacker.vwstack import TaskLearners
    ranker = StackedRanker.load(bundle)
    j = Joiner(tasks, WINDOW_MS)
    exs = []
    for off, r in enumerate(records):
        exs += j.add_event(r, off) if type(r) is Engagement else j.add_served(r, off)
    exs += j.flush()
    chunks = []
    for a in range(0, len(exs), batch):
        part = exs[a:a + batch]
        lines = ranker.features(batch_from_records([x.served for x in part], ranker.spec)).vw_lines()
        labels = np.array([[x.labels.get(t, 0) for t in ranker.tasks] for x in part], np.int8)
        mask = np.array([[t in tasks and t in x.tasks for t in ranker.tasks] for x in part], bool)
        chunks.append((lines, labels, mask))
    from stacker.bundle import VW_MODEL
    learners = TaskLearners(ranker.tasks, vw_config(ranker.manifest), bundle / VW_MODEL)
    t0 = time.perf_counter()
    for lines, labels, mask in chunks:
        learners.learn(lines, labels, mask)
    dt = time.perf_counter() - t0
    learners.close()
    return {"source": "bare_vw", "events_per_s": len(exs) / dt, "tasks": len(tasks), "examples": len(exs),
            "seconds": dt}


def bench_learn(n: int = 100_000, cache_dir: Path = Path(BENCH_CACHE_DIR), bundle=None, progress: bool = True,
                redis: bool = True, single: bool = True, batch_size: int = 1024) -> list[dict]:
    """``log``: the two-process pipeline (:mod:`online.pipeline`) replaying the local log; ``log-1proc``: the
    single-process :class:`OnlineLearner`; ``redis``: the two-process pipeline consuming a Redis stream
    (``redis-1proc``: the single-process learner on it);
    ``bare_vw``: :meth:`TaskLearners.learn` alone over prebuilt lines. Rates are learned (joined) examples
    per second, start-up excluded, final publish and checkpoint included."""
    from feedsim.simulate import simulate
    from online.bus import RedisBus
    from online.eventlog import EventLog
    from online.learner import OnlineLearner
    from online.pipeline import PipelinedLearner
    from online.replay import follow_redis, replay
    from online.workload import workload
    from stacker.ranker import StackedRanker

    bundle = Path(bundle) if bundle else ensure_bench_bundle(cache_dir, progress)
    ranker = StackedRanker.load(bundle)
    tasks = ranker.tasks
    df = simulate(n, seed=11, progress=progress)
    records = workload(df, ranker.spec, ranker.bundle_id, WINDOW_MS)
    del df
    gc.collect()
    gc.freeze()  # the workload's objects are long-lived: keep the cyclic GC from rescanning them
    work = Path(tempfile.mkdtemp(prefix="feedrank-bench-"))
    results = []
    try:
        with EventLog(work / "log", fsync=False) as log:
            log.append(records)
        pipe = PipelinedLearner(bundle, work / "state-log", attribution_window_ms=WINDOW_MS,
                                model_dir=work / "models-log", checkpoint_every_s=30.0, batch_size=batch_size)
        out = pipe.replay(work / "log", progress=progress)
        pipe.close()
        results.append({"source": "log", "events_per_s": out["learned_examples"] / out["seconds"],
                        "tasks": len(tasks), "examples": out["learned_examples"], "seconds": out["seconds"],
                        "updates": out["updates"], "processes": 2,
                        "trainer_wait_s": round(out["trainer_wait_s"], 3),
                        "trainer_s": {k: round(v, 3) for k, v in out["trainer_s"].items()}})
        if single:
            learner = OnlineLearner(bundle, work / "state-log1", attribution_window_ms=WINDOW_MS,
                                    model_dir=work / "models-log1", checkpoint_every_s=30.0)
            out = replay(learner, work / "log", progress=progress)
            learner.close()
            results.append({"source": "log-1proc", "events_per_s": out["learned_examples"] / out["seconds"],
                            "tasks": len(tasks), "examples": out["learned_examples"], "seconds": out["seconds"],
                            "updates": out["updates"], "processes": 1})
        if redis:
            with redis_server(work) as url:
                def publish(stream: str) -> None:
                    bus = RedisBus(url, stream=stream)
                    for a in range(0, len(records), 5_000):
                        bus.publish(records[a:a + 5_000])
                    bus.close()
                publish("bench:pipeline")
                pipe = PipelinedLearner(bundle, work / "state-redis", attribution_window_ms=WINDOW_MS,
                                        model_dir=work / "models-redis", checkpoint_every_s=30.0,
                                        batch_size=batch_size)
                out = pipe.follow_redis(url, stream="bench:pipeline", stop_when_idle=True)
                pending = RedisBus(url, stream="bench:pipeline").pending_count()
                results.append({"source": "redis", "events_per_s": out["learned_examples"] / out["seconds"],
                                "tasks": len(tasks), "examples": out["learned_examples"],
                                "seconds": out["seconds"], "processes": 2, "acked": out["acked"],
                                "pending_after": pending})
                pipe.close()
                if single:
                    publish("bench:single")
                    bus = RedisBus(url, stream="bench:single")
                    learner = OnlineLearner(bundle, work / "state-redis1", attribution_window_ms=WINDOW_MS,
                                            model_dir=work / "models-redis1", checkpoint_every_s=30.0)
                    t0 = time.perf_counter()
                    follow_redis(learner, bus, block_ms=50, idle_close_s=None, max_idle_polls=1)
                    learner.finish()
                    bus.ack_through(learner.replay_from)
                    dt = time.perf_counter() - t0
                    results.append({"source": "redis-1proc",
                                    "events_per_s": learner.counters["learned_examples"] / dt,
                                    "tasks": len(tasks), "examples": learner.counters["learned_examples"],
                                    "seconds": dt, "processes": 1, "pending_after": bus.pending_count()})
                    learner.close()
                    bus.close()
        bare = _bare_vw(bundle, records, tasks)
        for r in results:
            r["vs_bare"] = round(r["events_per_s"] / bare["events_per_s"], 3)
        results.append(bare)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
