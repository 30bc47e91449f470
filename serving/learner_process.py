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
from pathlib import Path

from .model import candidate_bundles
from .settings import ServingSettings

log = logging.getLogger(__name__)


def _bundle_to_learn(settings: ServingSettings) -> Path | None:
    if settings.bundle is not None:
        return Path(settings.bundle)
    if settings.model_dir is not None:
        found = candidate_bundles(Path(settings.model_dir))
        return found[0] if found else None
    return None


def wants_learner(settings: ServingSettings) -> bool:
    if not settings.learner or settings.eventlog_dir is None:
        return False
    if settings.workers > 1:
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

    def __init__(self, settings: ServingSettings):
        super().__init__(name="learner-supervisor", daemon=True)
        self.settings = settings
        self.proc = None
        self.bundle_id: str | None = None
        self._requests: queue.Queue = queue.Queue()

    def follow(self, bundle_dir, bundle_id: str) -> None:
        """Learn ``bundle_id`` (at ``bundle_dir``) from now on; returns at once."""
        self._requests.put((Path(bundle_dir), bundle_id))

    def run(self) -> None:
        while True:
            request = self._requests.get()
            while request is not None:  # only the newest pending swap matters
                try:
                    newer = self._requests.get_nowait()
                except queue.Empty:
                    break
                request = newer
            if request is None:
                stop_learner(self.proc)
                return
            bundle_dir, bundle_id = request
            if bundle_id == self.bundle_id and self.proc is not None and self.proc.is_alive():
                continue
            if self.proc is not None:
                log.info("online learner: bundle %s is live; stopping the learner on %s", bundle_id, self.bundle_id)
                stop_learner(self.proc)
            self.proc = start_learner(self.settings, bundle_dir)
            self.bundle_id = bundle_id

    def stop(self, timeout_s: float = 90.0) -> None:
        """Stop the learner (final checkpoint) and this thread."""
        self._requests.put(None)
        self.join(timeout_s)


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
