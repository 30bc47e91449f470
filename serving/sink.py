"""Where served records go: the ``ServedRecordSink`` interface and the local event-log sink.

Rank hands over one :class:`ServedBatch` per response (arrays, not records) and returns at once; the
records are built and appended by a background thread in batches, so the log adds no latency to Rank.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from online.eventlog import EventLog, Record
from online.records import Engagement, ServedRecord

log = logging.getLogger(__name__)


@dataclass
class ServedBatch:
    """The returned posts of one response, with the inputs exactly as the ranker used them."""

    request_id: str
    user_id: str
    ts: int
    bundle_id: str
    update_seq: int
    device: str
    surface: str
    user_features: np.ndarray       # [U] aligned, spec order
    post_ids: list[str]             # [K] in returned order (position = index)
    author_ids: list[str]
    media_types: list[str]
    created_at: np.ndarray          # [K] int64
    post_features: np.ndarray       # [K, P] aligned, spec order

    def records(self) -> list[ServedRecord]:
        user = self.user_features.tolist()
        posts = self.post_features.tolist()
        created = self.created_at.tolist()
        return [ServedRecord(self.request_id, pid, self.user_id, self.author_ids[k], k, self.ts,
                             self.bundle_id, self.update_seq, self.media_types[k], created[k],
                             self.device, self.surface, list(user), posts[k])
                for k, pid in enumerate(self.post_ids)]


class ServedRecordSink(Protocol):
    def submit(self, batch: ServedBatch) -> None:
        """Take a response's served records; must not block the caller."""

    def close(self) -> None:
        """Flush what is pending and stop."""


class NullSink:
    def submit(self, batch: ServedBatch) -> None:
        pass

    def close(self) -> None:
        pass


class SharedEventLog:
    """An EventLog shared by the served-record thread and LogEvents (appends serialised by a lock)."""

    def __init__(self, path: Path, fsync: bool = True):
        self.log = EventLog(path, fsync=fsync)
        self._lock = threading.Lock()

    def append(self, records: list[Record]) -> list[int]:
        with self._lock:
            return self.log.append(records)

    def close(self) -> None:
        with self._lock:
            self.log.close()


class LogPruner(threading.Thread):
    """Deletes the event log's segments older than the retention every ``every_s`` (and once at start),
    keeping every record ``needed()`` says a learner still has to read (an offset; None: no learner reads
    this log)."""

    def __init__(self, log_: SharedEventLog, retention_h: float, needed, every_s: float = 600.0):
        super().__init__(name="eventlog-pruner", daemon=True)
        self.log, self.max_age_s, self.needed, self.every_s = log_, retention_h * 3600.0, needed, every_s
        self.stopped = threading.Event()

    def prune_now(self) -> list[int]:
        keep_from = self.needed()
        with self.log._lock:
            return self.log.log.prune(self.max_age_s, keep_from)

    def run(self) -> None:
        while True:
            try:
                self.prune_now()
            except Exception:   # a pruner must never stop serving: log and try again later
                log.exception("event-log retention")
            if self.stopped.wait(self.every_s):
                return

    def stop(self) -> None:
        self.stopped.set()


def learner_needs(settings) -> int | None:
    """The first local-log offset the embedded learner still has to read: its checkpoint's ``replay_from``,
    0 before its first checkpoint (or when the checkpoint cannot be read); None when no learner reads the
    local log (none runs here, or it reads the Redis stream)."""
    from online.checkpoint import load_latest
    from online.eventlog import log_identity

    from .learner_process import wants_learner
    if settings.bus_url or not wants_learner(settings, say=False):
        return None
    try:
        latest = load_latest(Path(settings.learner_state_dir) / "checkpoints")
    except Exception:
        return 0
    if not latest:
        return 0
    counted_in = latest[0].get("source_log")
    if counted_in is not None and counted_in != log_identity(settings.eventlog_dir):
        return 0   # its offsets count in another log: this one it will read from its start
    return int(latest[0]["replay_from"])


class BusEventLog(SharedEventLog):
    """Scale-out: every record goes to the Redis stream the learner reads and to the local log (events
    to the stream first, served records to the local log first; see :meth:`append`).

    Offsets returned (and so ``EventResult.log_offset``) are the stream's, the numbering the
    learner's published ``covered_offset`` uses; a record is acknowledged only after both writes.
    """

    def __init__(self, path: Path, bus_url: str, fsync: bool = True):
        from online.bus import RedisBus

        try:
            self.bus = RedisBus(bus_url)
            self.bus.client.ping()
        except Exception as e:  # fail at start, not on every batch of served records
            raise ConnectionError(f"bus {bus_url}: not reachable ({e})") from None
        super().__init__(path, fsync)

    def append(self, records: list[Record]) -> list[int]:
        from online.bus import id_to_offset

        with self._lock:
            self.log.refuse_if_unusable()     # not to the stream either: every retry would add a copy there
            if any(type(r) is Engagement for r in records):
                # Events go to the stream first: if Redis is down nothing is written, the client is told,
                # and its retry is not taken for a duplicate (the dedup window is read back from the local
                # log). The other failure, the local append after the stream's, leaves a duplicate that
                # the learner's joiner drops by event id.
                offsets = [id_to_offset(i) for i in self.bus.publish(records)]
                self.log.append(records)
                return offsets
            # Served records (nobody retries them): the local log first, so an outage leaves no gap in
            # it (export, retraining); the stream's copy of the batch is then counted as not streamed.
            try:
                self.log.append(records)
            except BaseException as e:        # the records it kept whole never reach the stream
                e.records_not_streamed = getattr(e, "records_kept", 0)
                raise
            try:
                return [id_to_offset(i) for i in self.bus.publish(records)]
            except Exception as e:
                raise NotStreamed(f"{len(records)} served records kept in the local log but not sent to the "
                                  f"stream ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        super().close()
        self.bus.close()


class NotStreamed(Exception):
    """Served records written to the local log whose copy to the stream failed (:class:`BusEventLog`)."""


class EventLogSink:
    """Appends served records to a :class:`SharedEventLog` from a background thread, in batches.

    Counts ``written`` (in the log), ``dropped`` (lost: the queue was full, or the log refused them) and
    ``not_streamed`` (in the local log, but not sent to the stream: a learner over the bus never sees
    them); ``feedrank_served_records_total`` exports them."""

    def __init__(self, log_: SharedEventLog, batch: int = 1024, flush_ms: float = 50.0,
                 max_queue: int = 200_000):
        self.log = log_
        self.batch, self.flush_s = batch, flush_ms / 1000.0
        self._queue: queue.Queue[ServedBatch | None] = queue.Queue()
        self._pending = 0
        self.max_queue = max_queue
        self.dropped = 0
        self.written = 0
        self.not_streamed = 0
        self._failures, self._last_said = 0, 0.0     # failed appends in a row; when one was last logged
        self._thread = threading.Thread(target=self._run, name="served-record-sink", daemon=True)
        self._thread.start()

    def submit(self, batch: ServedBatch) -> None:
        if self._pending >= self.max_queue:  # the disk cannot keep up: count, never block Rank
            self.dropped += len(batch.post_ids)
            return
        self._pending += len(batch.post_ids)
        self._queue.put(batch)

    def _run(self) -> None:
        stop = False
        while not stop:
            records: list[ServedRecord] = []
            deadline = None
            while len(records) < self.batch:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                records.extend(item.records())
                self._pending -= len(item.post_ids)
                deadline = deadline or time.monotonic() + self.flush_s
            if records:
                try:
                    self.log.append(records)
                    self.written += len(records)
                    self._failures = 0
                except NotStreamed as e:
                    self.written += len(records)
                    self.not_streamed += len(records)
                    if self._say_failure():
                        log.error("%s: a learner over the bus does not see them", e)
                except Exception as e:
                    kept = getattr(e, "records_kept", 0)   # written whole before the append failed
                    self.written += kept
                    self.not_streamed += getattr(e, "records_not_streamed", 0)
                    self.dropped += len(records) - kept
                    if self._say_failure():
                        log.error("event-log append failed (%s: %s): %d of %d served records lost, %d so far",
                                  type(e).__name__, e, len(records) - kept, len(records), self.dropped,
                                  exc_info=self._failures == 1)

    def _say_failure(self) -> bool:
        """Whether to log this failure: the first of a run of them, then one a minute (a full disk fails
        every batch, 20 times a second)."""
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._last_said >= 60.0:
            self._last_said = now
            return True
        return False

    def flush(self, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while (self._pending > 0 or not self._queue.empty()) and time.monotonic() < end:
            time.sleep(0.005)
        time.sleep(self.flush_s + 0.01)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
