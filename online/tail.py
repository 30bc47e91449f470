"""Follow a live event log from another process, cheaply: remember the byte position, read only what is new.

:meth:`EventLog.read` in readonly mode rescans a segment from its start on every call; a learner polling
a busy log many times a second needs to resume where it stopped. A line without its newline yet (the
writer's append in progress), or failing its checksum as the very last line of the log, is left for
the next poll (the writer either completes it or truncates it on restart); a damaged line with
anything after it comes out :class:`~online.records.Malformed` in its place, as the writer keeps it.

Lines are decoded in blocks: every line's CRC is checked, then the payloads of the block are parsed by
one ``json.loads`` call (per-call overhead dominated decoding one line at a time); lines before the
requested offset are skipped without being decoded.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from online.eventlog import HEADER, CorruptLogError, Record, segment_bases, segment_path
from online.records import DAMAGED, Malformed, record_from_row

_CHUNK = 8 << 20
try:  # Rust JSON parser shipped with pydantic (a dependency): ~2x json.loads on these payloads
    from pydantic_core import from_json as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads
_crc32 = zlib.crc32


def decode_block(lines: list[bytes]) -> list[Record]:
    """Records of complete lines (without their newline); a line failing its checksum is a damaged
    record (a torn append never has its newline), and comes out :class:`Malformed` in its place."""
    payloads: list[bytes | None] = []   # None for a complete line that fails its checksum
    append = payloads.append
    for line in lines:
        p = line[9:]
        try:
            ok = len(line) >= 10 and line[8] == 32 and int(line[:8], 16) == _crc32(p)  # 32: b" "
        except ValueError:
            ok = False
        append(p if ok else None)
    if not payloads:
        return []
    try:
        if None in payloads:
            raise ValueError("damaged line")
        rows = _loads(b"[" + b",".join(payloads) + b"]")
    except ValueError:  # a damaged line, or a payload that passed its CRC but is not JSON: line by line
        rows = []
        for p in payloads:
            if p is None:
                rows.append(Malformed(DAMAGED))
                continue
            try:
                rows.append(_loads(p))
            except ValueError as e:
                rows.append(Malformed(f"payload is not JSON ({e})"))
    return [r if type(r) is Malformed else record_from_row(r) for r in rows]


class LogTailer:
    """``poll()`` yields ``(offset, record)`` appended since the previous poll, from ``from_offset`` on."""

    def __init__(self, path, from_offset: int = 0):
        self.path = Path(path)
        self.next_offset = from_offset
        self._base: int | None = None  # segment being read
        self._pos = 0                  # byte position in it
        self._off = 0                  # offset of the record at _pos

    def _segments(self) -> list[int]:
        return segment_bases(self.path)

    def poll(self, max_records: int = 100_000) -> Iterator[tuple[int, Record]]:
        yield from self.poll_batch(max_records)

    def poll_batch(self, max_records: int = 100_000) -> list[tuple[int, Record]]:
        """Up to ``max_records`` new ``(offset, record)`` pairs (empty when nothing complete is new)."""
        out: list[tuple[int, Record]] = []
        segs = self._segments()
        if not segs:
            return out
        if self._base is None:
            start = [b for b in segs if b <= self.next_offset]
            self._base = start[-1] if start else segs[0]
            self._pos, self._off = len(HEADER), self._base
        while len(out) < max_records:
            p = segment_path(self.path, self._base)
            try:
                with open(p, "rb") as f:
                    f.seek(self._pos)
                    data = f.read(_CHUNK)
            except FileNotFoundError:   # deleted by the log's retention under this reader: go on from what is left
                later = [b for b in self._segments() if b > self._base]
                if not later:
                    return out
                self._base, self._pos, self._off = later[0], len(HEADER), later[0]
                self.next_offset = max(self.next_offset, later[0])
                continue
            lines = data.split(b"\n")
            complete = lines[:-1]  # the last piece has no newline yet
            skip = min(max(self.next_offset - self._off, 0), len(complete))
            if skip:  # before the requested offset: advance without decoding
                self._pos += sum(map(len, complete[:skip])) + skip
                self._off += skip
            want = complete[skip:skip + max_records - len(out)]
            recs = decode_block(want) if want else []
            if (recs and len(want) == len(complete) - skip and not lines[-1] and len(data) < _CHUNK
                    and type(recs[-1]) is Malformed and recs[-1].reason == DAMAGED
                    and not [b for b in self._segments() if b > self._base]):
                recs.pop()  # the last line of the log: a torn tail the writer cuts on restart, not yet a record
            if recs:
                k = len(recs)
                self._pos += sum(map(len, want[:k])) + k
                out.extend(zip(range(self._off, self._off + k), recs))
                self._off += k
                self.next_offset = self._off
            if len(recs) < len(want):
                return out  # torn or in progress: the writer completes or truncates it
            if len(out) >= max_records:
                return out
            consumed = skip + len(recs)
            if len(data) == _CHUNK and consumed:
                continue  # more of this segment beyond the read window
            later = [b for b in self._segments() if b > self._base]
            try:
                whole = os.path.getsize(p) == self._pos
            except FileNotFoundError:      # deleted by the retention meanwhile: what it held has been read
                whole = True
            if consumed == len(complete) and not lines[-1] and later and whole:
                self._base, self._pos, self._off = later[0], len(HEADER), later[0]
                continue
            return out
        return out

    @property
    def end_offset(self) -> int:
        return self.next_offset

    def check_complete(self) -> None:
        """After polling a recorded log to its end: raise :class:`CorruptLogError` when reading stopped at
        a line without its newline in a segment that is not the last one (only the last may have a torn
        tail)."""
        segs = self._segments()
        if self._base is not None and segs and self._base < segs[-1]:
            raise CorruptLogError(f"{segment_path(self.path, self._base)}: record at offset {self._off} "
                                  "fails its checksum")
