"""Run the online learner beside a server: follow its live event log, learn, publish, checkpoint.

:func:`run_follow` is meant to be the target of a process the server starts::

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    p = ctx.Process(target=run_follow, kwargs=dict(log_dir=..., bundle_dir=..., state_dir=..., model_dir=...,
                                                   attribution_window_ms=300_000, stop_event=stop))
    p.start(); ...; stop.set(); p.join()

It runs the two-process :class:`~online.pipeline.PipelinedLearner` (this process trains and publishes; a
child featurizes), so the server's process never holds a VW workspace. New log records are picked up
within ``poll_s`` (50 ms), learned at once (early positives as soon as their engagement arrives) and
published within ``publish_every_s`` (200 ms) of learning. It stops on ``stop_event``, SIGTERM/SIGINT, or
when its parent process dies (SIGTERM via ``PR_SET_PDEATHSIG``), with a final checkpoint; only one
learner runs per ``state_dir`` (a ``flock``; a restarted one waits for the previous one to finish).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

log = logging.getLogger(__name__)


def _term_with_parent() -> None:
    """Get SIGTERM when the parent (the server) dies, so an orphaned learner checkpoints and exits."""
    if multiprocessing.parent_process() is None:
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover (non-Linux)
        return
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before prctl


def run_follow(log_dir, bundle_dir, state_dir, model_dir, attribution_window_ms: int,
               returned_is_viewed: bool = False, downsample_rate: float = 1.0, stop_event=None,
               poll_s: float = 0.05, publish_every_s: float = 0.2, checkpoint_every_s: float = 30.0,
               idle_close_s: float | None = 5.0, allowed_lateness_ms: int = 5_000, tasks=None,
               ready_event=None, archive_foreign: bool = False) -> int:
    """Follow the live EventLog at ``log_dir`` until ``stop_event`` is set (or SIGTERM/SIGINT); returns 0.

    ``ready_event`` (optional) is set once the models are loaded and following has started.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            stop.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        _term_with_parent()

    def should_stop() -> bool:
        return stop.is_set() or (stop_event is not None and stop_event.is_set())

    from online.pipeline import PipelinedLearner
    os.makedirs(log_dir, exist_ok=True)  # the server may not have written its first segment yet
    while True:   # once more after the log is replaced or reopened: a new learner attaches to it again
        t0 = time.monotonic()
        learner = PipelinedLearner(bundle_dir, state_dir, tasks=tasks, attribution_window_ms=attribution_window_ms,
                                   downsample_rate=downsample_rate, returned_is_viewed=returned_is_viewed,
                                   checkpoint_every_s=checkpoint_every_s, publish_every_s=publish_every_s,
                                   model_dir=model_dir, allowed_lateness_ms=allowed_lateness_ms,
                                   archive_foreign=archive_foreign)
        log.info("online learner following %s from offset %d (bundle %s, started in %.1f s)", log_dir,
                 learner.replay_from, learner.bundle_id, time.monotonic() - t0)
        try:
            if ready_event is not None:
                ready_event.set()
            again = learner.follow(log_dir, poll_s=poll_s, idle_close_s=idle_close_s, should_stop=should_stop)
            log.info("online learner stopped: learned %d examples, update_seq %d",
                     learner.counters["learned_examples"], learner.update_seq)
        finally:
            learner.close()
        if not again or should_stop():
            return 0


def run_follow_redis(bus_url: str, bundle_dir, state_dir, model_dir, attribution_window_ms: int,
                     returned_is_viewed: bool = False, downsample_rate: float = 1.0, stop_event=None,
                     archive_foreign: bool = False) -> int:
    """Consume the Redis stream every replica publishes to (scale-out) with the two-process learner until
    ``stop_event`` or SIGTERM/SIGINT; entries are acknowledged once a checkpoint covers them. Returns 0."""
    from online.pipeline import PipelinedLearner

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        _term_with_parent()
    learner = PipelinedLearner(bundle_dir, state_dir, model_dir=model_dir, attribution_window_ms=attribution_window_ms,
                               returned_is_viewed=returned_is_viewed, downsample_rate=downsample_rate,
                               archive_foreign=archive_foreign)
    log.info("online learner consuming %s (bundle %s)", bus_url, learner.bundle_id)
    try:
        learner.follow_redis(bus_url, should_stop=lambda: stop.is_set()
                             or (stop_event is not None and stop_event.is_set()))
    finally:
        learner.close()
    return 0


__all__ = ["run_follow", "run_follow_redis"]
