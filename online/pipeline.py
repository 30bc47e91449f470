"""The online learner as a two-process pipeline: a feeder featurizes, the trainer learns.

- **Feeder** (child process): reads the event log (:class:`~online.tail.LogTailer`), joins, reproduces
  the served features (GBDT leaves, DNN hidden layer, ids) and builds VW text + labels/masks/weights and
  the distinct weight rows each batch touches (:class:`~online.learner.Featurizer`). It sends
  :class:`~online.learner.LearnBatch` objects of ``batch_size`` examples over a socket pair (bounded: a
  small send queue plus the socket buffer, so it blocks when the trainer falls behind).
- **Trainer** (this process): owns the VW workspace; parses + learns each batch, progressive metrics,
  publishes weight updates and writes checkpoints and ``status.json`` (:class:`~online.learner.Trainer`).

Durability is unchanged: each batch carries the stream state (learned-through offset, the joiner's oldest
open offset, clock and counters) as of its last example, and a checkpoint records the models together with
the state of the last batch *learned*, so it never covers an example the models do not hold. The feeder
holds no durable state. If the trainer is killed, the feeder dies with it (``PR_SET_PDEATHSIG``); if the
feeder dies, the trainer checkpoints what it has learned (consistent) and raises. A restart resumes from
the checkpoint's replay point exactly as the single-process :class:`~online.learner.OnlineLearner` does.

The feeder is started with ``subprocess`` (not ``multiprocessing``) so the trainer may itself be a
daemonic ``multiprocessing`` child (e.g. started by the server).
"""
from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

log = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parents[1]
_SOCK_BUF = 8 << 20
_GC_EVERY_S = 60.0


LOG_CHANGED = "log_changed"   # the feeder's message, and _run's result, when the followed log was replaced or reopened


class FeederDied(RuntimeError):
    """The feeder process exited or failed before its source ended."""


def lock_state_dir(state_dir: Path, timeout_s: float) -> int:
    """An exclusive lock on ``<state_dir>/.learner.lock``: one learner per state directory, and a restarted
    one waits for a dying one to finish its checkpoint."""
    from online.locks import hold_lock
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, holder = hold_lock(state_dir / ".learner.lock", timeout_s)
    if fd < 0:
        raise RuntimeError(f"{state_dir}: another learner (pid {holder}) holds .learner.lock")
    return fd


# -- feeder side ---------------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover (non-Linux)
        pass
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl


class _Sender:
    """Pickles and sends from a thread, so featurizing the next batch overlaps sending this one."""

    def __init__(self, conn: Connection, depth: int = 2):
        self.conn = conn
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            obj = self.q.get()
            if obj is None:
                return
            try:
                self.conn.send_bytes(pickle.dumps(obj, protocol=5))
            except BaseException as e:  # the trainer is gone
                self.error = e
                return

    def send(self, obj) -> None:
        if self.error is not None:
            raise FeederDied(f"trainer connection lost: {self.error}")
        self.q.put(obj)

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise FeederDied(f"trainer connection lost: {self.error}")


def _feeder_main(fd: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # The trainer decides when to stop: a SIGINT or SIGTERM sent to the whole process group (Ctrl-C,
    # `timeout`, systemd stopping the unit) reaches it too, and it shuts the feeder down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        cfg = conn.recv()
        import gc

        from threadpoolctl import threadpool_limits

        from online.learner import Featurizer
        from stacker.ranker import StackedRanker
        threadpool_limits(1)  # after the imports: it only limits pools already loaded
        ranker = StackedRanker.load(cfg["bundle_dir"], threads=1)
        front = Featurizer(ranker, cfg["tasks"], **cfg["featurizer"])
        if cfg["resume"] is not None:
            front.resume(cfg["resume"])
        conn.send(("ready", front.replay_from))
        source = conn.recv()
        # The feeder allocates millions of short-lived lists (decoded records): automatic cyclic GC
        # made decoding ~2.5x slower. It creates no reference cycles in steady state; collect rarely.
        gc.freeze()
        gc.disable()
        sender = _Sender(conn)
        if source["kind"] == "replay":
            _feed_replay(front, sender, **source["args"])
        elif source["kind"] == "redis":
            _feed_redis(front, sender, **source["args"])
        else:
            _feed_follow(front, sender, **source["args"])
        sender.close()
    except (FeederDied, BrokenPipeError, ConnectionResetError, EOFError):
        os._exit(0)  # the trainer is gone (or stopped us): nothing of ours is durable
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)
    os._exit(0)


def _maybe_collect(gc_at: float) -> float:
    if time.monotonic() < gc_at:
        return gc_at
    import gc
    gc.collect()
    return time.monotonic() + _GC_EVERY_S


def _feed_replay(front, sender: _Sender, path, finish: bool = True, stop_after: int | None = None,
                 chunk: int = 20_000) -> None:
    from online.tail import LogTailer
    path = Path(path)
    if path.is_dir():
        front.attach_log(path)
        tailer = LogTailer(path, front.replay_from)
        chunks = iter(lambda: tailer.poll_batch(chunk), [])
        check = tailer.check_complete
    else:  # one segment file
        import itertools

        from online.replay import read_records
        it = read_records(path, front.replay_from)
        chunks = iter(lambda: list(itertools.islice(it, chunk)), [])
        check = None
    n = 0
    gc_at = time.monotonic() + _GC_EVERY_S
    for recs in chunks:
        gc_at = _maybe_collect(gc_at)
        front.ingest(recs, sender.send)
        n += len(recs)
        if stop_after is not None and n >= stop_after:
            finish = False
            break
    else:
        if check is not None:
            check()
    if finish:
        front.flush()
    batch = front.cut(end=True)
    batch.state["source_records"] = n
    sender.send(batch)


def _close_idle_windows(front):
    """The source went quiet: move event time on by the clock (:meth:`Featurizer.idle_watermark`) so the
    windows that would have closed by now do; returns the batch they produced, or None."""
    front.advance(front.idle_watermark())
    return front.cut() if front.pending else None


def _feed_follow(front, sender: _Sender, log_dir, poll_s: float = 0.05, idle_close_s: float | None = 5.0,
                 max_records: int = 20_000) -> None:
    from online.tail import LogTailer
    front.attach_log(log_dir)
    tailer = LogTailer(log_dir, front.replay_from)
    idle_since = time.monotonic()
    gc_at = time.monotonic() + _GC_EVERY_S
    while True:
        gc_at = _maybe_collect(gc_at)
        recs = tailer.poll_batch(max_records)
        if front.log_changed(log_dir):
            # Another log there, or this one reopened, before or during the read: what was read may be the
            # new writer's, which the checkpoint must not count as learned. Drop it and attach again.
            sender.send((LOG_CHANGED, str(log_dir)))
            return
        if recs:
            front.ingest(recs, sender.send)
            batch = front.cut()
            batch.state["source_end_offset"] = tailer.end_offset
            sender.send(batch)
            idle_since = time.monotonic()
            if len(recs) >= max_records:
                continue
        elif idle_close_s is not None and time.monotonic() - idle_since > idle_close_s:
            batch = _close_idle_windows(front)
            if batch is not None:
                batch.state["source_end_offset"] = tailer.end_offset
                sender.send(batch)
            idle_since = time.monotonic()
        time.sleep(poll_s)


def _feed_redis(front, sender: _Sender, url: str, stream: str, group: str, consumer: str, count: int = 5_000,
                block_ms: int = 50, idle_close_s: float | None = 5.0, stop_when_idle: bool = False,
                finish: bool = True) -> None:
    """Consume the Redis stream (our pending entries first, then new ones). Every batch carries the
    offsets consumed so far (``state["consumed"]``): the trainer acknowledges them once a durable
    checkpoint no longer needs them. ``stop_when_idle``: end at the first empty read (benchmarks, tests)."""
    import numpy as np

    from online.bus import RedisBus
    bus = RedisBus(url, stream=stream, group=group, consumer=consumer, track_acks=False)
    idle_since = time.monotonic()
    gc_at = time.monotonic() + _GC_EVERY_S
    while True:
        gc_at = _maybe_collect(gc_at)
        entries = bus.consume_or_wait(count, block_ms)
        if entries is None:  # Redis unreachable: wait for it, without closing windows by the clock
            idle_since = time.monotonic()
            continue
        if entries:
            front.ingest(entries, sender.send)
            batch = front.cut()
            batch.state["consumed"] = np.fromiter((o for o, _ in entries), np.int64, len(entries))
            sender.send(batch)
            idle_since = time.monotonic()
        elif stop_when_idle:
            if finish:
                front.flush()
            sender.send(front.cut(end=True))
            bus.close()
            return
        elif idle_close_s is not None and time.monotonic() - idle_since > idle_close_s:
            batch = _close_idle_windows(front)
            if batch is not None:
                sender.send(batch)
            idle_since = time.monotonic()


# -- trainer side --------------------------------------------------------------------------------------
class PipelinedLearner:
    """The online learner with featurizing in a child process; same parameters as
    :class:`~online.learner.OnlineLearner`. Drive it with :meth:`replay` or :meth:`follow`, then
    :meth:`close`."""

    def __init__(self, bundle_dir, state_dir, tasks=None, attribution_window_ms: int = 300_000,
                 downsample_rate: float = 1.0, returned_is_viewed: bool = False,
                 checkpoint_every_s: float = 30.0, publish_every_s: float = 0.2, pretouch: bool = False,
                 model_dir=None, allowed_lateness_ms: int = 5_000, max_open: int = 1_000_000,
                 checkpoint_every_examples: int | None = None, batch_size: int = 1024, audit: bool = False,
                 learn_other_bundles: bool = False, base_every: int = 200, keep_checkpoints: int = 3,
                 lock_timeout_s: float = 60.0, background_checkpoints: bool = True,
                 archive_foreign: bool = False):
        from threadpoolctl import threadpool_limits

        from online.learner import Trainer, _archive_and_log, load_resume, resolve_tasks
        from stacker.ranker import StackedRanker
        if not 0.0 < downsample_rate <= 1.0:
            raise ValueError(f"downsample_rate must be in (0, 1], got {downsample_rate}")
        self.bundle_dir, self.state_dir = Path(bundle_dir), Path(state_dir)
        self._lock = lock_state_dir(self.state_dir, lock_timeout_s)
        self._thread_limits = threadpool_limits(1)
        try:
            self.ranker = StackedRanker.load(self.bundle_dir, threads=1)
            self.bundle_id = self.ranker.bundle_id
            self.tasks = resolve_tasks(self.ranker, tasks)
            if archive_foreign:  # under the state lock, so no other learner is writing there
                _archive_and_log(self.state_dir, self.bundle_id, self.tasks)
            resumed = load_resume(self.state_dir, self.bundle_id, self.tasks)
        except BaseException:
            self._thread_limits.restore_original_limits()
            os.close(self._lock)
            raise
        self.proc, self.conn = self._spawn()
        self.conn.send({"bundle_dir": str(self.bundle_dir), "tasks": list(self.tasks),
                        "resume": resumed[0] if resumed else None,
                        "featurizer": dict(attribution_window_ms=attribution_window_ms,
                                           downsample_rate=downsample_rate, returned_is_viewed=returned_is_viewed,
                                           allowed_lateness_ms=allowed_lateness_ms, max_open=max_open,
                                           batch_size=batch_size, audit=audit,
                                           learn_other_bundles=learn_other_bundles)})
        try:  # VW models load here while the feeder loads the bundle
            self.trainer = Trainer(self.ranker, self.state_dir, self.tasks, resumed, checkpoint_every_s,
                                   publish_every_s, pretouch, model_dir, checkpoint_every_examples, audit,
                                   base_every, keep_checkpoints)
            msg = self._recv(timeout=120.0)
            if not (isinstance(msg, tuple) and msg[0] == "ready"):
                raise FeederDied(f"unexpected first message from the feeder: {msg!r}")
            self.replay_from = msg[1]
        except BaseException:
            self._stop_feeder()
            os.close(self._lock)
            raise
        self.counters = self.trainer.counters
        self.acked = 0  # Redis entries acknowledged by follow_redis
        self._started = False
        self.wait_s = 0.0  # time the trainer spent waiting for batches (the feeder is the bottleneck)
        self.background_checkpoints = background_checkpoints

    def _spawn(self) -> tuple[subprocess.Popen, Connection]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
        env = dict(os.environ)
        # One thread per pool in the feeder: OpenBLAS/OpenMP worker threads spinning after each small
        # matmul or XGBoost call took ~1.3 s of the other core per 100k examples, slowing the trainer's
        # VW by ~50%. (threadpoolctl cannot limit pools loaded after it runs; the environment can.)
        env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        fd = b.fileno()
        code = f"from online.pipeline import _feeder_main; _feeder_main({fd}, {os.getpid()})"
        # In the caller's working directory, so the paths it was given (bundle, log, state) resolve alike.
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL)
        b.close()
        return proc, Connection(a.detach())

    def _recv(self, timeout: float | None = None):
        if timeout is not None and not self.conn.poll(timeout):
            raise FeederDied(f"the feeder sent nothing for {timeout:.0f} s")
        try:
            msg = pickle.loads(self.conn.recv_bytes())
        except (EOFError, ConnectionResetError, OSError) as e:
            raise FeederDied(f"the feeder exited (code {self.proc.poll()})") from e
        if isinstance(msg, tuple) and msg[0] == "error":
            raise FeederDied(f"the feeder failed:\n{msg[1]}")
        return msg

    # -- the trainer's state, under the names callers use -------------------------------------------
    metrics = property(lambda self: self.trainer.metrics)
    learners = property(lambda self: self.trainer.learners)
    task_learned = property(lambda self: self.trainer.task_learned)
    weighted = property(lambda self: self.trainer.weighted)
    update_seq = property(lambda self: self.trainer.update_seq)
    learned_through = property(lambda self: self.trainer.learned_through)

    def _start(self, kind: str, **args) -> None:
        if self._started:
            raise RuntimeError("a PipelinedLearner runs one source")
        self._started = True
        self.conn.send({"kind": kind, "args": args})

    def _run(self, should_stop: Callable[[], bool], on_batch: Callable | None = None,
             on_tick: Callable | None = None) -> bool | str:
        """Learn batches until the source ends (True), ``should_stop()`` (False), or the followed log is
        replaced or reopened (:data:`LOG_CHANGED`)."""
        from online.learner import LearnBatch
        tr = self.trainer
        while not should_stop():
            due = tr.publish_due_in()
            timeout = 0.05 if due is None else min(0.05, due)
            t0 = time.perf_counter()
            try:
                ready = self.conn.poll(timeout)
            except (EOFError, OSError):
                ready = True  # let _recv report it
            self.wait_s += time.perf_counter() - t0
            if ready:
                try:
                    msg = self._recv()
                except FeederDied:
                    tr.checkpoint()  # consistent: the state of the last batch learned
                    raise
                if isinstance(msg, tuple) and msg[0] == LOG_CHANGED:
                    log.warning("%s: the event log was replaced or reopened; checkpointing to attach to it again",
                                msg[1])
                    return LOG_CHANGED
                if not isinstance(msg, LearnBatch):
                    raise FeederDied(f"unexpected message from the feeder: {msg!r}")
                tr.learn(msg)
                if "source_end_offset" in msg.state:
                    tr.source_end_offset = msg.state["source_end_offset"]
                if on_batch is not None:
                    on_batch(msg)
                if msg.end:
                    return True
            tr.maybe_publish()
            tr.maybe_checkpoint(background=self.background_checkpoints)
            if on_tick is not None:
                on_tick()
        return False

    def replay(self, path, finish: bool = True, stop_after: int | None = None, chunk: int = 20_000,
               progress: bool = False, should_stop: Callable[[], bool] = lambda: False) -> dict:
        """Learn from a recorded log from :attr:`replay_from` to its end (then close every window unless
        ``finish=False``); publish and checkpoint. Returns counters and ``seconds``. When ``should_stop()``
        (Ctrl-C), stop reading and checkpoint what was learned (``interrupted`` in the result): the next
        replay goes on from there."""
        from tqdm import tqdm
        bar = tqdm(unit="rec", desc="learn --replay", disable=not progress, dynamic_ncols=True, mininterval=0.5)
        last = {"records": self.counters["records"]}

        def on_batch(b):
            r = b.state["counters"]["records"]
            bar.update(r - last["records"])
            last["records"] = r
            bar.set_postfix(learned=self.counters["learned_examples"], seq=self.trainer.update_seq, refresh=False)
        t0 = time.perf_counter()
        first = self.counters["records"]
        self._start("replay", path=str(path), finish=finish, stop_after=stop_after, chunk=chunk)
        done = self._run(should_stop, on_batch)
        if not done:
            self._stop_feeder()   # interrupted: the checkpoint below covers exactly what was learned
        self.trainer._progressive_cache = None
        self.trainer.publish()
        self.trainer.checkpoint()
        bar.close()
        if done:
            records = self.trainer.front_state.get("source_records", 0) if self.trainer.front_state else 0
        else:
            records = self.counters["records"] - first
        return {"records": records, "seconds": time.perf_counter() - t0, "trainer_wait_s": self.wait_s,
                "trainer_s": dict(self.trainer.timings),
                **self.counters, "source_records": records, "interrupted": not done}

    def follow(self, log_dir, poll_s: float = 0.05, idle_close_s: float | None = 5.0,
               should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Follow a live log until ``should_stop()``: learn, publish within ``publish_every_s`` of learning,
        checkpoint as due; a final checkpoint on stop. Returns True when it stopped because the log was
        replaced or reopened: close this learner and follow with a new one, which attaches to it again."""
        self._start("follow", log_dir=str(log_dir), poll_s=poll_s, idle_close_s=idle_close_s)
        try:
            ended = self._run(should_stop)
        finally:
            self._stop_feeder()  # stop reading first: the checkpoint then covers exactly what was learned
        self.trainer.publish()
        self.trainer.checkpoint()
        return ended == LOG_CHANGED

    def follow_redis(self, url: str, stream: str = "feedrank:records", group: str = "learner",
                     consumer: str = "learner-0", idle_close_s: float | None = 5.0,
                     should_stop: Callable[[], bool] = lambda: False, stop_when_idle: bool = False,
                     finish: bool = True, block_ms: int = 50) -> dict:
        """Consume the Redis stream every replica publishes to until ``should_stop()`` (or, with
        ``stop_when_idle``, until it is drained). Entries are acknowledged (``XACK``) only once a
        durable checkpoint no longer needs them, so a restarted learner gets back the rest.
        Returns counters and ``seconds``."""
        from collections import deque

        import redis

        from online.bus import RedisBus, offset_to_id
        bus = RedisBus(url, stream=stream, group=group, consumer=consumer, track_acks=False)
        consumed: deque = deque()  # arrays of consumed offsets, in consumption (= increasing) order
        retry_at = [0.0]

        def on_batch(batch) -> None:
            offs = batch.state.get("consumed")
            if offs is not None and len(offs):
                consumed.append(offs)

        def ack() -> None:
            below = self.trainer.replay_from  # moves only once a checkpoint is durable
            if not consumed or consumed[0][0] >= below or time.monotonic() < retry_at[0]:
                return
            taken, rest = [], None
            for offs in consumed:
                if offs[0] >= below:
                    break
                done = offs[offs < below]
                taken.append(done)
                if len(done) < len(offs):
                    rest = offs[offs >= below]
                    break
            ids = [offset_to_id(int(o)) for done in taken for o in done]
            try:
                bus.ack_ids(ids)
            except redis.RedisError as e:  # nothing is lost: unacknowledged entries are redelivered
                log.warning("could not acknowledge %d entries (%s); retrying in 1 s", len(ids), e)
                retry_at[0] = time.monotonic() + 1.0
                return
            for _ in taken:
                consumed.popleft()
            if rest is not None:
                consumed.appendleft(rest)
            self.acked += len(ids)
            bus.maybe_trim()  # what every consumer group acknowledged leaves the stream

        t0 = time.perf_counter()
        try:
            self._start("redis", url=url, stream=stream, group=group, consumer=consumer,
                        idle_close_s=idle_close_s, stop_when_idle=stop_when_idle, finish=finish, block_ms=block_ms)
            try:
                self._run(should_stop, on_batch, on_tick=ack)
            finally:
                self._stop_feeder()
            self.trainer.publish()
            self.trainer.checkpoint()
            retry_at[0] = 0.0
            ack()
        finally:
            bus.close()
        return {"seconds": time.perf_counter() - t0, "acked": self.acked, **self.counters}

    def _stop_feeder(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        try:
            self.conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self._stop_feeder()
        self.trainer.close()
        self._thread_limits.restore_original_limits()
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def __enter__(self) -> "PipelinedLearner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
