"""A durable, append-only log of served records and engagement events on local files.

Layout: ``<dir>/seg-<first offset:020d>.log``. Each segment starts with the header line
``feedrank-eventlog 1``; every following line is one record::

    <crc32 of payload, 8 hex digits> <payload: compact JSON list>\\n

where the payload is ``["S", <ServedRecord fields in order>]`` or ``["E", <Engagement fields>]``.
Offsets are global and dense: the n-th record of the segment starting at ``b`` has offset ``b + n``.
A log directory also holds ``log-id``, a random id written when the log is created, and ``opens``, a
line ``<time ms> <offset>`` for every time a writer opened it (the offset its next record took), so a
learner's checkpoint can tell the log it counted offsets in from another one later put at the same
path, or from the same log restored from an older copy (reopened after the checkpoint at an offset
the checkpoint had already learned).
A batch is written with one ``write`` and one ``fsync``, so once :meth:`EventLog.append` returns the
records survive ``kill -9`` and power loss. A torn tail (a partial line, or a last line failing its
checksum, at the end of the last segment) is truncated on open and never mis-read. A damaged line
with anything after it is not a torn tail: it keeps its offset, the writer rewrites it in place as a
tombstone of the same length, and readers yield :class:`~online.records.Malformed` in its place.

>>> import tempfile
>>> from online.records import Engagement
>>> log = EventLog(tempfile.mkdtemp(), fsync=False)
>>> log.append([Engagement("e1", "r1", "p1", "view", 10)])
[0]
>>> [(o, r.kind) for o, r in log.read()]
[(0, 'view')]
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydantic_core

from online.records import DAMAGED, SERVED_FIELDS, Engagement, Malformed, ServedRecord, record_from_row

FORMAT_VERSION = 1
HEADER = f"feedrank-eventlog {FORMAT_VERSION}\n".encode()
LOG_ID_FILE, OPENS_FILE = "log-id", "opens"
Record = ServedRecord | Engagement  # readers may yield Malformed in a record's place
log = logging.getLogger(__name__)
# pydantic_core's encoder writes the same compact JSON as json.dumps(separators=(",", ":")) ~6x faster
# (the server encodes every served record while holding the GIL).
_to_json = pydantic_core.to_json
_loads = json.loads


class CorruptLogError(RuntimeError):
    """A record that is not at the torn tail fails its checksum."""


def encode(rec: Record) -> bytes:
    if isinstance(rec, Engagement):
        row = ["E", rec.event_id, rec.request_id, rec.post_id, rec.kind, rec.ts, rec.dwell_ms]
    else:
        row = ["S", *(getattr(rec, f) for f in SERVED_FIELDS)]
    payload = _to_json(row)
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> Record | Malformed | None:
    """The record in one line; None when the line is torn or fails its checksum; :class:`Malformed`
    when it passes its checksum but holds no well-formed record (a tombstone among them)."""
    if len(line) < 11 or line[-1:] != b"\n" or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
    except ValueError:
        return None
    try:
        row = _loads(payload)
    except ValueError as e:
        return Malformed(f"payload is not JSON ({e})")
    return record_from_row(row)


def segment_records(lines, base: int, from_offset: int = 0, end: int | None = None):
    """``(offset, record)`` of a segment's record lines (the lines after its header; the first at offset
    ``base``) from ``from_offset`` up to ``end``. A line failing its checksum comes out
    ``Malformed(DAMAGED)`` once another line follows it: only the last line can be a torn tail. A last
    line failing its checksum comes out as ``(offset, None)``, for the caller to judge: a torn tail at
    the end of the log, damage in an older segment."""
    bad = None
    for off, line in enumerate(lines, start=base):
        if bad is not None:  # something follows it: a damaged record, not a torn tail
            yield bad, Malformed(DAMAGED)
            bad = None
        if end is not None and off >= end:
            return
        if off < from_offset:
            continue
        rec = decode(line)
        if rec is None:
            bad = off
        else:
            yield off, rec
    if bad is not None:
        yield bad, None


def _tombstone(length: int) -> bytes:
    """A valid line of exactly ``length`` bytes (newline excluded) standing for a damaged record: it
    decodes to :class:`Malformed` ("damaged record"). Lines too short for one are left as they are."""
    pad = length - 9 - len(b'["X",""]')
    if pad < 0:
        return b"#" * length
    payload = b'["X","' + b"-" * pad + b'"]'
    return b"%08x %s" % (zlib.crc32(payload), payload)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_identity(path) -> str | None:
    """The id the log directory ``path`` was created with; None for a single segment file, a directory
    not created yet, or a log written before logs had ids (its writer adds one when it next opens it)."""
    try:
        text = (Path(path) / LOG_ID_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None


def segment_bases(path) -> list[int]:
    """The first offsets of the segments in the log directory ``path``, in order."""
    return sorted(int(p.name[4:-4]) for p in Path(path).glob("seg-*.log"))


def segment_path(path, base: int) -> Path:
    """The file of the segment whose first offset is ``base`` in the log directory ``path``."""
    return Path(path) / f"seg-{base:020d}.log"


def segment_end(p: Path, base: int) -> int:
    """The offset after the last complete record of the segment file ``p`` whose first record is ``base``."""
    with open(p, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 22), b""))
    return base + max(lines - 1, 0)


def log_end(path) -> int:
    """The offset the log directory ``path`` will give its next record: the last segment's first offset
    plus its complete lines (0 for a directory without segments). Reads only the last segment."""
    bases = segment_bases(path)
    return segment_end(segment_path(path, bases[-1]), bases[-1]) if bases else 0


def check_log_path(path, flag: str = "") -> Path:
    """``path`` as a recorded event log (a directory of segments, or one segment file), or a ValueError
    saying what it is instead (missing, a bundle, a table, an empty directory)."""
    path, name = Path(path), f"{flag} {path}".strip()
    if not path.exists():
        raise ValueError(f"{name}: no such event log")
    if path.is_dir():
        if segment_bases(path):
            return path
        if (path / "manifest.json").is_file():
            raise ValueError(f"{name}: is a bundle, not an event log (give the log's directory, the server's "
                             "--eventlog-dir, and the bundle with --bundle)")
        raise ValueError(f"{name}: not an event log (no seg-*.log segments in it)")
    with open(path, "rb") as f:
        if f.read(len(HEADER)) != HEADER:
            raise ValueError(f"{name}: not an event-log segment (it does not start with {HEADER!r}); give the "
                             "log's directory")
    return path


def log_start(path) -> int:
    """The first offset the log directory ``path`` still holds (its retention deletes old segments)."""
    bases = segment_bases(path)
    return bases[0] if bases else 0


def log_opens(path) -> list[tuple[int, int]]:
    """``(time ms, offset)`` of every writable open of the log directory ``path``, oldest first."""
    try:
        text = (Path(path) / OPENS_FILE).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for line in text.split("\n")[:-1]:          # a last line without its newline is torn: skipped
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out.append((int(parts[0]), int(parts[1])))
    return out


WRITER_LOCK = ".writer.lock"


class LogInUseError(RuntimeError):
    """Another writer holds the log: two writers would give the same offsets to different records."""


def _lock_writer(path: Path) -> int:
    """Take the log's writer lock; raise :class:`LogInUseError` naming the process holding it."""
    from online.locks import hold_lock
    fd, holder = hold_lock(path / WRITER_LOCK)
    if fd < 0:
        raise LogInUseError(f"{path}: the event log is written by another process (pid {holder}); give each "
                            "server its own --eventlog-dir (two writers would give the same offsets to different "
                            "records)")
    return fd


def _ensure_identity(path: Path, fsync: bool) -> str:
    found = log_identity(path)
    if found is not None:
        return found
    new = uuid.uuid4().hex
    tmp = path / f".{LOG_ID_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(new + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path / LOG_ID_FILE)
    if fsync:
        _fsync_dir(path)
    return new


class EventLog:
    """Append-only event log; see the module docstring for the format.

    Parameters
    ----------
    path : directory holding the segments (created if missing).
    fsync : fsync every batch (turn off only in tests and benchmarks of the encoding).
    segment_bytes : start a new segment once the current one is at least this large.
    readonly : a reader beside a live writer (another process): never truncates, and :meth:`read`
        follows new segments and stops quietly at a line still being written.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True, segment_bytes: int = 64 << 20,
                 readonly: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.readonly = readonly
        self._lock_fd = self._fd = -1
        self._cut_to: int | None = None      # where to cut a record a failed append wrote in part
        self._unusable = ""                  # why appends stop until the log is reopened
        if readonly:
            self.log_id = log_identity(self.path)
            self._segments = self._scan()
            self.end_offset = 0
            for self.end_offset, _ in self.read():
                self.end_offset += 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_writer(self.path)
        try:
            self.log_id = _ensure_identity(self.path, fsync)
            self._segments = self._scan()
            if not self._segments:
                self._new_segment(0)
            self.end_offset = self._recover_tail()
            self._fd = os.open(self._seg_path(self._segments[-1]), os.O_WRONLY | os.O_APPEND)
            self._record_open()
        except BaseException:
            self.close()
            raise

    def _record_open(self) -> None:
        fd = os.open(self.path / OPENS_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"   # a crash mid-line: end it first
            # (" torn" makes the broken line three words, which log_opens never reads as an open)
            os.write(fd, b"%s%d %d\n" % (b" torn\n" if torn else b"", time.time_ns() // 1_000_000, self.end_offset))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _scan(self) -> list[int]:
        return segment_bases(self.path)

    def _seg_path(self, base: int) -> Path:
        return segment_path(self.path, base)

    def _new_segment(self, base: int) -> None:
        p = self._seg_path(base)
        with open(p, "wb") as f:
            f.write(HEADER)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        if self.fsync:
            _fsync_dir(self.path)
        self._segments.append(base)

    def _recover_tail(self) -> int:
        """Truncate a torn tail of the last segment; return the next offset."""
        base = self._segments[-1]
        p = self._seg_path(base)
        data = p.read_bytes()
        if not data.startswith(HEADER):
            if len(data) <= len(HEADER) and HEADER.startswith(data):  # crashed while rolling
                p.write_bytes(HEADER)
                return base
            raise CorruptLogError(f"{p}: bad header (expected format version {FORMAT_VERSION})")
        good, n = len(HEADER), 0
        lines = data[len(HEADER):].split(b"\n")   # as every reader splits: on newlines only
        tail = lines.pop()                         # after the last newline: a partial append, or b""
        tombstones = []
        for i, line in enumerate(lines):
            if decode(line + b"\n") is None:
                if i == len(lines) - 1 and not tail:
                    break  # the torn tail of an interrupted append: the last line, nothing after it
                # Something follows it: a damaged record, not a torn tail. Cutting here would delete
                # every acknowledged record after it; it keeps its offset, rewritten in place as an
                # explicit tombstone so that every reader, now and after any reopen, skips it alike.
                tombstones.append((good, len(line)))
                log.error("%s: the record at offset %d fails its checksum; kept in place as a tombstone "
                          "(readers skip it), %d records after it kept", p, base + n, len(lines) - 1 - i)
            good += len(line) + 1
            n += 1
        if tombstones:
            with open(p, "r+b") as f:
                for at, length in tombstones:
                    f.seek(at)
                    f.write(_tombstone(length))
                os.fsync(f.fileno())
        if good < len(data):
            log.warning("%s: truncating torn tail of %d bytes after %d records", p, len(data) - good, n)
            with open(p, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return base + n

    def append(self, records: Sequence[Record]) -> list[int]:
        """Write, flush and fsync a batch; return the offset of each record. On failure (a full disk, an
        I/O error) nothing is acknowledged; the exception's ``records_kept`` says how many of the batch's
        first records are in the log all the same (see :meth:`_settle_failed_append`)."""
        if self.readonly:
            raise PermissionError(f"{self.path}: event log opened read-only")
        if not records:
            return []
        self.refuse_if_unusable()
        if self._cut_to is not None:
            self._cut_torn_append()           # before a new segment: an older one holds no torn record
        if os.fstat(self._fd).st_size >= self.segment_bytes:
            self._new_segment(self.end_offset)      # (the current segment stays open until it is made)
            fd = os.open(self._seg_path(self.end_offset), os.O_WRONLY | os.O_APPEND)
            os.close(self._fd)
            self._fd = fd
        buf = b"".join([encode(r) for r in records])
        before = os.fstat(self._fd).st_size
        try:
            view = memoryview(buf)
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException as e:
            e.records_kept = self._settle_failed_append(before, buf)
            raise
        if self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as e:
                # Written but maybe not durable, and a later fsync may succeed without these pages reaching
                # the disk: after a crash the offsets of what followed could move. Every record stays where
                # readers see it, and appends stop until a reopen checks the tail.
                self.end_offset += len(records)
                self._stop_appends(f"fsync failed ({e.strerror or e})")
                err = OSError(e.errno, f"{self.path}: fsync failed ({e.strerror or e}) after writing {len(records)} "
                              "records; nothing is appended until the log is reopened (restart the server)")
                err.records_kept, err.log_unusable = len(records), True
                raise err from e
        start = self.end_offset
        self.end_offset += len(records)
        return list(range(start, self.end_offset))

    def refuse_if_unusable(self) -> None:
        """Raise, taking nothing, if appends have stopped until the log is reopened (:meth:`_stop_appends`)."""
        if self._unusable:
            e = OSError(errno.EIO, f"{self.path}: {self._unusable}; nothing is appended until the log is "
                        "reopened (restart the server)")
            e.records_kept, e.log_unusable = 0, True
            raise e

    def _stop_appends(self, why: str) -> None:
        self._unusable = why
        log.error("%s: %s; no more appends until the log is reopened", self.path, why)

    def _settle_failed_append(self, before: int, buf: bytes) -> int:
        """After a write that failed part-way (disk full, I/O error): the records it wrote whole stay in the
        log at the next offsets (unacknowledged, so their sender retries them, and readers drop the repeated
        event ids), and a record it wrote in part is cut off, so that the next append starts on a line of
        its own; returns how many stay. If the cut fails, every append first retries it, and refuses until
        it succeeds; if the file's size cannot be read, appends stop until the log is reopened."""
        try:
            written = max(0, os.fstat(self._fd).st_size - before)
        except OSError as e:
            self._stop_appends(f"a failed append left the segment's end unknown ({e.strerror or e})")
            return 0
        whole = buf.rfind(b"\n", 0, min(written, len(buf))) + 1
        kept = buf.count(b"\n", 0, whole)
        self.end_offset += kept
        if written > whole:
            self._cut_to = before + whole
            try:
                self._cut_torn_append()
            except OSError:
                log.exception("%s: cannot cut the record an append wrote in part; appends refuse until it is cut",
                              self.path)
        return kept

    def _cut_torn_append(self) -> None:
        """Truncate the segment to ``_cut_to`` (after a failed append), then forget it."""
        try:
            os.ftruncate(self._fd, self._cut_to)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            raise OSError(e.errno, f"{self.path}: an earlier append wrote a record in part and it cannot be cut "
                          f"yet ({e.strerror}); nothing is appended until it is") from e
        log.warning("%s: cut a record an append wrote in part (offset %d)", self.path, self.end_offset)
        self._cut_to = None

    def prune(self, max_age_s: float, keep_from: int | None = None, now: float | None = None) -> list[int]:
        """Delete whole segments last written more than ``max_age_s`` ago, oldest first, never the one being
        written nor one holding offset ``keep_from`` or later (what a learner still has to read); returns
        the first offsets of those deleted. Offsets do not move: readers start at the oldest segment left."""
        if self.readonly:
            raise PermissionError(f"{self.path}: event log opened read-only")
        if self._fd < 0:
            return []                    # closed: another writer may own the directory by now
        now = time.time() if now is None else now
        gone = []
        for base, nxt in zip(self._segments[:-1], self._segments[1:]):
            if keep_from is not None and nxt > keep_from:
                break
            p = self._seg_path(base)
            try:
                if now - p.stat().st_mtime <= max_age_s:
                    break         # segments are written in order: the rest are younger
                p.unlink()
            except FileNotFoundError:
                pass
            gone.append(base)
        if gone:
            self._segments = self._segments[len(gone):]
            if self.fsync:
                _fsync_dir(self.path)
            log.info("%s: deleted %d segments older than %.0f h (offsets %d to %d)", self.path, len(gone),
                     max_age_s / 3600, gone[0], self._segments[0] - 1)
        return gone

    def read(self, from_offset: int = 0) -> Iterator[tuple[int, Record]]:
        """Yield ``(offset, record)`` from ``from_offset`` up to the end as of this call."""
        if self.readonly:
            self._segments = self._scan()
        end = None if self.readonly else self.end_offset
        segs = self._segments + [None]
        for base, nxt in zip(segs, segs[1:]):
            if (nxt is not None and nxt <= from_offset) or (end is not None and base >= end):
                continue
            p = self._seg_path(base)
            with open(p, "rb") as f:
                f.readline()
                for off, rec in segment_records(f, base, from_offset, end):
                    if rec is None:  # the segment's last line fails its checksum
                        if nxt is None and self.readonly:
                            self.end_offset = off
                            return  # the writer's append in progress (or a torn tail it will cut)
                        if nxt is None:
                            raise CorruptLogError(f"{p}: record at offset {off} fails its checksum")
                        rec = Malformed(DAMAGED)  # an older segment has no torn tail
                    yield off, rec
                    if self.readonly:
                        self.end_offset = max(self.end_offset, off + 1)

    def recent_events(self, n: int, max_records: int | None = None, keep=lambda ev: ev) -> list:
        """``keep(event)`` of the last ``n`` engagement events (oldest first; ``keep`` lets a caller hold only
        what it needs of each), read newest segment first and
        decoding only event lines, however many served records lie between them, up to ``max_records``
        records read back (default ``8 n``: a log of served records with few events is not read whole)."""
        found: list[list] = []
        count = scanned = 0
        max_records = 8 * n if max_records is None else max_records
        end = None if self.readonly else self.end_offset
        for base in reversed(self._scan() if self.readonly else self._segments):
            if count >= n or scanned >= max_records:
                break
            ids = []
            with open(self._seg_path(base), "rb") as f:
                f.readline()
                for off, line in enumerate(f, start=base):
                    if end is not None and off >= end:
                        break
                    scanned += 1
                    if line[9:14] == b'["E",':
                        rec = decode(line)
                        if type(rec) is Engagement:
                            ids.append(keep(rec))
            found.append(ids[-(n - count):] if n > count else [])
            count += len(found[-1])
        return [e for ids in reversed(found) for e in ids]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)   # releases the writer's lock
            self._lock_fd = -1

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
