"""Scale-out transport: served records and events over a Redis Stream with a consumer group.

Serving replicas :meth:`RedisBus.publish` (pipelined ``XADD``; one field ``r`` holding the same compact
JSON payload as an event-log line). The learner :meth:`RedisBus.consume`\\ s with ``XREADGROUP``: on start
it first re-reads its own pending entries (delivered before a crash, never acknowledged), then new
ones. Entries are acknowledged (``XACK``) only once a checkpoint covers them — see :meth:`ack_through`
— so a restarted learner gets back everything its last checkpoint did not cover.

Stream ids map to increasing integer offsets (``ms << 22 | seq``) so the joiner and the checkpoint use
them like event-log offsets.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque

import redis

from online.eventlog import Record, _to_json
from online.records import SERVED_FIELDS, Engagement, Malformed, record_from_row

log = logging.getLogger(__name__)
TRIM_EVERY_S = 10.0   # how often a consumer trims the stream of what every consumer group acknowledged

_SEQ_BITS = 22


def id_to_offset(entry_id: bytes | str) -> int:
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    return (int(ms) << _SEQ_BITS) | int(seq)


def offset_to_id(offset: int) -> str:
    return f"{offset >> _SEQ_BITS}-{offset & ((1 << _SEQ_BITS) - 1)}"


def encode(rec: Record) -> bytes:
    if isinstance(rec, Engagement):
        row = ["E", rec.event_id, rec.request_id, rec.post_id, rec.kind, rec.ts, rec.dwell_ms]
    else:
        row = ["S", *(getattr(rec, f) for f in SERVED_FIELDS)]
    return _to_json(row)


def decode(payload: bytes | None) -> Record | Malformed:
    """The record of a stream entry's ``r`` field; :class:`Malformed` when it is missing or not one."""
    if payload is None:
        return Malformed("stream entry without field 'r'")
    try:
        row = json.loads(payload)
    except ValueError as e:
        return Malformed(f"payload is not JSON ({e})")
    return record_from_row(row)


class RedisBus:
    """Publish and consume records on one stream; one consumer group shared by the learner(s)."""

    def __init__(self, url: str, stream: str = "feedrank:records", group: str = "learner",
                 consumer: str = "learner-0", maxlen: int | None = None, track_acks: bool = True):
        """``track_acks=False``: this bus only reads; whoever learns acknowledges with :meth:`ack_ids`."""
        self.client = redis.Redis.from_url(url)
        self.track_acks = track_acks
        self.stream, self.group, self.consumer = stream, group, consumer
        self.maxlen = maxlen
        self._group_ready = False
        self._reading_pending = True  # start with our own PEL: delivered before a restart, not acked
        self._pending_from = "0"
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._outage = 0.0     # seconds to wait before the next read while Redis is unreachable
        self._trim_at = 0.0    # monotonic time of the next trim (:meth:`maybe_trim`)

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def publish(self, records) -> list[bytes]:
        """XADD every record in one pipeline; return the entry ids."""
        pipe = self.client.pipeline(transaction=False)
        for rec in records:
            pipe.xadd(self.stream, {"r": encode(rec)}, maxlen=self.maxlen, approximate=True)
        return pipe.execute()

    def consume(self, count: int = 1000, block_ms: int | None = 100) -> list[tuple[int, Record]]:
        """Up to ``count`` entries as ``(offset, record)``: our pending ones first, then new ones."""
        self.ensure_group()
        if self._reading_pending:
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: self._pending_from}, count=count)
            entries = resp[0][1] if resp else []
            if entries:
                self._pending_from = entries[-1][0]
            else:
                self._reading_pending = False
        if not self._reading_pending:
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                          block=block_ms)
            entries = resp[0][1] if resp else []
        out = []
        for entry_id, fields in entries:
            off = id_to_offset(entry_id)
            if self.track_acks:
                self._unacked.append((off, entry_id))
            out.append((off, decode(fields.get(b"r"))))
        return out

    def ack_through(self, offset: int) -> int:
        """Acknowledge every consumed entry with offset < ``offset`` (what a checkpoint no longer needs)."""
        n = 0
        while n < len(self._unacked) and self._unacked[n][0] < offset:
            n += 1
        self.ack_ids([self._unacked[i][1] for i in range(n)])
        for _ in range(n):  # only once Redis has them: a failed XACK leaves them to acknowledge later
            self._unacked.popleft()
        return n

    def ack_ids(self, ids) -> None:
        """``XACK`` entry ids (bytes or ``"ms-seq"``), pipelined in slices of 10,000."""
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(ids), 10_000):
            pipe.xack(self.stream, self.group, *ids[i:i + 10_000])
        pipe.execute()

    def trim_acknowledged(self) -> int:
        """Delete the entries every consumer group of the stream has acknowledged (XACK alone keeps them,
        so the stream would grow for ever): up to each group's oldest pending entry, or its last delivered
        one when nothing is pending. Approximate (whole radix-tree nodes), so cheap. Returns how many went."""
        keep_from = None
        for g in self.client.xinfo_groups(self.stream):
            name = g["name"]
            if g["pending"]:
                first = self.client.xpending(self.stream, name)["min"]
            else:
                first = g["last-delivered-id"]
            first = first.decode() if isinstance(first, bytes) else first
            key = tuple(int(x) for x in first.split("-"))
            if keep_from is None or key < keep_from:
                keep_from = key
        if keep_from is None or keep_from == (0, 0):
            return 0
        return int(self.client.xtrim(self.stream, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=True))

    def maybe_trim(self, every_s: float = TRIM_EVERY_S) -> None:
        """:meth:`trim_acknowledged` at most every ``every_s`` (after each acknowledgement, say); a failure
        is logged and tried again next time (nothing is lost: the entries just stay a while longer)."""
        if time.monotonic() < self._trim_at:
            return
        self._trim_at = time.monotonic() + every_s
        try:
            self.trim_acknowledged()
        except redis.RedisError as e:
            log.warning("could not trim the stream (%s)", e)

    def pending_count(self) -> int:
        self.ensure_group()
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def lag(self) -> int | None:
        """Entries not yet delivered to the group (Redis >= 7), or None."""
        for g in self.client.xinfo_groups(self.stream):
            if g["name"] in (self.group, self.group.encode()):
                return g.get("lag")
        return None

    def consume_or_wait(self, count: int = 1000, block_ms: int | None = 100) -> list[tuple[int, Record]] | None:
        """:meth:`consume`, riding out a Redis outage: on a lost connection or timeout it logs, waits
        (0.5 s, doubling to 10 s while the outage lasts) and returns None, which is not an idle stream
        (the caller must not close windows by the clock meanwhile: their events may be in Redis)."""
        try:
            out = self.consume(count, block_ms)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._outage = min(10.0, max(0.5, 2 * self._outage))
            log.warning("Redis %s: %s; retrying in %.1f s", self.stream, e, self._outage)
            time.sleep(self._outage)
            return None
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.error("Redis %s: the consumer group %r is gone (Redis restarted without its data?); "
                      "creating it again from the stream's start", self.stream, self.group)
            self._group_ready, self._reading_pending, self._pending_from = False, True, "0"
            return None
        if self._outage:
            log.warning("Redis %s: reachable again", self.stream)
            self._outage = 0
        return out

    def close(self) -> None:
        self.client.close()
