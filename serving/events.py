"""LogEvents: validate each event, answer per event, acknowledge only what is durably appended."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from online.records import Engagement, validate_event
from stacker.dataset import implausible_ms, not_a_time

from .errors import NotReady
from .sink import SharedEventLog

ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"


@dataclass(frozen=True)
class EventResult:
    event_id: str
    status: str
    reason: str = ""
    log_offset: int = -1


class EventIngest:
    """Per-event results for a batch; the last ``dedup_window`` event ids accepted are duplicates
    (across restarts too: they are read back from the log).

    An event more than ``max_future_ms`` ahead of the server's clock is rejected: the learner runs on
    event time, and one record from the future would move its clock forward and close every open
    impression's attribution window early."""

    def __init__(self, log: SharedEventLog, dedup_window: int = 1_000_000, max_string_len: int = 256,
                 max_future_ms: int = 5_000, clock: Callable[[], float] = time.time,
                 returned: Callable[[str], list[str] | None] = lambda request_id: None):
        self.log = log
        self.returned = returned
        self.window = dedup_window
        self.max_string_len = max_string_len
        self.max_future_ms = max_future_ms
        self.clock = clock
        self._seen: OrderedDict[str, int] = OrderedDict()      # event id -> what it reported (a hash)
        self._lock = threading.Lock()
        for event_id, what in self.log.log.recent_events(self.window, keep=lambda ev: (ev.event_id, self._what(ev))):
            self._seen[event_id] = what

    @staticmethod
    def _what(ev: Engagement) -> int:
        """What an event reports, its time aside: a retry may stamp another time, or leave it to the server."""
        return hash((ev.request_id, ev.post_id, ev.kind, ev.dwell_ms))

    def _remember(self, ev: Engagement) -> None:
        self._seen[ev.event_id] = self._what(ev)
        if len(self._seen) > self.window:
            self._seen.popitem(last=False)

    def _warning(self, ev: Engagement) -> str:
        """What is wrong with an accepted event that this process can tell: a post its request did not
        return is logged, but never joins an impression."""
        posts = self.returned(ev.request_id)
        if posts is None or ev.post_id in posts:
            return ""
        return (f"accepted, but post {ev.post_id!r} is not among the {len(posts)} posts request "
                f"{ev.request_id!r} returned: it will not be learned")

    def log_events(self, events: list[dict]) -> list[EventResult]:
        results: list[EventResult | None] = [None] * len(events)
        accepted: list[tuple[int, Engagement]] = []
        now_ms = int(self.clock() * 1000)
        with self._lock:  # one batch at a time, so two concurrent copies of an event cannot both pass
            batch_ids: dict[str, int] = {}
            for i, d in enumerate(events):
                eid = d.get("event_id") or ""
                try:
                    too_long = [k for k, v in d.items() if isinstance(v, str) and len(v) > self.max_string_len]
                    if too_long:
                        raise ValueError(f"event.{too_long[0]}: longer than {self.max_string_len} characters")
                    ev = validate_event(d)
                    if ev.kind == "dwell" and ev.dwell_ms <= 0:
                        raise ValueError("event.dwell_ms: must be > 0 for kind 'dwell'")
                    if ev.ts == 0:                # left unset: the server's clock, as Rank's time_ms
                        ev = replace(ev, ts=now_ms)
                    elif implausible_ms(ev.ts):
                        raise ValueError(f"event.ts_ms: {not_a_time(ev.ts)} (0: the server's clock)")
                    if ev.ts > now_ms + self.max_future_ms:
                        raise ValueError(f"event.ts_ms: {ev.ts} is {(ev.ts - now_ms) / 1000:.1f} s ahead of the "
                                         f"server's clock (limit {self.max_future_ms / 1000:g} s)")
                except ValueError as e:
                    results[i] = EventResult(eid, REJECTED, str(e))
                    continue
                earlier = self._seen.get(ev.event_id, batch_ids.get(ev.event_id))
                if earlier is not None and earlier != self._what(ev):
                    results[i] = EventResult(eid, REJECTED, f"event.event_id: {eid!r} was already used for another "
                                                            f"event (another request, post, kind or dwell); give "
                                                            f"every event an id of its own")
                    continue
                if earlier is not None:
                    results[i] = EventResult(eid, DUPLICATE, "event id already accepted")
                    continue
                batch_ids[ev.event_id] = self._what(ev)
                accepted.append((i, ev))
            if accepted:
                try:
                    offsets = self.log.append([ev for _, ev in accepted])
                except Exception as e:  # nothing is acknowledged: the client retries the batch
                    kept = getattr(e, "records_kept", 0)
                    also = (f" (the first {kept} of them are in the log all the same: their retry logs them "
                            "again, and the learner learns each once)") if kept else ""
                    when = "once the server has been restarted" if getattr(e, "log_unusable", False) else "it"
                    raise NotReady(f"LogEvents: the event log could not take the batch ({type(e).__name__}: "
                                   f"{e}); no event of it was acknowledged{also}, retry {when}") from e
                for (i, ev), offset in zip(accepted, offsets):
                    self._remember(ev)
                    results[i] = EventResult(ev.event_id, ACCEPTED, self._warning(ev), offset)
        return results  # type: ignore[return-value]
