"""The online learner: served records + engagement events in, per-task VW updates and published weights out.

Two halves: a :class:`Featurizer` (joiner, filters, downsampling, feature reproduction, VW text; no model)
cuts :class:`LearnBatch` objects that a :class:`Trainer` (the VW workspace, progressive metrics, publishing,
checkpoints) learns. :class:`OnlineLearner` runs both in one process; :mod:`online.pipeline` runs them in
two (the trainer's process and a feeder child), which is what ``feedrank learn`` uses for logs.

Per batch of joined examples: rebuild the served candidates from their records (same bundle, frozen
extractors, so the features are exactly those served), then learn the tasks each example says to learn
now, scoring each example first with the weights of the examples before it (progressive validation:
:func:`~stacker.vwstack.learn_text` scores a row's shared tasks before it learns any of them, so no
task's score has seen a label of its own row through the weights the tasks share). Final all-negative
examples are downsampled at ``downsample_rate`` by the deterministic (request_id, post_id) coin and
carry importance weight ``1 / rate``.

Durability: a checkpoint (``<state_dir>/checkpoints``) holds the resumable VW model of every task and the
state to resume: ``learned_through`` (the last log offset whose examples are all learned), ``replay_from``
(the joiner's oldest open offset), the joiner's clock and counters, the update sequence and counters. On
start the learner loads the newest checkpoint (else the bundle's ``vw/lr.model``) and the caller
replays its source from :attr:`OnlineLearner.replay_from`; the joiner suppresses what was learned before.
With ``audit=True`` each checkpoint ``N`` is preceded by ``<state_dir>/audit/ckpt-<N>.tsv`` listing what was
learned since the previous one (offset, request_id, post_id, tasks, weight); on start, files of checkpoints
that were never committed are removed.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from online.checkpoint import load_latest, write_checkpoint
from online.joiner import JoinedExample, Joiner
from online.progressive import ProgressiveMetrics
from online.publish import UpdatePublisher
from online.records import Engagement, Malformed, ServedRecord
from online.reproduce import batch_from_records, fits_spec
from stacker import bundle as bundles
from stacker.ranker import StackedRanker
from stacker.train import keep_hash
from stacker.vwstack import TaskLearners, VWConfig, learn_text
from stacker.vwtext import batch_text

log = logging.getLogger(__name__)
STATE_VERSION = 2
CKPT_MODEL = "lr.model"
CKPT_METRICS = "progressive.npz"   # the progressive metrics' state (ProgressiveMetrics.save)


def vw_config(manifest: dict) -> VWConfig:
    """The VW settings to continue a bundle online: its own, with the manifest's online rate."""
    vw = manifest["vw"]
    config = VWConfig.from_dict(vw)
    return config if config.optimizer == "ftrl" else config.with_rate(vw.get("online_learning_rate") or config.rate)


FRONT_COUNTERS = ("records", "other_bundle_examples", "bad_records", "future_records", "downsampled_out",
                  "nothing_to_learn", "log_rebased")
# A record stamped further ahead of the learner's clock is skipped (``future_records``): the joiner runs on
# event time, and one far-future record would close every open window at once. The server refuses
# anything over 5 s ahead; this catches producers that bypass it and replicas whose clocks are off.
FUTURE_LIMIT_MS = 60_000
# Records whose newest time is within this of the wall clock follow it (a server stamps them): a quiet source
# then moves event time to the wall clock; otherwise by the wall time elapsed since the last record came.
LIVE_CLOCK_MS = 3_600_000
BACK_COUNTERS = ("learned_examples", "checkpoints", "updates")


@dataclass
class LearnBatch:
    """What the front half hands the back half: N featurized examples and the stream state they complete.

    ``text`` is VW text (one line per example, label prefix ``1 <weight>``), ``labels``/``mask`` [N, T],
    ``weights`` [N], ``rows`` the distinct weight rows of the examples' ids, contexts and biases and
    ``leaf_rows`` those of their GBDT leaves (for publishing: leaf rows move slowly and are published
    less often), ``audit`` the audit lines (``audit=True`` only) and ``state`` the front's :meth:`Featurizer.state`
    once these examples are learned (log offsets, joiner clock and counters). ``end`` marks the last batch
    of a finite source.
    """

    text: bytes
    labels: np.ndarray
    mask: np.ndarray
    weights: np.ndarray
    rows: np.ndarray
    audit: list[str]
    state: dict
    end: bool = False
    leaf_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.intp))

    def __len__(self) -> int:
        return len(self.labels)


def load_resume(state_dir, bundle_id: str, tasks) -> tuple[dict, Path] | None:
    """The newest checkpoint under ``<state_dir>/checkpoints`` (validated against bundle and tasks)."""
    resumed = load_latest(Path(state_dir) / "checkpoints")
    if resumed is not None:
        state, path = resumed
        if state.get("state_version") != STATE_VERSION:
            raise ValueError(f"{path}: checkpoint state version {state.get('state_version')}, this learner "
                             f"writes {STATE_VERSION}; use another --state")
        if state["bundle_id"] != bundle_id or tuple(state["tasks"]) != tuple(tasks):
            raise ValueError(f"{path}: checkpoint is for bundle {state['bundle_id']} tasks {state['tasks']}, "
                             f"not {bundle_id} tasks {list(tasks)}; use another --state")
    return resumed


def archive_foreign_state(state_dir, bundle_id: str, tasks) -> Path | None:
    """Move checkpoints made for another bundle (or other tasks) to ``<state_dir>/archive/<bundle>-<ms>/``.

    For a learner that follows whatever bundle its server runs: after the server moves to a new bundle,
    the old bundle's checkpoints are kept, not deleted, and the learner starts on the new bundle.
    Returns where they went, or None when there was nothing foreign to move.
    """
    state_dir = Path(state_dir)
    resumed = load_latest(state_dir / "checkpoints")
    if resumed is None:
        return None
    state, _ = resumed
    if state["bundle_id"] == bundle_id and tuple(state["tasks"]) == tuple(tasks):
        return None
    dest = state_dir / "archive" / f"{state['bundle_id']}-{int(time.time() * 1000)}"
    dest.mkdir(parents=True)
    _move_state(state_dir, dest)
    return dest


STATE_PARTS = ("checkpoints", "audit", "status.json")   # what a learner keeps of one bundle in its state dir


def _move_state(source: Path, dest: Path) -> None:
    """Move a learner's state for one bundle (:data:`STATE_PARTS`) from ``source`` to ``dest``, replacing
    what ``dest`` holds of it."""
    for name in STATE_PARTS:
        if (source / name).exists():
            if (dest / name).is_dir():
                shutil.rmtree(dest / name)
            os.replace(source / name, dest / name)


def restore_archived_state(state_dir, bundle_id: str, tasks) -> Path | None:
    """Without a checkpoint in ``state_dir``, move back the newest archived checkpoints of ``bundle_id``
    (with these tasks), which :func:`archive_foreign_state` kept when the server moved on from it: a server
    that goes back to a bundle (a rollback) serves what its learner had learned and published, and the
    learner goes on from there rather than from the bundle as trained. An archive that does not load (a
    damaged file, another state version) is skipped with a warning: the learner then starts afresh.
    Returns the archive the checkpoints came from."""
    from online.checkpoint import CheckpointError

    state_dir = Path(state_dir)
    if load_latest(state_dir / "checkpoints") is not None:
        return None
    archive = state_dir / "archive"

    def stamp(p: Path) -> int:
        tail = p.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    kept = sorted(archive.glob(f"{glob.escape(bundle_id)}-*"), key=stamp, reverse=True) if archive.is_dir() else []
    for source in kept:
        try:
            if load_resume(source, bundle_id, tasks) is None:
                continue
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            log.warning("%s: archived checkpoints not resumed from (%s)", source, e)
            continue
        _move_state(source, state_dir)
        shutil.rmtree(source, ignore_errors=True)
        return source
    return None


def _archive_and_log(state_dir, bundle_id: str, tasks) -> None:
    moved = archive_foreign_state(state_dir, bundle_id, tasks)
    if moved is not None:
        log.warning("%s: checkpoints were for another bundle; kept them in %s and starting on bundle %s",
                    state_dir, moved, bundle_id)
    restored = restore_archived_state(state_dir, bundle_id, tasks)
    if restored is not None:
        log.warning("%s: back on bundle %s: resuming from its checkpoints kept in %s", state_dir, bundle_id,
                    restored)


def resolve_tasks(ranker: StackedRanker, tasks) -> tuple[str, ...]:
    tasks = tuple(tasks or ranker.tasks)
    unknown = [t for t in tasks if t not in ranker.tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in bundle {ranker.bundle_id} (has {list(ranker.tasks)})")
    return tasks


class Featurizer:
    """The front half: joiner, filters, downsampling, feature reproduction and VW text.

    Cuts a :class:`LearnBatch` whenever ``batch_size`` examples are pending (and on :meth:`cut`); holds no
    model. Its ``state()`` is what a checkpoint records about the stream once the batch is learned.
    """

    def __init__(self, ranker: StackedRanker, tasks, attribution_window_ms: int = 300_000,
                 downsample_rate: float = 1.0, returned_is_viewed: bool = False, allowed_lateness_ms: int = 5_000,
                 max_open: int = 1_000_000, batch_size: int = 1024, audit: bool = False,
                 learn_other_bundles: bool = False, counters: dict | None = None):
        if not 0.0 < downsample_rate <= 1.0:
            raise ValueError(f"downsample_rate must be in (0, 1], got {downsample_rate}")
        self.ranker = ranker
        self.bundle_id = ranker.bundle_id
        self.tasks = tuple(tasks)
        self.downsample_rate = downsample_rate
        self.batch_size = batch_size
        self.audit = audit
        self.learn_other_bundles = learn_other_bundles
        self.joiner = Joiner(self.tasks, attribution_window_ms, allowed_lateness_ms, max_open, returned_is_viewed)
        self.counters = counters if counters is not None else {}
        for k in FRONT_COUNTERS:
            self.counters.setdefault(k, 0)
        self.learned_through = -1
        self.replay_from = 0
        self.source_log: str | None = None  # the id of the event log whose offsets these are
        self.opens_known: list[list[int]] | None = None   # its writer's opens (time, offset) already checked
        self._log_stamp: list | None = None  # the log-id and opens files as log_changed last found them
        self._resumed_at: int | None = None  # when the checkpoint resumed from was written (ms)
        self._ingested = -1
        self._arrival: tuple[int, int] | None = None   # (wall ms, newest record time) when records last came
        self._pending: list[JoinedExample] = []
        self._seen_rows = np.zeros(len(ranker.scorer.weights), bool)

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint's state: replay the source from :attr:`replay_from`."""
        self.learned_through = state["learned_through"]
        self.replay_from = state["replay_from"]
        self.source_log = state.get("source_log")
        self.opens_known = state.get("opens_known")
        self._resumed_at = state.get("written_at")
        if self._resumed_at is not None and state["joiner"].get("max_ts") is not None:
            # A quiet source after the restart moves event time on from where the checkpoint left it.
            self._arrival = (int(self._resumed_at), int(state["joiner"]["max_ts"]))
        self.counters.update({k: v for k, v in state["counters"].items() if k in FRONT_COUNTERS})
        j = state["joiner"]
        self.joiner.resume(self.learned_through, j["max_ts"], j["stats"])

    def attach_log(self, path) -> str | None:
        """Check the offsets resumed from a checkpoint against the event log about to be read (a
        directory), before reading it; returns the warning given, if any.

        Another log at the path (the old one deleted or moved, ``--replay`` of another day's log) counts
        its offsets from 0: read from its start, the learned weights kept. The same log ending before
        what was learned, or reopened by a writer after the checkpoint at an offset the checkpoint had
        learned (restored from an older copy, truncated), lost records: what was learned of them stays
        learned, and the records from that offset on are new. Either way, reading from the checkpoint's
        offsets would skip every new record until the log grew past them."""
        from online.eventlog import log_end, log_identity, log_opens, segment_bases
        found, opens, said = log_identity(path), log_opens(path), None
        if found is None and not segment_bases(path):
            return None   # no log there yet (the server creates it): judged once it is (log_changed)
        # Where this log stopped holding what was learned: its end now, or where a writer reopened it since
        # the checkpoint (a normal reopen starts past everything learned). The checkpoint lists the opens it
        # knew of (a copy restored from before some of them lacks those); one from before that list, by time.
        if self.opens_known is not None:
            known = {tuple(o) for o in self.opens_known}
            later = [o for o in opens if o not in known]
        else:
            later = [o for o in opens if self._resumed_at is not None and o[0] >= self._resumed_at]
        lost_from = min([log_end(path)] + [at for _, at in later]) if self.learned_through >= 0 else None
        if self.source_log is not None and found is not None and found != self.source_log:
            said = (f"{path} is another event log than the one this learner's checkpoint counted offsets in "
                    f"(log id {found}, not {self.source_log}): the learned weights are kept and the log is "
                    f"read from its start")
            self.learned_through, self.replay_from = -1, 0
            self.joiner.rebase(-1, keep_clock=False)
        elif lost_from is not None and lost_from <= self.learned_through:
            said = (f"{path} lost records this learner's checkpoint had learned: it held {lost_from} records when "
                    f"it was reopened or read, the checkpoint learned through offset {self.learned_through} "
                    f"({self.learned_through + 1 - lost_from} records are no longer in the log: restored from an "
                    f"older copy, or cut?); the records from offset {lost_from} on are learned as new")
            self.learned_through, self.replay_from = lost_from - 1, min(self.replay_from, lost_from)
            self.joiner.rebase(lost_from - 1, keep_clock=True)
        if said:
            log.warning(said)
            self.counters["log_rebased"] += 1
        self.source_log = found if found is not None else self.source_log
        self.opens_known = [list(o) for o in opens]
        return said

    def log_changed(self, path) -> bool:
        """Whether the log at ``path`` is no longer the one :meth:`attach_log` checked: another log put there,
        or the same one reopened by its writer. Then drop what was just read from it, checkpoint, and attach
        again (a new learner), which re-bases if records were lost. Cheap: two ``stat`` calls, and the two
        small files read only when one of them changed."""
        from online.eventlog import LOG_ID_FILE, OPENS_FILE, log_identity, log_opens
        stamp = []
        for name in (LOG_ID_FILE, OPENS_FILE):
            try:
                st = os.stat(Path(path) / name)
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamp.append(None)
        if stamp == self._log_stamp:
            return False                  # neither file changed since the last look (the usual case)
        found = log_identity(path)
        known = {tuple(o) for o in self.opens_known or ()}
        changed = (found is not None and found != self.source_log) or any(o not in known for o in log_opens(path))
        if not changed:
            self._log_stamp = stamp
        return changed

    def state(self) -> dict:
        js = self.joiner.state()
        oldest = js["oldest_open_offset"]
        return {"learned_through": self.learned_through,
                "replay_from": self.learned_through + 1 if oldest is None else oldest,
                "source_log": self.source_log, "opens_known": self.opens_known,
                "joiner": {"max_ts": js["max_ts"], "stats": js["stats"], "open": js["open"]},
                "counters": {k: self.counters[k] for k in FRONT_COUNTERS}}

    @property
    def ingested(self) -> int:
        return self._ingested

    def ingest(self, records: Iterable[tuple[int, ServedRecord | Engagement]],
               emit: Callable[[LearnBatch], None]) -> None:
        """Join records; ``emit`` a batch each time ``batch_size`` examples are pending (not at the end)."""
        joiner, pending, counters = self.joiner, self._pending, self.counters
        ingested, replay_from, n = self._ingested, self.replay_from, 0
        ingested_before = ingested
        add_event, add_served = joiner.add_event, joiner.add_served
        future = int(time.time() * 1000) + FUTURE_LIMIT_MS
        try:
            for off, rec in records:
                if off <= ingested or off < replay_from:
                    continue  # already ingested in this process, or before the checkpoint's replay point
                kind = type(rec)
                if kind is Malformed or rec.ts > future:
                    if off > joiner.resume_through:  # counted before the checkpoint otherwise
                        self._skip(off, rec, future)
                    ingested = self._ingested = off
                    n += 1
                    continue
                out = add_event(rec, off) if kind is Engagement else add_served(rec, off)
                ingested = self._ingested = off
                n += 1
                if out:
                    pending.extend(out)
                    if len(pending) >= self.batch_size:
                        counters["records"] += n
                        n = 0
                        emit(self.cut())
        finally:
            counters["records"] += n
            if self._ingested != ingested_before and joiner.max_ts is not None:
                self._arrival = (int(time.time() * 1000), joiner.max_ts)

    def _skip(self, off: int, rec, future: int) -> None:
        """Count a record the learner cannot use, and say why (the first few of each kind, then every 1000th)."""
        name = "bad_records" if type(rec) is Malformed else "future_records"
        self.counters[name] += 1
        n = self.counters[name]
        if n <= 5 or n % 1000 == 0:
            why = rec.reason if name == "bad_records" else \
                f"ts {rec.ts} is {(rec.ts - (future - FUTURE_LIMIT_MS)) / 1000:.0f} s ahead of this clock"
            log.warning("skipped the record at offset %d (%s, %d so far): %s", off, name, n, why)

    def advance(self, watermark_ms: int) -> None:
        """Close windows by the clock when the source is idle (live mode); call :meth:`cut` after."""
        self._pending.extend(self.joiner.advance(watermark_ms))

    def idle_watermark(self) -> int:
        """Where a quiet source moves the watermark: to the wall clock (less the allowed lateness) when the
        records' own times follow it, as a server stamps them; when they do not (traffic stamped with
        simulated or past times, read live), to the newest record's time plus the wall time since it
        arrived, so a pause does not make everything after it late."""
        now = int(time.time() * 1000)
        lateness = self.joiner.allowed_lateness_ms
        if self._arrival is None:
            return now - lateness
        wall, ts = self._arrival
        if abs(wall - ts) <= LIVE_CLOCK_MS:
            return now - lateness
        return ts + (now - wall) - lateness

    def flush(self) -> None:
        """End of a finite stream: close every open impression; call :meth:`cut` after."""
        self._pending.extend(self.joiner.flush())

    @property
    def pending(self) -> int:
        return len(self._pending)

    def cut(self, end: bool = False) -> LearnBatch:
        """Featurize what is pending (possibly nothing) into a batch carrying the state after it."""
        exs = list(self._pending)
        self._pending.clear()  # in place: ingest() holds a reference
        self.learned_through = max(self.learned_through, self._ingested)
        keep = self._select(exs)
        batch = self._featurize(keep) if keep else None
        if batch is None:
            t = len(self.tasks)
            batch = LearnBatch(b"", np.zeros((0, t), np.int8), np.zeros((0, t), bool), np.zeros(0),
                               np.empty(0, np.intp), [], {})
        batch.state = self.state()
        batch.end = end
        return batch

    def _select(self, exs: list[JoinedExample]) -> list[JoinedExample]:
        spec, keep = self.ranker.spec, []
        for x in exs:
            if not x.tasks:
                self.counters["nothing_to_learn"] += 1
            elif x.served.bundle_id != self.bundle_id and not self.learn_other_bundles:
                self.counters["other_bundle_examples"] += 1
            elif not fits_spec(x.served, spec):  # wrong lengths, or values that are not finite numbers
                self.counters["bad_records"] += 1
            else:
                keep.append(x)
        return keep

    def _featurize(self, keep: list[JoinedExample]) -> LearnBatch | None:
        tasks = self.tasks
        n, t = len(keep), len(tasks)
        labels = np.array([[x.labels[k] for k in tasks] for x in keep], dtype=np.int8).reshape(n, t)
        mask = np.array([[k in x.tasks for k in tasks] for x in keep], dtype=bool).reshape(n, t)
        weights = np.ones(n)
        if self.downsample_rate < 1.0:
            final_neg = np.array([x.final for x in keep]) & ~labels.any(axis=1)
            idx = np.flatnonzero(final_neg)
            if idx.size:
                coin = keep_hash([keep[i].served.request_id for i in idx], [keep[i].served.post_id for i in idx])
                drop = idx[coin >= self.downsample_rate]
                weights[idx] = 1.0 / self.downsample_rate
                if drop.size:
                    self.counters["downsampled_out"] += int(drop.size)
                    sel = np.ones(n, bool)
                    sel[drop] = False
                    keep = [x for x, s in zip(keep, sel) if s]
                    labels, mask, weights = labels[sel], mask[sel], weights[sel]
                    n = len(keep)
                    if not n:
                        return None
        feats = self.ranker.features(batch_from_records([x.served for x in keep], self.ranker.spec))
        text = batch_text(feats.leaves, feats.hidden, feats.ids, feats.context, feats.values,
                          interactions=feats.interactions)
        scorer = self.ranker.scorer
        rows = self._distinct(scorer.binary_rows(feats.ids, feats.context))
        leaf_rows = self._distinct(scorer.leaf_rows(feats.leaves))
        audit = []
        if self.audit:
            audit = [f"{x.offset}\t{x.served.request_id}\t{x.served.post_id}\t"
                     f"{','.join(k for k, on in zip(tasks, mask[i]) if on)}\t{weights[i]:g}"
                     for i, x in enumerate(keep)]
        return LearnBatch(text, labels, mask, weights, rows, audit, {}, leaf_rows=leaf_rows)

    def _distinct(self, rows: np.ndarray) -> np.ndarray:
        """The distinct rows, sorted (through a reusable mask: cheaper than sorting with repeats)."""
        self._seen_rows[rows] = True
        return _drain(self._seen_rows)


class Trainer:
    """The back half: owns the VW workspace; learns batches, keeps progressive metrics, publishes weight
    updates, writes checkpoints and ``status.json``.

    A checkpoint records the models together with the ``state`` of the last batch learned, so its offsets
    never cover an example the models have not learned (whichever process the front half runs in).
    """

    def __init__(self, ranker: StackedRanker, state_dir, tasks, resumed: tuple[dict, Path] | None = None,
                 checkpoint_every_s: float = 30.0, publish_every_s: float = 0.2, pretouch: bool = False,
                 model_dir=None, checkpoint_every_examples: int | None = None, audit: bool = False,
                 base_every: int = 200, keep_checkpoints: int = 3, counters: dict | None = None,
                 leaves_every_s: float = 2.0):
        self.ranker = ranker
        self.bundle_id = ranker.bundle_id
        self.tasks = tuple(tasks)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.state_dir / "checkpoints"
        self.task_cols = np.array([ranker.tasks.index(t) for t in self.tasks])
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_examples = checkpoint_every_examples
        self.publish_every_s = publish_every_s
        self.leaves_every_s = leaves_every_s
        self.audit = audit
        self.keep_checkpoints = keep_checkpoints
        self.metrics = ProgressiveMetrics(self.tasks)
        self.counters = counters if counters is not None else {}
        for k in FRONT_COUNTERS + BACK_COUNTERS:
            self.counters.setdefault(k, 0)
        self.task_learned = dict.fromkeys(self.tasks, 0)
        self.weighted = {t: [0.0, 0.0] for t in self.tasks}  # Σ w·p, Σ w·y (calibration with weights)
        self.update_seq = 0
        self.replay_from = 0
        self.source_end_offset: int | None = None
        self.stream_state: dict = {}
        self.front_state: dict | None = None  # state of the last batch learned
        self._audit_rows: list[str] = []
        self._since_ckpt = 0
        self._rate_window: list[tuple[float, int]] = []
        self._progressive_cache: tuple[float, dict] | None = None
        self._dnn_rows = ranker.scorer.dnn_rows(ranker.mlp.hidden_size)
        self._dirty = np.zeros(len(ranker.scorer.weights), bool)
        self._dirty_leaves = np.zeros(len(ranker.scorer.weights), bool)
        self._has_dirty = self._has_dirty_leaves = False
        self._resumed_state = resumed[0] if resumed is not None else None
        self.timings = dict.fromkeys(("vw", "metrics", "publish", "checkpoint"), 0.0)  # seconds spent
        self._ckpt_child: tuple[int, int, float] | None = None  # background checkpoint in flight

        # One workspace holds every task of the bundle (in the bundle's order); the tasks not learned
        # here are never masked in, so their weights stay the bundle's.
        model_path = resumed[1] / CKPT_MODEL if resumed is not None else Path(ranker.path) / bundles.VW_MODEL
        self.learners = TaskLearners(ranker.tasks, vw_config(ranker.manifest), model_path)
        if resumed is None and "snapshot_of" in ranker.manifest:
            # A snapshot serves the weights its source learned online; its VW model is the source's as
            # trained. Learning goes on from what it serves, not from the older model.
            changed = self.learners.set_weights(ranker.scorer.weights)
            log.info("snapshot %s of %s: %d weights learned online taken into the VW model", self.bundle_id,
                     ranker.manifest["snapshot_of"].get("version"), changed)
        if pretouch:
            self.learners.pretouch()
        # Rows a base must hold: the bundle's, and every row published since (kept as a mask, so a base
        # does not scan the whole table for non-zero rows: that took 1.5 s at -b 25).
        self._base_rows = np.zeros(len(ranker.scorer.weights), bool)
        with np.load(Path(ranker.path) / "lr_weights.npz") as z:
            self._base_rows[z["rows"].astype(np.intp)] = True
        self.publisher = UpdatePublisher(model_dir, self.bundle_id, base_every=base_every) if model_dir else None
        self._need_base = False
        if resumed is not None:
            self._resume(*resumed)
        self._last_publish = self._last_ckpt = self._last_leaves = time.monotonic()
        self._publish_cost = 0.0
        self._clean_audit()

    def _resume(self, state: dict, path: Path) -> None:
        if (path / CKPT_METRICS).is_file():   # checkpoints before it had none: their metrics start afresh
            self.metrics.load(path / CKPT_METRICS)
        self.replay_from = state["replay_from"]
        self.update_seq = state["update_seq"]
        self.counters.update(state["counters"])
        self.task_learned.update(state["task_learned"])
        self.weighted.update({t: list(v) for t, v in state["weighted"].items()})
        self.stream_state = dict(state.get("stream") or {})
        # Serving mirrors VW: the checkpoint's weights differ from the bundle's numpy copy.
        self.ranker.scorer.weights[:] = self.learners.weights()
        self._base_rows |= nonzero_rows(self.ranker.scorer.weights)
        self.ranker.scorer.refresh()
        self.ranker.update_seq = self.update_seq
        if self.publisher is not None:
            self.update_seq = max(self.update_seq, self.publisher.seq)
            self.publisher.seq = self.update_seq
            self._need_base = True  # replicas may hold weights learned after this checkpoint

    def _clean_audit(self) -> None:
        d = self.state_dir / "audit"
        latest = load_latest(self.ckpt_dir)
        committed = int(latest[1].name.split("-")[1]) if latest else 0
        for p in d.glob("ckpt-*.tsv") if d.is_dir() else ():
            if int(p.stem.split("-")[1]) > committed:
                p.unlink()  # learned after the last checkpoint: not durable, will be learned again

    @property
    def learned_through(self) -> int:
        s = self.front_state or self._resumed_state
        return s["learned_through"] if s else -1

    # -- learning --------------------------------------------------------------------------------
    def learn(self, batch: LearnBatch) -> int:
        """Learn a batch (pre-update probabilities into the metrics); adopt its stream state."""
        n = len(batch)
        if n:
            t0 = time.perf_counter()
            tasks, labels, mask, weights = self.tasks, batch.labels, batch.mask, batch.weights
            full_labels = np.zeros((n, len(self.ranker.tasks)), np.int8)
            full_mask = np.zeros((n, len(self.ranker.tasks)), bool)
            full_labels[:, self.task_cols], full_mask[:, self.task_cols] = labels, mask
            preds = learn_text(self.learners, batch.text, full_labels, full_mask, weights)[:, self.task_cols]
            t1 = time.perf_counter()
            self.timings["vw"] += t1 - t0
            for k, task in enumerate(tasks):
                m = mask[:, k]
                c = int(m.sum())
                if c:
                    y, p = labels[m, k], preds[m, k]
                    self.metrics.update(task, y, p)
                    w = weights[m]
                    self.weighted[task][0] += float(w @ p)
                    self.weighted[task][1] += float(w @ y)
                    self.task_learned[task] += c
            self._dirty[batch.rows] = True
            self._dirty_leaves[batch.leaf_rows] = True
            self._has_dirty = True
            self._has_dirty_leaves = self._has_dirty_leaves or len(batch.leaf_rows) > 0
            self.counters["learned_examples"] += n
            self._since_ckpt += n
            if self.audit:
                self._audit_rows.extend(batch.audit)
            self.timings["metrics"] += time.perf_counter() - t1
        if batch.state:
            self.front_state = batch.state
            self.counters.update(batch.state["counters"])
        return n

    # -- publishing ------------------------------------------------------------------------------
    def touched_rows(self, leaves: bool = True) -> np.ndarray:
        """Weight rows changed since the last publish: the ids', contexts' and biases' rows of the examples
        learned, the DNN units' rows, and (``leaves``) the rows of their GBDT leaves."""
        parts = []
        if self._has_dirty:
            self._dirty[self._dnn_rows] = True
            parts.append(_drain(self._dirty))
            self._has_dirty = False
        if leaves and self._has_dirty_leaves:
            parts.append(_drain(self._dirty_leaves))
            self._has_dirty_leaves = False
            self._last_leaves = time.monotonic()
        if not parts:
            return np.empty(0, np.intp)
        return parts[0] if len(parts) == 1 else np.union1d(*parts)

    def current_values(self, rows: np.ndarray) -> np.ndarray:
        """[K, 8] weights of the rows, from VW."""
        return self.learners.get_weights(rows)

    def publish_due_in(self) -> float | None:
        """Seconds until :meth:`maybe_publish` would publish (None: nothing learned to publish)."""
        if not (self._has_dirty or self._has_dirty_leaves):
            return None
        gap = max(self.publish_every_s, 10 * self._publish_cost)
        return max(0.0, self._last_publish + gap - time.monotonic())

    def maybe_publish(self) -> None:
        """Publish when due. Under load, publishing (one get_weight call per row and slot) is kept to ~10%
        of the time (its cost is smoothed over publishes). The rows of GBDT leaves, which every example
        touches but which learn slowly (value 0.05), go out every ``leaves_every_s``: reading them is
        most of a publish's cost, and an engagement's effect on Rank is in its ids' rows."""
        now = time.monotonic()
        if now - self._last_publish >= max(self.publish_every_s, 10 * self._publish_cost):
            self.publish(leaves=now - self._last_leaves >= self.leaves_every_s)

    def publish(self, leaves: bool = True) -> int | None:
        """Ship the changed rows (all of them, or all but the leaves' with ``leaves=False``; or a base
        when due) and write ``status.json``; return the sequence."""
        t0 = time.monotonic()
        rows = self.touched_rows(leaves=leaves)
        seq = None
        if rows.size:
            values = self._mirror(rows)
            if self.publisher is not None:
                if not self._need_base:
                    seq = self.publisher.publish(rows, values, self.learned_through)
        t_base = time.monotonic()
        if self.publisher is not None and (self._need_base or self.publisher.base_due):
            held = self.touched_rows(leaves=True)  # leaf rows held back: a base holds every row learned
            if held.size:
                self._mirror(held)
            base_rows, base_values = self.snapshot()
            seq = self.publisher.publish_base(base_rows, base_values, self.learned_through, new_seq=self._need_base)
            self._need_base = False
        t_base = time.monotonic() - t_base
        if seq is not None:
            self.update_seq = seq
            self.ranker.update_seq = seq
            self.counters["updates"] += 1
        self.write_status()
        self._last_publish = time.monotonic()
        cost = self._last_publish - t0
        # Bases are rare (one per ``base_every`` deltas): they do not space the deltas out.
        self._publish_cost += 0.25 * (cost - t_base - self._publish_cost)
        self.timings["publish"] += cost
        return seq

    def _mirror(self, rows: np.ndarray) -> np.ndarray:
        """Copy the rows' current values from VW into the served copy (which bases are published
        from; nothing scores with it here) and mark them for bases; return the values."""
        values = self.current_values(rows)
        self.ranker.scorer.weights[rows] = values
        self._base_rows[rows] = True
        return values

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row that may differ from the bundle's: the bundle's non-zero rows and every row published
        (or, after a resume, non-zero in the checkpoint)."""
        rows = np.flatnonzero(self._base_rows)
        return rows, self.ranker.scorer.weights[rows]

    # -- durability ------------------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        due_n = self.checkpoint_every_examples is not None and self._since_ckpt >= self.checkpoint_every_examples
        return due_n or time.monotonic() - self._last_ckpt >= self.checkpoint_every_s

    def maybe_checkpoint(self, background: bool = False) -> None:
        self.reap_checkpoint()
        if self.checkpoint_due():
            self.checkpoint(background=background)

    def checkpoint(self, background: bool = False) -> Path | None:
        """Write the models + the state of the last batch learned, atomically (None: nothing to record,
        or written in the background).

        ``background``: write from a forked copy of this process (copy-on-write snapshot of the models)
        while learning goes on, so a checkpoint does not stall learning and publishing; at most one is in
        flight (the next waits for it), the copy dies with this process, and :attr:`replay_from` moves
        only once it has committed.
        """
        self.wait_checkpoint()
        self._last_ckpt = time.monotonic()
        fs = self.front_state
        if fs is None:
            return None  # nothing learned or ingested since start: the current checkpoint still holds
        self._since_ckpt = 0
        audit_rows, self._audit_rows = (self._audit_rows if self.audit else []), []
        self.counters["checkpoints"] += 1
        state = {"state_version": STATE_VERSION, "bundle_id": self.bundle_id, "tasks": list(self.tasks),
                 "learned_through": fs["learned_through"], "replay_from": fs["replay_from"],
                 "source_log": fs.get("source_log"), "opens_known": fs.get("opens_known"),
                 "joiner": dict(fs["joiner"]),
                 "update_seq": self.update_seq, "counters": dict(self.counters),
                 "task_learned": dict(self.task_learned), "weighted": self.weighted,
                 "vw_weighted_examples": self.vw_weighted_examples(),
                 "stream": dict(self.stream_state), "written_at": int(time.time() * 1000)}
        if background:
            me = os.getpid()
            pid = os.fork()
            if pid == 0:  # the snapshot: write, and never return into the caller's loop
                code = 1
                try:
                    _die_with_parent(me)
                    self._write_checkpoint(state, audit_rows)
                    code = 0
                except BaseException:
                    import traceback
                    traceback.print_exc()
                finally:
                    os._exit(code)
            self._ckpt_child = (pid, state["replay_from"], self._last_ckpt)
            self.timings["checkpoint"] += time.monotonic() - self._last_ckpt
            return None
        path = self._write_checkpoint(state, audit_rows)
        self.replay_from = state["replay_from"]
        self.timings["checkpoint"] += time.monotonic() - self._last_ckpt
        return path

    def _write_checkpoint(self, state: dict, audit_rows: list[str]) -> Path:
        if audit_rows:
            # Named after the checkpoint about to be written; removed on start if it never was.
            d = self.state_dir / "audit"
            d.mkdir(exist_ok=True)
            p = d / f"ckpt-{_next_checkpoint_seq(self.ckpt_dir):010d}.tsv"
            with open(p, "w") as f:
                f.write("".join(r + "\n" for r in audit_rows))
                f.flush()
                os.fsync(f.fileno())
        state["progressive"] = _jsonable(self.progressive(max_age_s=0.0))
        files = {CKPT_MODEL: self.learners.save, CKPT_METRICS: self.metrics.save}
        return write_checkpoint(self.ckpt_dir, state, files, keep=self.keep_checkpoints)

    def reap_checkpoint(self, block: bool = False) -> None:
        """Collect a finished background checkpoint (raise if it failed)."""
        if self._ckpt_child is None:
            return
        pid, replay_from, _ = self._ckpt_child
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done == 0:
            return
        self._ckpt_child = None
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"background checkpoint (pid {pid}) failed with exit code {code}")
        self.replay_from = replay_from

    def wait_checkpoint(self) -> None:
        self.reap_checkpoint(block=True)

    # -- status ----------------------------------------------------------------------------------
    def vw_weighted_examples(self) -> dict[str, float]:
        """VW's own count of weighted examples (one per parsed row, whichever tasks it learned)."""
        return {"all": self.learners.weighted_examples()}

    def progressive(self, max_age_s: float = 5.0) -> dict:
        now = time.monotonic()
        if self._progressive_cache is None or now - self._progressive_cache[0] > max_age_s:
            self._progressive_cache = (now, self.metrics.get())
        return self._progressive_cache[1]

    def status(self) -> dict:
        now = time.monotonic()
        self._rate_window.append((now, self.counters["learned_examples"]))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 10.0:
            self._rate_window.pop(0)
        (t0, n0), (t1, n1) = self._rate_window[0], self._rate_window[-1]
        end = self.source_end_offset
        fs = self.front_state or self._resumed_state or {}
        joiner = fs.get("joiner") or {}
        return {"bundle_id": self.bundle_id, "version": f"{self.bundle_id}+{self.update_seq}",
                "update_seq": self.update_seq, "tasks": list(self.tasks),
                "learned_through": self.learned_through, "source_end_offset": end,
                "lag": None if end is None else max(0, end - 1 - self.learned_through),
                "events_per_s": (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0,
                "open_impressions": joiner.get("open", 0), "join": joiner.get("stats") or {},
                "counters": dict(self.counters), "task_learned": dict(self.task_learned),
                "weighted_calibration": {t: (p / y if y else None) for t, (p, y) in self.weighted.items()},
                "progressive": _jsonable(self.progressive()),
                "seconds": {k: round(v, 3) for k, v in self.timings.items()},  # spent learning, publishing, ...
                "written_at": int(time.time() * 1000)}

    def write_status(self) -> None:
        tmp = self.state_dir / ".status.json.tmp"
        tmp.write_text(json.dumps(self.status(), indent=1))
        os.replace(tmp, self.state_dir / "status.json")

    def close(self) -> None:
        self.wait_checkpoint()
        self.learners.close()
        if self.publisher is not None:
            self.publisher.close()


def _die_with_parent(parent: int) -> None:
    """In a forked checkpoint writer: die (SIGKILL) with the learner, as a synchronous writer would; leave
    Ctrl-C and SIGTERM sent to the whole process group to the learner, which waits for this write."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover (non-Linux)
        return
    if os.getppid() != parent:
        os._exit(1)


class OnlineLearner:
    """Joiner + progressive validation + per-task VW updates + checkpoints + weight publishing, in one
    process (a :class:`Featurizer` feeding a :class:`Trainer`; :mod:`online.pipeline` runs the two halves
    in two processes).

    Parameters
    ----------
    bundle_dir : the bundle whose frozen extractors and VW models are used (records of other bundles
        are skipped and counted unless ``learn_other_bundles``).
    state_dir : checkpoints, audit files and ``status.json``.
    tasks : tasks to learn (default: all of the bundle's).
    model_dir : where weight updates are published (None: no publishing).
    checkpoint_every_s, checkpoint_every_examples : checkpoint when either is reached.
    batch_size : joined examples featurized and learned together.
    archive_foreign : when ``state_dir`` holds another bundle's checkpoints, move them to
        ``state_dir/archive/`` and start afresh (the server's embedded learner) instead of refusing.
    """

    def __init__(self, bundle_dir, state_dir, tasks=None, attribution_window_ms: int = 300_000,
                 downsample_rate: float = 1.0, returned_is_viewed: bool = False,
                 checkpoint_every_s: float = 30.0, publish_every_s: float = 0.2, pretouch: bool = False,
                 model_dir=None, allowed_lateness_ms: int = 5_000, max_open: int = 1_000_000,
                 checkpoint_every_examples: int | None = None, batch_size: int = 1024, audit: bool = False,
                 learn_other_bundles: bool = False, base_every: int = 200, keep_checkpoints: int = 3,
                 archive_foreign: bool = False):
        if not 0.0 < downsample_rate <= 1.0:
            raise ValueError(f"downsample_rate must be in (0, 1], got {downsample_rate}")
        self.bundle_dir = Path(bundle_dir)
        self.state_dir = Path(state_dir)
        # One thread for XGBoost and BLAS: a learner is one busy loop, and idle pool threads spinning
        # beside pylibvw halved its learn rate on 2 vCPUs (scale out with processes, not threads).
        self._thread_limits = threadpool_limits(1)  # restored by close()
        self.ranker = StackedRanker.load(self.bundle_dir, threads=1)
        self.bundle_id = self.ranker.bundle_id
        self.tasks = resolve_tasks(self.ranker, tasks)
        self.counters: dict = {}
        self.front = Featurizer(self.ranker, self.tasks, attribution_window_ms, downsample_rate, returned_is_viewed,
                                allowed_lateness_ms, max_open, batch_size, audit, learn_other_bundles,
                                counters=self.counters)
        self._lock = -1
        try:
            if archive_foreign:  # only under the state lock: no other learner may be writing there
                from online.pipeline import lock_state_dir
                self._lock = lock_state_dir(self.state_dir, 60.0)
                _archive_and_log(self.state_dir, self.bundle_id, self.tasks)
            resumed = load_resume(self.state_dir, self.bundle_id, self.tasks)
            self.trainer = Trainer(self.ranker, self.state_dir, self.tasks, resumed, checkpoint_every_s,
                                   publish_every_s, pretouch, model_dir, checkpoint_every_examples, audit,
                                   base_every, keep_checkpoints, counters=self.counters)
        except BaseException:                 # a learner that did not start holds no lock
            self._thread_limits.restore_original_limits()
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1
            raise
        if resumed is not None:
            self.front.resume(resumed[0])
        self._started = time.time()

    # -- the halves' state, under the names callers use ---------------------------------------------
    joiner = property(lambda self: self.front.joiner)
    metrics = property(lambda self: self.trainer.metrics)
    learners = property(lambda self: self.trainer.learners)
    publisher = property(lambda self: self.trainer.publisher)
    task_learned = property(lambda self: self.trainer.task_learned)
    weighted = property(lambda self: self.trainer.weighted)
    update_seq = property(lambda self: self.trainer.update_seq)
    replay_from = property(lambda self: self.trainer.replay_from)
    learned_through = property(lambda self: self.front.learned_through)
    downsample_rate = property(lambda self: self.front.downsample_rate)
    batch_size = property(lambda self: self.front.batch_size)

    @property
    def source_end_offset(self):
        return self.trainer.source_end_offset

    @source_end_offset.setter
    def source_end_offset(self, value):
        self.trainer.source_end_offset = value

    @property
    def stream_state(self) -> dict:
        return self.trainer.stream_state

    # -- input -----------------------------------------------------------------------------------
    def attach_log(self, path) -> str | None:
        """Before reading the event log ``path``: check the checkpoint's offsets against it
        (:meth:`Featurizer.attach_log`)."""
        said = self.front.attach_log(path)
        self.trainer.replay_from = self.front.replay_from
        return said

    def _learn(self, batch: LearnBatch) -> None:
        self.trainer.learn(batch)

    def _learn_step(self, batch: LearnBatch) -> None:
        self.trainer.learn(batch)
        self.trainer.maybe_publish()
        self._maybe_checkpoint()

    def process(self, records: Iterable[tuple[int, ServedRecord | Engagement]]) -> int:
        """Join, learn, publish and checkpoint as due; return the number of examples learned."""
        before = self.counters["learned_examples"]
        self.front.ingest(records, self._learn_step)
        self._learn_step(self.front.cut())
        return self.counters["learned_examples"] - before

    def idle_watermark(self) -> int:
        return self.front.idle_watermark()

    def advance(self, watermark_ms: int) -> int:
        """Close windows by the clock when the source is idle (live mode); return examples learned."""
        before = self.counters["learned_examples"]
        self.front.advance(watermark_ms)
        self._learn(self.front.cut())
        return self.counters["learned_examples"] - before

    def finish(self) -> int:
        """End of a finite stream: close every open impression, learn, publish and checkpoint."""
        before = self.counters["learned_examples"]
        self.front.flush()
        self._learn(self.front.cut())
        self.trainer._progressive_cache = None
        self.publish()
        self.checkpoint()
        return self.counters["learned_examples"] - before

    # -- publishing and durability -----------------------------------------------------------------
    def touched_rows(self) -> np.ndarray:
        return self.trainer.touched_rows()

    def current_values(self, rows: np.ndarray) -> np.ndarray:
        return self.trainer.current_values(rows)

    def maybe_publish(self) -> None:
        self.trainer.maybe_publish()

    def publish(self) -> int | None:
        return self.trainer.publish()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        return self.trainer.snapshot()

    def _maybe_checkpoint(self) -> None:
        if self.trainer.checkpoint_due():
            self.checkpoint()

    def maybe_checkpoint(self) -> None:
        self._maybe_checkpoint()

    def checkpoint(self) -> Path:
        """Learn what is pending, then write models + offsets atomically."""
        self._learn(self.front.cut())
        return self.trainer.checkpoint()

    # -- status ----------------------------------------------------------------------------------
    def vw_weighted_examples(self) -> dict[str, float]:
        return self.trainer.vw_weighted_examples()

    def progressive(self, max_age_s: float = 5.0) -> dict:
        return self.trainer.progressive(max_age_s)

    def status(self) -> dict:
        return self.trainer.status()

    def write_status(self) -> None:
        self.trainer.write_status()

    def close(self) -> None:
        self.trainer.close()
        self._thread_limits.restore_original_limits()
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1


def _drain(mask: np.ndarray) -> np.ndarray:
    """The indices set in ``mask``, which is cleared."""
    out = np.flatnonzero(mask)
    mask[out] = False
    return out


def nonzero_rows(weights: np.ndarray) -> np.ndarray:
    """Mask of the rows of a ``[R, 8]`` float32 table with any non-zero bit (a -0.0 counts: harmless)."""
    bits = np.ascontiguousarray(weights).view(np.uint64)
    out = bits[:, 0] != 0
    for j in range(1, bits.shape[1]):
        out |= bits[:, j] != 0
    return out


def _next_checkpoint_seq(root: Path) -> int:
    seqs = [int(p.name[5:]) for p in root.glob("ckpt-*") if p.name[5:].isdigit()] if root.is_dir() else []
    return max(seqs, default=0) + 1


def _jsonable(x):
    """NaN → None, so status and checkpoints are strict JSON."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and x != x:
        return None
    return x


__all__ = ["OnlineLearner", "Featurizer", "Trainer", "LearnBatch", "vw_config", "bundles"]
