"""The embedded online learner: its own process beside the server (pylibvw holds the GIL).

It follows the server's local event log (served records + events), learns, checkpoints into
``learner_state_dir`` and publishes weight updates into ``updates_dir``, which the server polls and
applies between requests; its status file feeds the Info RPC's ``online_metrics``.
:class:`LearnerSupervisor` keeps it on the bundle being served: started once the first bundle is
live, restarted on the new bundle (after the old one's final checkpoint) when the server swaps.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from pathlib import Path

from stacker.bundle import served_bundle

from .settings import ServingSettings

log = logging.getLogger(__name__)


def _bundle_to_learn(settings: ServingSettings) -> Path | None:
    if settings.bundle is not None:
        return Path(settings.bundle)
    if settings.model_dir is not None:
        return served_bundle(settings.model_dir)
    return None


def wants_learner(settings: ServingSettings, say: bool = True) -> bool:
    """Whether the server runs the embedded learner (``say``: log why not, when workers are the reason)."""
    if not settings.learner or settings.eventlog_dir is None:
        return False
    if settings.workers > 1:
        if say:
            log.warning("online learner: not started with workers=%d (each worker writes its own log); "
                        "run `feedrank learn` against the Redis bus instead", settings.workers)
        return False
    return True


def start_learner(settings: ServingSettings, bundle: Path | None = None):
    """Start the learner process on ``bundle`` (default: the configured one) if the settings ask for
    one; returns it (or None)."""
    if not wants_learner(settings):
        return None
    bundle = bundle or _bundle_to_learn(settings)
    if bundle is None:
        log.warning("online learner: no bundle to learn on yet; not started")
        return None
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=learner_main, name="feedrank-learner", daemon=False, kwargs=dict(
        log_dir=str(settings.eventlog_dir), bundle_dir=str(bundle),
        state_dir=str(settings.learner_state_dir), model_dir=str(settings.updates_dir),
        attribution_window_ms=settings.attribution_window_ms,
        returned_is_viewed=settings.returned_is_viewed, downsample_rate=settings.downsample_rate,
        bus_url=settings.bus_url, archive_foreign=True))
    proc.start()
    log.info("online learner started (pid %d): bundle %s, window %d ms, state %s", proc.pid, bundle,
             settings.attribution_window_ms, settings.learner_state_dir)
    return proc


def learner_main(bus_url: str | None = None, **kwargs) -> int:
    """Process target: follow the local log, or with a bus the Redis stream all replicas publish to.

    The state directory follows the server's bundle: checkpoints of a bundle no longer served are moved
    to ``<learner_state_dir>/archive/`` rather than blocking the learner (``archive_foreign``)."""
    from online.runner import run_follow, run_follow_redis
    if bus_url is None:
        return run_follow(**kwargs)
    kwargs.pop("log_dir")  # the stream, not the replica's local log, is what the learner reads
    return run_follow_redis(bus_url, **kwargs)


class LearnerSupervisor(threading.Thread):
    """Runs the learner process for the bundle being served (call :meth:`follow` on every swap).

    Processes are started and stopped from this one long-lived thread: the learner's parent-death
    signal (``PR_SET_PDEATHSIG``) is tied to the thread that spawned it, so a short-lived thread
    would take the learner down with it.
    """

    def __init__(self, settings: ServingSettings, check_s: float = 5.0, restart_backoff_s: float = 10.0):
        super().__init__(name="learner-supervisor", daemon=True)
        self.settings = settings
        self.proc = None
        self.bundle_id: str | None = None
        self.bundle_dir: Path | None = None
        self.check_s = check_s
        self.restart_backoff_s = restart_backoff_s
        self.restarts = 0
        self._requests: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._next_start = 0.0

    def follow(self, bundle_dir, bundle_id: str) -> None:
        """Learn ``bundle_id`` (at ``bundle_dir``) from now on; returns at once."""
        if not self._stopping.is_set():
            self._requests.put((Path(bundle_dir), bundle_id))

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                request = self._requests.get(timeout=self.check_s)
            except queue.Empty:
                request = ()
            while request is not None:  # only the newest pending request matters
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
            if request is None or self._stopping.is_set():
                break
            try:
                if request:
                    self._switch(*request)
                else:
                    self._keep_alive()
            except Exception:  # keep supervising: a failed start is retried by _keep_alive
                log.exception("online learner: could not start it")
        stop_learner(self.proc)

    def _switch(self, bundle_dir: Path, bundle_id: str) -> None:
        if bundle_id == self.bundle_id and self.proc is not None and self.proc.is_alive():
            return
        if self.proc is not None:
            log.info("online learner: bundle %s is live; stopping the learner on %s", bundle_id, self.bundle_id)
            stop_learner(self.proc)
            self.proc = None
        self.bundle_dir, self.bundle_id = bundle_dir, bundle_id
        if not self._stopping.is_set():  # stop() may have come while the old learner checkpointed
            self.proc = start_learner(self.settings, bundle_dir)

    def _keep_alive(self) -> None:
        """Restart a learner that died (lock timeout, lost bus, a crash), at most every restart_backoff_s."""
        if self.bundle_dir is None or (self.proc is not None and self.proc.is_alive()):
            return
        if time.monotonic() < self._next_start:
            return
        if self.proc is not None:
            log.warning("online learner on %s exited with code %s; restarting it", self.bundle_id,
                        self.proc.exitcode)
            self.restarts += 1
        self._next_start = time.monotonic() + self.restart_backoff_s
        self.proc = start_learner(self.settings, self.bundle_dir)

    def stop(self, timeout_s: float = 150.0) -> None:
        """Stop the learner (final checkpoint) and this thread; no learner starts after this."""
        self._stopping.set()
        self._requests.put(None)
        self.join(timeout_s)
        if self.is_alive() and self.proc is not None and self.proc.is_alive():
            log.warning("online learner supervisor did not finish in %.0fs: killing the learner", timeout_s)
            self.proc.kill()


def stop_learner(proc, timeout_s: float = 60.0) -> None:
    """SIGTERM the learner (it checkpoints and exits); kill it if it does not."""
    if proc is None or not proc.is_alive():
        return
    proc.terminate()
    proc.join(timeout_s)
    if proc.is_alive():
        log.warning("online learner did not stop in %.0fs: killing it", timeout_s)
        proc.kill()
        proc.join(5)
