"""Join served records with engagement events into labelled examples, on event time.

Time is the records' own ``ts``: the watermark is ``max ts seen - allowed_lateness_ms`` and an
impression's window closes once the watermark passes ``served.ts + attribution_window_ms``. Wall clock is
never read, so replaying the same log gives the same examples.

Life of an impression (keyed by ``(request_id, post_id)``):

- it is open from its served record; it becomes *viewed* on a ``view`` event (or at once when
  ``returned_is_viewed``); positives that arrive before the view are held;
- once viewed, each task's first positive is emitted at once (``tasks=(task,)``, ``final=False``);
- at window close a viewed impression emits one ``final=True`` example whose ``tasks`` are the tasks not
  yet emitted (possibly empty: the final row still carries every label, for export); an unviewed one
  expires without an example (``expired_unviewed``).

Memory is bounded: at most ``max_open`` open impressions. When full, the *oldest* open impression (by
arrival) is closed early — emitted with the labels it has if viewed — and counted as ``evicted``.
Events whose served record has not arrived yet wait (bounded the same way) until the watermark passes
``ts + attribution_window_ms``, then count as ``unmatched``. Event ids are remembered for duplicate
detection while they can still matter (one window behind the watermark).

Recovery: each example carries the log ``offset`` of the record that triggered it. After a restart,
call :meth:`Joiner.resume` with the checkpointed ``learned_through``, ``max_ts`` and ``stats`` (see
:meth:`Joiner.state`) and replay the log from ``oldest_open_offset``: examples triggered at or before
``learned_through`` are suppressed, and when the first newer record arrives the clock and counters are
restored and impressions the checkpoint had already closed are closed silently, so nothing is learned
twice. (Replay does not evict until then; surplus oldest impressions are closed silently at that point.)

>>> from online.records import ServedRecord, Engagement
>>> j = Joiner(("click",), attribution_window_ms=1000)
>>> s = ServedRecord("r", "p", "u", "a", 0, 0, "b", 0, "text", 0, "ios", "home", [], [])
>>> j.add_served(s, 0) + j.add_event(Engagement("e1", "r", "p", "view", 10), 1)
[]
>>> [(x.labels, x.tasks, x.final) for x in j.add_event(Engagement("e2", "r", "p", "click", 20), 2)]
[({'click': 1}, ('click',), False)]
>>> [(x.labels, x.tasks, x.final) for x in j.flush()]
[({'click': 1}, (), True)]
"""
from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from online.joined import JoinedExample, JoinerStats
from online.records import DEFAULT_DWELL_THRESHOLD_MS, Engagement, ServedRecord, engagement_task

Key = tuple[str, str]
__all__ = ["Joiner", "JoinedExample", "JoinerStats"]


@dataclass(slots=True)
class _Open:
    served: ServedRecord
    offset: int
    deadline: int
    viewed: bool
    labels: dict[str, int]
    emitted: set[str] = field(default_factory=set)
    first: int = -1   # the smallest log offset it holds: an event logged before its served record, else ``offset``


class Joiner:
    """Event-time joiner with an attribution window; see the module docstring."""

    def __init__(self, tasks: tuple[str, ...], attribution_window_ms: int, allowed_lateness_ms: int = 5_000,
                 max_open: int = 1_000_000, returned_is_viewed: bool = False,
                 dwell_threshold_ms: int = DEFAULT_DWELL_THRESHOLD_MS):
        self.tasks = tuple(tasks)
        self.attribution_window_ms = attribution_window_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self.max_open = max_open
        self.returned_is_viewed = returned_is_viewed
        self.dwell_threshold_ms = dwell_threshold_ms
        self.resume_through = -1
        self._resume_max_ts: int | None = None
        self._resume_stats: dict[str, int] | None = None
        self.stats = JoinerStats()
        self.max_ts: int | None = None
        self.through_offset = -1  # last log offset ingested
        self._open: OrderedDict[Key, _Open] = OrderedDict()
        self._deadlines: list[tuple[int, int, Key]] = []  # heap of (deadline, offset, key), lazy deletion
        self._orphans: OrderedDict[int, Engagement] = OrderedDict()  # offset -> event awaiting its served record
        self._orphans_by_key: dict[Key, list[int]] = {}
        # (first offset, offset, key) of open impressions holding an event logged before their served record
        # (the server logs served records in batches, events at once), lazy deletion: a replay must start
        # at that event, not at the served record.
        self._early: list[tuple[int, int, Key]] = []
        self._closed: OrderedDict[Key, int] = OrderedDict()  # recently closed key -> deadline
        self._seen: dict[str, int] = {}
        self._seen_order: deque[tuple[int, str]] = deque()

    @property
    def watermark(self) -> int | None:
        return None if self.max_ts is None else self.max_ts - self.allowed_lateness_ms

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def oldest_open_offset(self) -> int | None:
        """Smallest log offset a replay must start from to rebuild the buffer (None: nothing open)."""
        cands = [next(iter(self._orphans))] if self._orphans else []
        if self._open:
            cands.append(next(iter(self._open.values())).offset)
        early = self._early
        while early and ((imp := self._open.get(early[0][2])) is None or imp.offset != early[0][1]):
            heapq.heappop(early)     # closed since
        if early:
            cands.append(early[0][0])
        return min(cands, default=None)

    def resume(self, learned_through: int, max_ts: int | None, stats: dict[str, int] | None = None) -> None:
        """Prepare to rebuild from a checkpoint; then replay the log from its ``oldest_open_offset``."""
        self.resume_through = learned_through
        self._resume_max_ts = max_ts
        self._resume_stats = dict(stats) if stats else None

    def rebase(self, learned_through: int, keep_clock: bool) -> None:
        """Before the first record: resume through another offset than the checkpoint's (the log was
        replaced or lost records), keeping its counters; ``keep_clock`` keeps its event time too (the same
        stream), else the clock starts from the records read."""
        self.resume(learned_through, self._resume_max_ts if keep_clock else None, self._resume_stats)

    def state(self) -> dict:
        """What a checkpoint needs to record to resume this joiner (JSON-able)."""
        return {"through_offset": self.through_offset, "oldest_open_offset": self.oldest_open_offset,
                "max_ts": self.max_ts, "open": len(self._open), "stats": self.stats.as_dict()}

    # -- input -----------------------------------------------------------------------------------
    def add_served(self, rec: ServedRecord, offset: int) -> list[JoinedExample]:
        """Open an impression for a served record at log ``offset``."""
        out = self._begin(offset, rec.ts)
        self.stats.served += 1
        key = rec.key
        if key in self._open or key in self._closed:
            self.stats.duplicate_served += 1
            return self._end(out, offset)
        while len(self._open) >= self.max_open and offset > self.resume_through:
            self.stats.evicted += 1
            self._close(next(iter(self._open)), offset, out)
        imp = _Open(rec, offset, rec.ts + self.attribution_window_ms, self.returned_is_viewed,
                    dict.fromkeys(self.tasks, 0), first=offset)
        self._open[key] = imp
        heapq.heappush(self._deadlines, (imp.deadline, offset, key))
        early = self._orphans_by_key.pop(key, ())
        for o in early:
            self._apply(imp, self._orphans.pop(o), offset, out)
        if early:
            imp.first = min(early)
            heapq.heappush(self._early, (imp.first, offset, key))
        return self._end(out, offset)

    def add_event(self, ev: Engagement, offset: int) -> list[JoinedExample]:
        """Attribute an engagement event at log ``offset``."""
        out = self._begin(offset, ev.ts)
        self.stats.events += 1
        if ev.event_id in self._seen:
            self.stats.duplicates += 1
            return self._end(out, offset)
        self._seen[ev.event_id] = ev.ts
        self._seen_order.append((ev.ts, ev.event_id))
        imp = self._open.get(ev.key)
        if imp is not None:
            self._apply(imp, ev, offset, out)
        elif ev.key in self._closed or ev.ts + self.attribution_window_ms < self.watermark:
            self.stats.late += 1
        else:
            while len(self._orphans) >= self.max_open:
                self._drop_orphan(next(iter(self._orphans)))
            self._orphans[offset] = ev
            self._orphans_by_key.setdefault(ev.key, []).append(offset)
        return self._end(out, offset)

    def advance(self, watermark_ms: int) -> list[JoinedExample]:
        """Move event time so that the watermark is at least ``watermark_ms``; close what is due."""
        out: list[JoinedExample] = []
        # The source is quiet, so any replay after a restart is done: restore the checkpoint's clock and
        # counters first, and tag what closes now one past ``learned_through`` (as ``flush`` does), or
        # the impressions the checkpoint left open would be dropped as already learned.
        self._restore(out)
        self._bump(watermark_ms + self.allowed_lateness_ms)
        self._close_due(self._close_tag, out)
        return self._emit(out)

    def flush(self) -> list[JoinedExample]:
        """Close every open impression and expire every waiting event (end of stream).

        After :meth:`resume` with no newer record seen, the checkpoint's clock is restored first and
        what stays open was open at the checkpoint, so it is emitted (tagged one past
        ``learned_through``) rather than suppressed as already learned.
        """
        out: list[JoinedExample] = []
        self._restore(out)
        tag = self._close_tag
        while self._open:
            self._close(next(iter(self._open)), tag, out)
        for o in list(self._orphans):
            self._drop_orphan(o)
        return self._emit(out)

    # -- internals -------------------------------------------------------------------------------
    @property
    def _close_tag(self) -> int:
        """The offset to tag impressions closed with no record in hand (the clock, the end of the stream):
        the last ingested, or one past a checkpoint's ``learned_through`` while only its replay was seen,
        so they are emitted rather than suppressed as learned."""
        return max(self.through_offset, self.resume_through + 1 if self.resume_through >= 0 else -1)

    def _begin(self, offset: int, ts: int) -> list[JoinedExample]:
        out: list[JoinedExample] = []
        if offset > self.resume_through:
            self._restore(out)
        self._bump(ts)
        return out

    def _restore(self, out: list[JoinedExample]) -> None:
        """Once past a resume point: restore the checkpoint's clock and counters; what it had closed
        is closed again, silently."""
        if self._resume_max_ts is None and not self._resume_stats:
            return
        if self._resume_max_ts is not None:
            self._bump(self._resume_max_ts)
        self._close_due(self.resume_through, out)
        while len(self._open) > self.max_open:
            self._close(next(iter(self._open)), self.resume_through, out)
        out.clear()
        if self._resume_stats:
            self.stats = JoinerStats(**self._resume_stats)
        self._resume_max_ts = self._resume_stats = None

    def _bump(self, ts: int) -> None:
        self.max_ts = ts if self.max_ts is None else max(self.max_ts, ts)

    def _emit(self, out: list[JoinedExample]) -> list[JoinedExample]:
        kept = [x for x in out if x.offset > self.resume_through]
        self.stats.examples += len(kept)
        return kept

    def _end(self, out: list[JoinedExample], offset: int) -> list[JoinedExample]:
        self.through_offset = max(self.through_offset, offset)
        self._close_due(offset, out)
        return self._emit(out)

    def _apply(self, imp: _Open, ev: Engagement, offset: int, out: list[JoinedExample]) -> None:
        if ev.ts > imp.deadline:
            self.stats.late += 1
            return
        newly: list[str] = []
        if ev.kind == "view":
            self.stats.views += 1
            if not imp.viewed:
                imp.viewed = True
                newly = [t for t in self.tasks if imp.labels[t] and t not in imp.emitted]
        else:
            task = engagement_task(ev, self.dwell_threshold_ms)
            if task in imp.labels:
                imp.labels[task] = 1
                if imp.viewed and task not in imp.emitted:
                    newly = [task]
        if newly:
            imp.emitted.update(newly)
            self.stats.early_positives += len(newly)
            out.append(JoinedExample(imp.served, dict(imp.labels), tuple(newly), False, offset))

    def _close(self, key: Key, offset: int, out: list[JoinedExample]) -> None:
        imp = self._open.pop(key)
        self.stats.closed += 1
        self._closed[key] = imp.deadline
        if imp.viewed:
            rest = tuple(t for t in self.tasks if t not in imp.emitted)
            out.append(JoinedExample(imp.served, dict(imp.labels), rest, True, offset))
        else:
            self.stats.expired_unviewed += 1

    def _close_due(self, offset: int, out: list[JoinedExample]) -> None:
        wm = self.watermark
        if wm is None:
            return
        while self._deadlines and self._deadlines[0][0] < wm:
            _, off, key = heapq.heappop(self._deadlines)
            imp = self._open.get(key)
            if imp is not None and imp.offset == off:
                self._close(key, offset, out)
        while self._orphans:
            o, ev = next(iter(self._orphans.items()))
            if ev.ts + self.attribution_window_ms >= wm:
                break
            self._drop_orphan(o)
        horizon = wm - self.attribution_window_ms
        while self._seen_order and self._seen_order[0][0] < horizon:
            self._seen.pop(self._seen_order.popleft()[1], None)
        while self._closed and next(iter(self._closed.values())) < horizon:
            self._closed.popitem(last=False)

    def _drop_orphan(self, o: int) -> None:
        ev = self._orphans.pop(o)
        offs = self._orphans_by_key[ev.key]
        offs.remove(o)
        if not offs:
            del self._orphans_by_key[ev.key]
        self.stats.unmatched += 1
