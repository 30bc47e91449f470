"""The live model: one reference to a loaded StackedRanker, swapped between requests.

Loading (at start, from a newer bundle in the model directory, or by Reload) happens off the request
path; a request takes the reference once and uses that ranker to the end, so a swap never mixes two
models in one answer. A bundle that fails to load is refused and the old one keeps serving.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stacker.bundle import (PIN_FILE, BundleError, bundle_age, candidate_bundles, dated_bundles, files_state,
                            pinned_bundle)
from stacker.ranker import StackedRanker

from .errors import NotReady, RefusedBundle

log = logging.getLogger(__name__)
NO_MODEL_HINT = ("no model loaded: make a bundle with `feedrank train --simulate 200000 --out bundles/default` "
                 "and serve it with `feedrank serve --bundle bundles/default` (or --model-dir bundles)")


class LiveModel:
    """Holds the serving ranker; ``ready`` once one is loaded."""

    def __init__(self, xgb_threads: int = 1, on_swap: Callable[[StackedRanker], None] | None = None,
                 model_dir: Path | None = None):
        self.xgb_threads = xgb_threads
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.on_swap = on_swap
        self.on_update: Callable[[StackedRanker], None] | None = None
        self._ranker: StackedRanker | None = None
        self._load_lock = threading.Lock()
        self._scan_lock = threading.Lock()    # a Reload, or a scan of the model directory, at a time
        self.loaded_at_ms = 0
        # Refused bundle -> (its files' sizes and mtimes then, why): tried again once they change,
        # so a bundle copied in file by file loads when the copy completes.
        self.refused: dict[Path, tuple[tuple, str]] = {}
        # The age (bundle_age) of the newest bundle ever live: the directory's watcher loads only a bundle
        # newer than that, so a Reload back to an older bundle (a rollback) stays live. Nor does it load
        # one that was in the directory at the last Reload, unless its files have changed since.
        self.newest_live: tuple | None = None
        self.seen_at_reload: dict[Path, tuple] = {}
        self.reload_previous: StackedRanker | None = None   # what the last Reload replaced
        self.pinned: Path | None = None       # the model directory's pin, while it holds one
        self._pin_problem: str | None = None  # the last bad pin logged (logged once)

    @property
    def ready(self) -> bool:
        return self._ranker is not None

    def current(self) -> StackedRanker:
        ranker = self._ranker
        if ranker is None:
            raise NotReady(NO_MODEL_HINT)
        return ranker

    def load(self, path: Path) -> StackedRanker:
        """Load a bundle and make it live; raises RefusedBundle (old model kept) on failure."""
        path = Path(path)
        with self._load_lock:
            t0 = time.perf_counter()
            before = files_state(path)  # as the load found them: a copy still under way differs later
            try:
                ranker = StackedRanker.load(path, threads=self.xgb_threads)
                _warm_up(ranker)
            except Exception as e:  # whatever fails, the bundle is refused and the old model kept
                shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "…"
                if isinstance(e, OSError):  # an unusable path: too long, unreadable, ...
                    e = BundleError(f"{shown}: {e.strerror or type(e).__name__}")
                elif not isinstance(e, BundleError):
                    log.warning("loading %s raised", shown, exc_info=True)
                    e = BundleError(f"{shown}: cannot load ({type(e).__name__}: {e})")
                try:
                    self.refused[path.resolve()] = (before, str(e))
                except (OSError, ValueError):
                    pass
                log.error("refused bundle %s: %s", shown, e)
                raise RefusedBundle(f"bundle refused, still serving "
                                    f"{self._ranker.version if self._ranker else 'nothing'}: {e}") from e
            self._ranker = ranker
            self.loaded_at_ms = int(time.time() * 1000)
            try:
                age = bundle_age(path, ranker.manifest)
                self.newest_live = age if self.newest_live is None else max(self.newest_live, age)
            except (OSError, TypeError, ValueError):
                pass
            log.info("serving bundle %s from %s (loaded in %.2fs)", ranker.version, path,
                     time.perf_counter() - t0)
        if self.on_swap:
            self.on_swap(ranker)
        return ranker

    def reload(self, path: Path, seen: dict[Path, tuple] | None = None) -> StackedRanker:
        """An operator's Reload: :meth:`load`, and every other bundle now in the model directory counts as
        seen, so the watcher loads none of them over it (a rollback holds, on every worker alike) until a
        new one arrives or one of them changes (a copy completes). ``reload_previous`` is then the ranker
        it replaced. ``seen``: the bundles (and their files) another worker's Reload counted as seen, for
        every worker to skip the same ones."""
        with self._scan_lock:                 # no directory scan between the load and the mark
            pin = self._read_pin(self.model_dir) if self.model_dir is not None else None
            if pin is not None and Path(path).resolve() != pin.resolve():
                raise RefusedBundle(f"{self.model_dir} is pinned to {pin.name} ({self.model_dir / PIN_FILE}): "
                                    f"serve another bundle with `feedrank pin {self.model_dir} BUNDLE`, or "
                                    f"remove the pin with `feedrank pin {self.model_dir} --clear` first")
            self.reload_previous = self._ranker
            ranker = self.load(path)
            if seen is not None:
                self.seen_at_reload = dict(seen)
            elif self.model_dir is not None:
                try:
                    present = candidate_bundles(self.model_dir)
                except OSError:
                    present = []
                live = Path(path).resolve()
                # As they are now: one still being copied in, or refused and then mended, changes its files
                # and is loaded when it does.
                self.seen_at_reload = {rp: files_state(p) for p in present if (rp := p.resolve()) != live}
        return ranker

    def load_newest(self, model_dir: Path) -> StackedRanker | None:
        """Load the newest loadable bundle in ``model_dir`` that is newer than every bundle live so far
        (``newest_live``: one a Reload rolled back from is not loaded again) and not refused."""
        with self._scan_lock:
            return self._load_newest(model_dir)

    def _still_refused(self, path: Path) -> bool:
        """Refused before, and its files unchanged since (a bundle is tried again once they change)."""
        rp = path.resolve()
        return rp in self.refused and self.refused[rp][0] == files_state(path)

    def _read_pin(self, model_dir: Path) -> Path | None:
        """The directory's pin; a bad one is logged (once) and counts as none."""
        try:
            pin = pinned_bundle(model_dir)
        except BundleError as e:
            if str(e) != self._pin_problem:
                log.error("ignoring the pin: %s", e)
                self._pin_problem = str(e)
            return None
        self._pin_problem = None
        return pin

    def _load_newest(self, model_dir: Path) -> StackedRanker | None:
        live = self._ranker.path.resolve() if self._ranker and self._ranker.path else None
        pin = self._read_pin(model_dir)
        if pin is not None:
            if self.pinned is None or self.pinned.resolve() != pin.resolve():
                log.info("%s is pinned to %s", model_dir, pin.name)
            self.pinned = pin
            rp = pin.resolve()
            if rp == live:
                return None
            if not self._still_refused(pin):
                try:
                    return self.load(pin)
                except RefusedBundle:
                    pass
            if self._ranker is not None:
                return None   # keeps serving what it serves; the pinned bundle is tried again once it changes
            # Nothing live yet (a start): the newest bundle serves until the pinned one loads.
        elif self.pinned is not None:   # the pin was removed: the newest bundle serves again
            log.info("%s is no longer pinned (was %s): the newest bundle serves", model_dir, self.pinned.name)
            self.pinned = None
            self.newest_live, self.seen_at_reload = None, {}
        for age, p in dated_bundles(model_dir):
            rp = p.resolve()
            if rp == live or (self.newest_live is not None and age <= self.newest_live):
                return None
            if rp in self.seen_at_reload and self.seen_at_reload[rp] == files_state(p):
                continue
            if self._still_refused(p):
                continue
            try:
                return self.load(p)
            except RefusedBundle:
                continue
        return None


def _warm_up(ranker: StackedRanker) -> None:
    """One tiny prediction so the first real request does not pay for lazy initialisation."""
    import numpy as np

    from stacker.features import CandidateBatch

    spec = ranker.spec
    batch = CandidateBatch(ts=int(time.time() * 1000), user_id="warmup",
                           user_features=spec.default_vector(spec.user_features),
                           post_ids=np.array(["p0", "p1"], object), author_ids=np.array(["a0", "a1"], object),
                           media=np.zeros(2, np.int8), created_at=np.zeros(2, np.int64),
                           post_features=np.tile(spec.default_vector(spec.post_features), (2, 1)))
    ranker.predict(batch)


class UpdateFollower:
    """Applies the online learner's published weight updates (``online.publish``) to the live ranker.

    Updates are written into the live weight table in place (``StackedRanker.apply_update``), so a
    request running at that moment may score with part of a delta; the next one sees all of it.
    """

    def __init__(self, model: LiveModel, model_dir: Path):
        self.model, self.model_dir = model, Path(model_dir)
        self._watcher = None
        self._for: StackedRanker | None = None

    def check(self) -> None:
        from online.publish import UpdateWatcher

        ranker = self.model._ranker
        if ranker is None:
            return
        if self._for is not ranker:  # a new bundle: follow its own update stream
            self._watcher = UpdateWatcher(self.model_dir, ranker.bundle_id, after_seq=ranker.update_seq)
            self._for = ranker
        for update in self._watcher.poll():
            ranker.apply_update(update.rows, update.values, update.seq, update.covered_offset)
            log.info("applied online update %d (%s, %d rows): serving %s", update.seq, update.kind,
                     len(update.rows), ranker.version)
            if self.model.on_update:
                self.model.on_update(ranker)


class BundleWatcher(threading.Thread):
    """Polls a model directory for a newer bundle (every ``interval_s``) and runs ``checks``
    (published weight updates, sibling reloads) every ``tick_s``, all in the background."""

    def __init__(self, model: LiveModel, model_dir: Path | None, interval_s: float,
                 checks: tuple[Callable[[], None], ...] = (), tick_s: float | None = None):
        super().__init__(name="bundle-watcher", daemon=True)
        self.model, self.interval_s = model, interval_s
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.checks = checks
        self.tick_s = tick_s or interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        last_scan = time.monotonic()
        while not self.stopped.wait(self.tick_s):
            for check in self.checks:
                try:
                    check()
                except Exception:  # a watcher must never die: log and poll again
                    log.exception("model watcher: %s", check)
            if self.model_dir is not None and self.interval_s > 0 and \
                    time.monotonic() - last_scan >= self.interval_s:
                last_scan = time.monotonic()
                try:
                    self.model.load_newest(self.model_dir)
                except Exception:
                    log.exception("bundle watcher")

    def stop(self) -> None:
        self.stopped.set()
