"""The embedded online learner: its own process beside the server (pylibvw holds the GIL).

It follows the server's local event log (served records + events), learns, checkpoints into
``learner_state_dir`` and publishes weight updates into ``updates_dir``, which the server polls and
applies between requests; its status file feeds the Info RPC's ``online_metrics``.
"""
from __future__ import annotations

import logging
import multiprocessing
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


def start_learner(settings: ServingSettings):
    """Start the learner process if the settings ask for one; returns it (or None)."""
    if not settings.learner or settings.eventlog_dir is None:
        return None
    if settings.workers > 1:
        log.warning("online learner: not started with workers=%d (each worker writes its own log); "
                    "run `feedrank learn` against the Redis bus instead", settings.workers)
        return None
    bundle = _bundle_to_learn(settings)
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
