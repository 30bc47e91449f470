"""What flows through the online learner: served records and engagement events.

Both are plain slotted dataclasses with a JSON-able dict form. Timestamps are int64 milliseconds
since the epoch, UTC.

>>> ev = validate_event({"event_id": "e1", "request_id": "r1", "post_id": "p1", "kind": "click", "ts": 5})
>>> ev.kind, engagement_task(ev)
('click', 'click')
>>> engagement_task(Engagement("e2", "r1", "p1", "dwell", 6, dwell_ms=12_000))
'dwell'
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

EVENT_KINDS = ("view", "click", "like", "comment", "share", "hide", "dwell")
#: Kinds whose mere arrival is a positive for the task of the same name.
POSITIVE_KINDS = frozenset(("click", "like", "comment", "share", "hide"))
DEFAULT_DWELL_THRESHOLD_MS = 10_000


@dataclass(slots=True)
class ServedRecord:
    """One returned post, with the raw inputs exactly as the server used them."""

    request_id: str
    post_id: str
    user_id: str
    author_id: str
    position: int
    ts: int
    bundle_id: str
    update_seq: int
    media_type: str
    created_at: int
    device: str
    surface: str
    user_features: list[float] = field(default_factory=list)
    post_features: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.request_id, self.post_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServedRecord":
        return cls(**{f: d[f] for f in SERVED_FIELDS})


@dataclass(slots=True)
class Engagement:
    """One event reported by the backend about a served post (``view`` included)."""

    event_id: str
    request_id: str
    post_id: str
    kind: str
    ts: int
    dwell_ms: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.request_id, self.post_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Engagement":
        return validate_event(d)


SERVED_FIELDS = tuple(f.name for f in fields(ServedRecord))
EVENT_FIELDS = tuple(f.name for f in fields(Engagement))


def engagement_task(ev: Engagement, dwell_threshold_ms: int = DEFAULT_DWELL_THRESHOLD_MS) -> str | None:
    """The task an event is a positive for, or None (views, short dwells)."""
    if ev.kind in POSITIVE_KINDS:
        return ev.kind
    if ev.kind == "dwell" and ev.dwell_ms >= dwell_threshold_ms:
        return "dwell"
    return None


def _nonempty_str(d: dict[str, Any], name: str) -> str:
    v = d.get(name)
    if v is None:
        raise ValueError(f"event.{name}: missing")
    if not isinstance(v, str) or not v:
        raise ValueError(f"event.{name}: must be a non-empty string, got {v!r}")
    return v


def _int(d: dict[str, Any], name: str, default: int | None = None) -> int:
    v = d.get(name, default)
    if v is None:
        raise ValueError(f"event.{name}: missing")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"event.{name}: must be an integer, got {v!r}")
    if v < 0:
        raise ValueError(f"event.{name}: must be >= 0, got {v}")
    return v


def validate_event(ev: dict[str, Any] | Engagement) -> Engagement:
    """Check an event and return it as an :class:`Engagement`.

    Raises
    ------
    ValueError
        Naming the offending field, e.g. ``event.kind: unknown kind 'poke'``. Unknown dict keys are
        refused too, so a misspelt ``dwel_ms`` is never silently dropped.
    """
    d = asdict(ev) if isinstance(ev, Engagement) else ev
    if not isinstance(d, dict):
        raise ValueError(f"event: expected a mapping, got {type(d).__name__}")
    extra = sorted(set(d) - set(EVENT_FIELDS))
    if extra:
        raise ValueError(f"event.{extra[0]}: unknown field")
    event_id = _nonempty_str(d, "event_id")
    request_id = _nonempty_str(d, "request_id")
    post_id = _nonempty_str(d, "post_id")
    kind = d.get("kind")
    if kind is None:
        raise ValueError("event.kind: missing")
    if kind not in EVENT_KINDS:
        raise ValueError(f"event.kind: unknown kind {kind!r}; expected one of {', '.join(EVENT_KINDS)}")
    ts = _int(d, "ts")
    dwell_ms = _int(d, "dwell_ms", 0)
    if kind == "dwell" and "dwell_ms" not in d:
        raise ValueError("event.dwell_ms: missing (required for kind 'dwell')")
    return Engagement(event_id, request_id, post_id, kind, ts, dwell_ms)


MAX_TS = 1 << 62   # timestamps and offsets stay int64 throughout (numpy, VW text, checkpoints)


@dataclass(slots=True)
class Malformed:
    """What a log line or stream entry decoded to when it is not a well-formed record: readers yield it
    in the record's place (its offset is consumed), and the learner counts and skips it."""

    reason: str


def _served_fault(r: ServedRecord) -> str | None:
    for name in ("request_id", "post_id", "user_id", "author_id", "bundle_id", "media_type", "device", "surface"):
        if type(getattr(r, name)) is not str:
            return f"served.{name}: not a string"
    for name in ("position", "ts", "update_seq", "created_at"):
        v = getattr(r, name)
        if type(v) is not int or not -MAX_TS < v < MAX_TS:
            return f"served.{name}: not an int64 ({v!r})"
    if type(r.user_features) is not list or type(r.post_features) is not list:
        return "served features: not lists"
    return None


def _event_fault(e: Engagement) -> str | None:
    for name in ("event_id", "request_id", "post_id"):
        if type(getattr(e, name)) is not str:
            return f"event.{name}: not a string"
    if e.kind not in EVENT_KINDS:
        return f"event.kind: unknown kind {e.kind!r}"
    for name in ("ts", "dwell_ms"):
        v = getattr(e, name)
        if type(v) is not int or not -MAX_TS < v < MAX_TS:
            return f"event.{name}: not an int64 ({v!r})"
    return None


DAMAGED = "damaged record (fails its checksum)"
_KINDS = frozenset(EVENT_KINDS)


def record_from_row(row) -> Engagement | ServedRecord | Malformed:
    """The record a decoded payload (``["E", fields...]`` or ``["S", fields...]``) holds, checked field by
    field; anything else is :class:`Malformed`, never an exception. (The learner decodes every record
    here: the checks are written out on the row, cheaper than on the record's attributes.)"""
    str_, int_, lo, hi = str, int, -MAX_TS, MAX_TS
    try:
        tag = row[0]
        if tag == "E":
            if (len(row) == 7 and type(row[1]) is str_ and type(row[2]) is str_ and type(row[3]) is str_
                    and row[4] in _KINDS and type(row[5]) is int_ and lo < row[5] < hi
                    and type(row[6]) is int_ and lo < row[6] < hi):
                return Engagement(row[1], row[2], row[3], row[4], row[5], row[6])
            rec = Engagement(*row[1:])
            fault = _event_fault(rec)
            return rec if fault is None else Malformed(fault)
        if tag == "S":
            if (len(row) == 15 and type(row[1]) is str_ and type(row[2]) is str_ and type(row[3]) is str_
                    and type(row[4]) is str_ and type(row[5]) is int_ and type(row[6]) is int_
                    and type(row[7]) is str_ and type(row[8]) is int_ and type(row[9]) is str_
                    and type(row[10]) is int_ and type(row[11]) is str_ and type(row[12]) is str_
                    and type(row[13]) is list and type(row[14]) is list and lo < row[5] < hi
                    and lo < row[6] < hi and lo < row[8] < hi and lo < row[10] < hi):
                return ServedRecord(*row[1:])
            rec = ServedRecord(*row[1:])
            fault = _served_fault(rec)
            return rec if fault is None else Malformed(fault)
        if tag == "X":
            return Malformed(DAMAGED)
        return Malformed(f"unknown record tag {tag!r}")
    except (TypeError, IndexError, KeyError) as e:
        return Malformed(f"not a record ({e})")
