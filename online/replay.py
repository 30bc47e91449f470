"""Drive an :class:`~online.learner.OnlineLearner` from a source: a recorded log, a live log, or Redis.

Every driver starts at the learner's ``replay_from`` (the checkpoint's oldest open offset), so a restart
rebuilds the joiner's buffer and continues without losing or repeating an example.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from online.eventlog import HEADER, Record, log_end, log_start, segment_end, segment_records
from online.learner import OnlineLearner
from online.tail import LogTailer

log = logging.getLogger(__name__)


def read_records(path, from_offset: int = 0, block: int = 20_000) -> Iterator[tuple[int, Record]]:
    """``(offset, record)`` from an event-log directory or a single segment file (up to its end now)."""
    path = Path(path)
    if path.is_dir():
        tailer = LogTailer(path, from_offset)
        while batch := tailer.poll_batch(block):
            yield from batch
        tailer.check_complete()
        return
    with open(path, "rb") as f:
        if f.readline() != HEADER:
            raise ValueError(f"{path}: not an event-log segment (expected header {HEADER!r})")
        base = int(path.name[4:-4]) if path.name.startswith("seg-") else 0
        for off, rec in segment_records(f, base, from_offset):
            if rec is not None:  # None: a last line failing its checksum, the torn tail
                yield off, rec


def count_records(path) -> int:
    """The log's end offset (its segments' records, and those its retention deleted before them)."""
    path = Path(path)
    if path.is_dir():
        return log_end(path)
    return segment_end(path, int(path.name[4:-4]) if path.name.startswith("seg-") else 0)


def records_left(path, start: int = 0) -> int:
    """How many records a read of the log ``path`` from offset ``start`` goes through (for progress bars:
    the retention may have deleted the first ones)."""
    first = log_start(path) if Path(path).is_dir() else 0
    return max(count_records(path) - max(start, first), 0)


def replay(learner: OnlineLearner, path, progress: bool = True, finish: bool = True,
           chunk: int = 20_000, stop_after: int | None = None,
           should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Learn from a recorded log from ``learner.replay_from`` to its end; then close every window. When
    ``should_stop()`` (Ctrl-C), stop and checkpoint what was learned (``interrupted`` in the result)."""
    from tqdm import tqdm
    total = count_records(path)
    learner.source_end_offset = total
    if Path(path).is_dir():
        learner.attach_log(path)
    start = learner.replay_from
    bar = tqdm(total=records_left(path, start), unit="rec", desc="learn --replay", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    it = read_records(path, start)
    t0 = time.perf_counter()
    n = 0
    interrupted = False
    while True:
        if should_stop():
            finish, interrupted = False, True
            break
        batch = list(itertools.islice(it, chunk))
        if not batch:
            break
        learner.process(batch)
        n += len(batch)
        bar.update(len(batch))
        bar.set_postfix(learned=learner.counters["learned_examples"], seq=learner.update_seq, refresh=False)
        if stop_after is not None and n >= stop_after:
            finish = False
            break
    bar.close()
    if finish:
        learner.finish()
    else:
        learner.checkpoint()
    return {"records": n, "seconds": time.perf_counter() - t0, **learner.counters, "source_records": n,
            "interrupted": interrupted}


def follow_log(learner: OnlineLearner, log_dir, poll_s: float = 0.05, idle_close_s: float | None = 5.0,
               should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Follow a live log forever (until ``should_stop()``): learn, publish, checkpoint as due.

    Returns True when it stopped because the log was replaced or reopened (close the learner and follow
    with a new one, which attaches to it again), False on ``should_stop()``.
    When nothing arrives for ``idle_close_s``, event time is advanced by the clock so windows still close
    on a quiet server: to the wall clock when the records' times follow it (a server stamps them), else
    by the wall time elapsed since the last record (:meth:`~online.learner.Featurizer.idle_watermark`).
    """
    learner.attach_log(log_dir)
    tailer = LogTailer(log_dir, from_offset=learner.replay_from)
    idle_since = time.monotonic()
    while not should_stop():
        batch = list(tailer.poll(max_records=20_000))
        if learner.front.log_changed(log_dir):   # another log there, or this one reopened: drop what was read
            log.warning("%s: the event log was replaced or reopened; checkpointing to attach to it again", log_dir)
            learner.checkpoint()
            return True
        learner.source_end_offset = tailer.end_offset
        if batch:
            learner.process(batch)
            idle_since = time.monotonic()
            continue
        if idle_close_s is not None and time.monotonic() - idle_since > idle_close_s:
            learner.advance(learner.idle_watermark())
            idle_since = time.monotonic()
        learner.maybe_publish()
        learner.maybe_checkpoint()
        time.sleep(poll_s)
    learner.checkpoint()
    return False


def follow_redis(learner: OnlineLearner, bus, count: int = 5_000, block_ms: int = 100,
                 idle_close_s: float | None = 5.0, should_stop: Callable[[], bool] = lambda: False,
                 max_idle_polls: int | None = None) -> None:
    """Consume a Redis stream; acknowledge entries once a checkpoint no longer needs them."""
    ckpts = learner.counters["checkpoints"]
    idle_since = time.monotonic()
    idle_polls = 0
    while not should_stop():
        batch = bus.consume_or_wait(count, block_ms)
        if batch is None:  # Redis unreachable: wait for it, without closing windows by the clock
            idle_since = time.monotonic()
            continue
        if batch:
            learner.process(batch)
            idle_since, idle_polls = time.monotonic(), 0
        else:
            idle_polls += 1
            if max_idle_polls is not None and idle_polls >= max_idle_polls:
                break
            if idle_close_s is not None and time.monotonic() - idle_since > idle_close_s:
                learner.advance(learner.idle_watermark())
                idle_since = time.monotonic()
            learner.maybe_publish()
            learner.maybe_checkpoint()
        if learner.counters["checkpoints"] != ckpts:
            try:
                bus.ack_through(learner.replay_from)
                ckpts = learner.counters["checkpoints"]
            except redis.RedisError as e:  # unacknowledged entries are redelivered: nothing is lost
                log.warning("could not acknowledge (%s); retrying after the next read", e)
            else:
                bus.maybe_trim()  # what every consumer group acknowledged leaves the stream
    learner.checkpoint()
    bus.ack_through(learner.replay_from)
