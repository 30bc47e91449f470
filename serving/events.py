"""LogEvents: validate each event, answer per event, acknowledge only what is durably appended."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from online.records import Engagement, validate_event

from .sink import SharedEventLog

ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"


@dataclass(frozen=True)
class EventResult:
    event_id: str
    status: str
    reason: str = ""
    log_offset: int = -1


class EventIngest:
    """Per-event results for a batch; event ids accepted recently (bounded window) are duplicates."""

    def __init__(self, log: SharedEventLog, dedup_window: int = 1_000_000, max_string_len: int = 256):
        self.log = log
        self.window = dedup_window
        self.max_string_len = max_string_len
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._recover()

    def _recover(self) -> None:
        """Remember the event ids already in the log (its last ``window`` records)."""
        inner = self.log.log
        for _, rec in inner.read(max(0, inner.end_offset - self.window)):
            if isinstance(rec, Engagement):
                self._remember(rec.event_id)

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self.window:
            self._seen.popitem(last=False)

    def log_events(self, events: list[dict]) -> list[EventResult]:
        results: list[EventResult | None] = [None] * len(events)
        accepted: list[tuple[int, Engagement]] = []
        with self._lock:  # one batch at a time, so two concurrent copies of an event cannot both pass
            batch_ids: set[str] = set()
            for i, d in enumerate(events):
                eid = d.get("event_id") or ""
                try:
                    too_long = [k for k, v in d.items() if isinstance(v, str) and len(v) > self.max_string_len]
                    if too_long:
                        raise ValueError(f"event.{too_long[0]}: longer than {self.max_string_len} characters")
                    ev = validate_event(d)
                    if ev.kind == "dwell" and ev.dwell_ms <= 0:
                        raise ValueError("event.dwell_ms: must be > 0 for kind 'dwell'")
                except ValueError as e:
                    results[i] = EventResult(eid, REJECTED, str(e))
                    continue
                if ev.event_id in self._seen or ev.event_id in batch_ids:
                    results[i] = EventResult(eid, DUPLICATE, "event id already accepted")
                    continue
                batch_ids.add(ev.event_id)
                accepted.append((i, ev))
            if accepted:
                offsets = self.log.append([ev for _, ev in accepted])  # raises: nothing acknowledged
                for (i, ev), offset in zip(accepted, offsets):
                    self._remember(ev.event_id)
                    results[i] = EventResult(ev.event_id, ACCEPTED, log_offset=offset)
        return results  # type: ignore[return-value]
