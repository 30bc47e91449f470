"""Publishing learned weights to serving replicas through a shared model directory.

Layout under ``<model_dir>/updates/<bundle_id>/``::

    <seq:012d>.npz        a delta: the weight rows changed since the previous update
    base-<seq:012d>.npz   a snapshot: every row that differs from the bundle, as of update ``seq``

Each file is an ``.npz`` with ``rows`` (int64 [K], un-strided weight-table rows), ``values`` (float32
[K, T], the bundle's tasks in manifest order), ``seq``, ``created_at`` (ms UTC), ``covered_offset``
(the learner's learned-through log offset), ``kind`` (``delta``/``base``) and ``format_version``.
Files are written to a temp name and ``os.replace``'d, so a reader never sees half a file.

Sequence numbers are dense over deltas; a base ``S`` equals the bundle plus every delta ``<= S`` and
shares the number of the delta it follows (or takes a new one when the learner restarts). A replica
follows the deltas in order; a new replica, or one that fell behind pruned deltas or a restart, starts
from the newest base. Serving applies each update with ``ranker.apply_update(rows, values, seq)``.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> pub = UpdatePublisher(d, "b1")
>>> pub.publish(np.array([3, 7]), np.ones((2, 1), np.float32), covered_offset=10)
1
>>> [(u.seq, u.kind, u.rows.tolist()) for u in UpdateWatcher(d, "b1").poll()]
[(1, 'delta', [3, 7])]
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
_DELTA = re.compile(r"^(\d{12})\.npz$")
_BASE = re.compile(r"^base-(\d{12})\.npz$")


@dataclass
class Update:
    """One published weight update: overwrite ``rows`` with ``values``."""

    seq: int
    kind: str
    rows: np.ndarray
    values: np.ndarray
    created_at: int
    covered_offset: int
    path: Path


def updates_dir(model_dir, bundle_id: str) -> Path:
    return Path(model_dir) / "updates" / bundle_id


def _scan(directory: Path) -> tuple[list[int], list[int]]:
    deltas, bases = [], []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return [], []
    for name in names:
        if m := _DELTA.match(name):
            deltas.append(int(m.group(1)))
        elif m := _BASE.match(name):
            bases.append(int(m.group(1)))
    return sorted(deltas), sorted(bases)


def read_update(path: Path) -> Update:
    with np.load(path) as z:
        if int(z["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"{path}: update format_version {int(z['format_version'])}, expected {FORMAT_VERSION}")
        return Update(int(z["seq"]), str(z["kind"]), z["rows"], z["values"], int(z["created_at"]),
                      int(z["covered_offset"]), path)


class PublisherInUseError(RuntimeError):
    """Another learner publishes updates for the same bundle into the same directory."""


def _lock_publisher(directory: Path, timeout_s: float) -> int:
    """One publisher per bundle's update directory: two learners writing the same sequence numbers would mix
    their weights on every server."""
    from online.locks import hold_lock
    fd, holder = hold_lock(directory / ".publisher.lock", timeout_s)
    if fd < 0:
        raise PublisherInUseError(f"{directory}: another learner (pid {holder}) publishes this bundle's updates "
                                  "here; servers would mix the two learners' weights. Stop it, or publish "
                                  "elsewhere (--model-dir)")
    return fd


class UpdatePublisher:
    """Writes deltas and periodic bases for one bundle; see the module docstring.

    Parameters
    ----------
    base_every : write a base after this many deltas (and prune deltas older than the previous base).
    keep_bases : bases kept on disk.
    fsync : fsync each file before it is renamed into place.
    """

    def __init__(self, model_dir, bundle_id: str, base_every: int = 200, keep_bases: int = 2, fsync: bool = False,
                 lock_timeout_s: float = 10.0):
        self.dir = updates_dir(model_dir, bundle_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_publisher(self.dir, lock_timeout_s)
        self.bundle_id = bundle_id
        self.base_every = base_every
        self.keep_bases = keep_bases
        self.fsync = fsync
        deltas, bases = _scan(self.dir)
        # Never reuse a number a replica may already have applied (e.g. after a learner restart).
        self.seq = max(deltas[-1:] + bases[-1:] + [0])
        self.deltas_since_base = 0

    def close(self) -> None:
        """Release the directory to the next publisher."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __del__(self):
        if getattr(self, "_lock", -1) >= 0:
            self.close()

    def _write(self, name: str, rows, values, seq: int, covered_offset: int, kind: str) -> Path:
        path = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, rows=np.asarray(rows, np.int64), values=np.asarray(values, np.float32),
                     seq=np.int64(seq), created_at=np.int64(time.time() * 1000),
                     covered_offset=np.int64(covered_offset), kind=np.str_(kind),
                     format_version=np.int64(FORMAT_VERSION))
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def publish(self, rows: np.ndarray, values: np.ndarray, covered_offset: int) -> int:
        """Write the next delta; return its sequence number."""
        self.seq += 1
        self._write(f"{self.seq:012d}.npz", rows, values, self.seq, covered_offset, "delta")
        self.deltas_since_base += 1
        return self.seq

    def publish_base(self, rows: np.ndarray, values: np.ndarray, covered_offset: int, new_seq: bool = False) -> int:
        """Write a snapshot as of the current sequence (``new_seq``: as a sequence of its own); prune."""
        if new_seq or self.seq == 0:
            self.seq += 1
        self._write(f"base-{self.seq:012d}.npz", rows, values, self.seq, covered_offset, "base")
        self.deltas_since_base = 0
        self.prune()
        return self.seq

    @property
    def base_due(self) -> bool:
        return self.deltas_since_base >= self.base_every

    def prune(self) -> None:
        """Keep the newest ``keep_bases`` bases, and the deltas after the base before the oldest of them
        (so a follower slightly behind a new base still reads deltas rather than a whole snapshot)."""
        deltas, bases = _scan(self.dir)
        keep_from = bases[-self.keep_bases - 1] if len(bases) > self.keep_bases else 0
        for s in bases[:-self.keep_bases]:
            (self.dir / f"base-{s:012d}.npz").unlink(missing_ok=True)
        for s in deltas:
            if s <= keep_from:
                (self.dir / f"{s:012d}.npz").unlink(missing_ok=True)


class UpdateWatcher:
    """What a serving replica polls: the updates after ``after_seq``, in order.

    A replica that starts fresh (``after_seq=0``) or finds the next delta missing (pruned, or the learner
    restarted and wrote a base under a new number) continues from the newest base.
    """

    def __init__(self, model_dir, bundle_id: str, after_seq: int = 0):
        self.dir = updates_dir(model_dir, bundle_id)
        self.after_seq = after_seq

    def poll(self, limit: int | None = None) -> list[Update]:
        deltas, bases = _scan(self.dir)
        out: list[Update] = []
        delta_set = set(deltas)
        nxt = self.after_seq + 1
        newer_base = [b for b in bases if b >= nxt]
        if newer_base and (self.after_seq == 0 or nxt not in delta_set):
            try:
                out.append(read_update(self.dir / f"base-{newer_base[-1]:012d}.npz"))
            except FileNotFoundError:  # pruned between listing and reading: try again next poll
                return []
            nxt = newer_base[-1] + 1
        while nxt in delta_set and (limit is None or len(out) < limit):
            try:
                out.append(read_update(self.dir / f"{nxt:012d}.npz"))
            except FileNotFoundError:
                break
            nxt += 1
        if out:
            self.after_seq = out[-1].seq
        return out
