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


def _bare_chunks(ranker, records, tasks, batch: int = 1024) -> list:
    """Join and featurize the workload (untimed): text lines, labels and task masks per batch."""
    from online.joiner import Joiner
    from online.records import Engagement
    from online.reproduce import batch_from_records
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
    return chunks


def _bare_vw(bundle: Path, ranker, chunks, tasks) -> dict:
    """Time bare TaskLearners.learn over the prebuilt lines, resumed from the bundle."""
    from online.learner import vw_config
    from stacker.bundle import VW_MODEL
    from stacker.vwstack import TaskLearners
    learners = TaskLearners(ranker.tasks, vw_config(ranker.manifest), bundle / VW_MODEL)
    t0 = time.perf_counter()
    for lines, labels, mask in chunks:
        learners.learn(lines, labels, mask)
    dt = time.perf_counter() - t0
    learners.close()
    return _rate("bare_vw", sum(len(labels) for _, labels, _ in chunks), dt, tasks)


def _rate(source: str, examples: int, seconds: float, tasks, **more) -> dict:
    return {"source": source, "events_per_s": examples / seconds, "tasks": len(tasks), "examples": examples,
            "seconds": seconds, **more}


def _learn_once(run: int, out_dir: Path, log_dir: Path, bundle: Path, ranker, records, url, single: bool,
                batch_size: int, progress: bool) -> list[dict]:
    """One measurement of every source but bare pylibvw, each learner from the bundle in fresh state
    directories under ``out_dir`` (``run`` keeps the Redis streams of the rounds apart)."""
    from online.bus import RedisBus
    from online.learner import OnlineLearner
    from online.pipeline import PipelinedLearner
    from online.replay import follow_redis, replay
    tasks = ranker.tasks
    results = []
    pipe = PipelinedLearner(bundle, out_dir / "state-log", attribution_window_ms=WINDOW_MS,
                            model_dir=out_dir / "models-log", checkpoint_every_s=30.0, batch_size=batch_size)
    out = pipe.replay(log_dir, progress=progress)
    pipe.close()
    results.append(_rate("log", out["learned_examples"], out["seconds"], tasks, updates=out["updates"],
                         processes=2, trainer_wait_s=round(out["trainer_wait_s"], 3),
                         trainer_s={k: round(v, 3) for k, v in out["trainer_s"].items()}))
    if single:
        learner = OnlineLearner(bundle, out_dir / "state-log1", attribution_window_ms=WINDOW_MS,
                                model_dir=out_dir / "models-log1", checkpoint_every_s=30.0)
        out = replay(learner, log_dir, progress=progress)
        learner.close()
        results.append(_rate("log-1proc", out["learned_examples"], out["seconds"], tasks, updates=out["updates"],
                             processes=1))
    if url is None:
        return results

    def publish(stream: str) -> None:
        bus = RedisBus(url, stream=stream)
        for a in range(0, len(records), 5_000):
            bus.publish(records[a:a + 5_000])
        bus.close()
    stream = f"bench:pipeline:{run}"
    publish(stream)
    pipe = PipelinedLearner(bundle, out_dir / "state-redis", attribution_window_ms=WINDOW_MS,
                            model_dir=out_dir / "models-redis", checkpoint_every_s=30.0, batch_size=batch_size)
    out = pipe.follow_redis(url, stream=stream, stop_when_idle=True)
    pending = RedisBus(url, stream=stream).pending_count()
    results.append(_rate("redis", out["learned_examples"], out["seconds"], tasks, processes=2,
                         acked=out["acked"], pending_after=pending))
    pipe.close()
    if single:
        stream = f"bench:single:{run}"
        publish(stream)
        bus = RedisBus(url, stream=stream)
        learner = OnlineLearner(bundle, out_dir / "state-redis1", attribution_window_ms=WINDOW_MS,
                                model_dir=out_dir / "models-redis1", checkpoint_every_s=30.0)
        t0 = time.perf_counter()
        follow_redis(learner, bus, block_ms=50, idle_close_s=None, max_idle_polls=1)
        learner.finish()
        bus.ack_through(learner.replay_from)
        dt = time.perf_counter() - t0
        results.append(_rate("redis-1proc", learner.counters["learned_examples"], dt, tasks, processes=1,
                             pending_after=bus.pending_count()))
        learner.close()
        bus.close()
    return results


def _summary(runs: list[dict], bare: list[dict]) -> dict:
    """One source over every run: the median rate (and its run's other fields), each run's rate, and the
    median of each run's ratio to bare pylibvw in the same round."""
    rates = [r["events_per_s"] for r in runs]
    middle = dict(sorted(runs, key=lambda r: r["events_per_s"])[(len(runs) - 1) // 2])
    middle["events_per_s"] = float(np.median(rates))
    middle["runs_events_per_s"] = [round(x, 1) for x in rates]
    if runs[0]["source"] != "bare_vw":
        middle["vs_bare"] = round(float(np.median([r / b["events_per_s"] for r, b in zip(rates, bare)])), 3)
    return middle


def bench_learn(n: int = 100_000, cache_dir: Path = Path(BENCH_CACHE_DIR), bundle=None, progress: bool = True,
                redis: bool = True, single: bool = True, batch_size: int = 1024, repeat: int = 3) -> list[dict]:
    """``log``: the two-process pipeline (:mod:`online.pipeline`) replaying the local log; ``log-1proc``: the
    single-process :class:`OnlineLearner`; ``redis``: the two-process pipeline consuming a Redis stream
    (``redis-1proc``: the single-process learner on it);
    ``bare_vw``: :meth:`TaskLearners.learn` alone over prebuilt lines. Rates are learned (joined) examples
    per second, start-up excluded, final publish and checkpoint included. The workload is built once;
    every source is measured ``repeat`` times, in rounds (each round runs them all, bare pylibvw last),
    and reported by its median (``runs_events_per_s``: every round's rate)."""
    from feedsim.simulate import simulate
    from online.eventlog import EventLog
    from online.workload import workload
    from stacker.ranker import StackedRanker

    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    bundle = Path(bundle) if bundle else ensure_bench_bundle(cache_dir, progress)
    ranker = StackedRanker.load(bundle)
    tasks = ranker.tasks
    df = simulate(n, seed=11, progress=progress)
    records = workload(df, ranker.spec, ranker.bundle_id, WINDOW_MS)
    del df
    gc.collect()
    gc.freeze()  # the workload's objects are long-lived: keep the cyclic GC from rescanning them
    work = Path(tempfile.mkdtemp(prefix="feedrank-bench-"))
    runs: dict[str, list[dict]] = {}
    try:
        with EventLog(work / "log", fsync=False) as log:
            log.append(records)
        chunks = None
        with (redis_server(work) if redis else contextlib.nullcontext()) as url:
            for run in range(repeat):
                if progress and repeat > 1:
                    print(f"round {run + 1}/{repeat}", file=sys.stderr)
                out_dir = work / f"run{run}"
                for r in _learn_once(run, out_dir, work / "log", bundle, ranker, records, url, single, batch_size,
                                     progress):
                    runs.setdefault(r["source"], []).append(r)
                shutil.rmtree(out_dir, ignore_errors=True)  # each round's VW models and checkpoints
                if chunks is None:  # built once, after the learners' first round (as they would find memory)
                    chunks = _bare_chunks(ranker, records, tasks)
                runs.setdefault("bare_vw", []).append(_bare_vw(bundle, ranker, chunks, tasks))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [_summary(rs, runs["bare_vw"]) for rs in runs.values()]
