"""What the joiner emits: labelled examples, and the counters of everything it saw."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from online.records import ServedRecord


@dataclass(slots=True)
class JoinedExample:
    """A labelled impression; learn ``tasks`` now (``labels`` holds every task)."""

    served: ServedRecord
    labels: dict[str, int]
    tasks: tuple[str, ...]
    final: bool
    offset: int = -1


@dataclass(slots=True)
class JoinerStats:
    """Counters; nothing the joiner drops goes uncounted."""

    served: int = 0
    duplicate_served: int = 0
    events: int = 0
    views: int = 0
    examples: int = 0
    early_positives: int = 0
    duplicates: int = 0
    late: int = 0
    unmatched: int = 0
    expired_unviewed: int = 0
    evicted: int = 0
    closed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
