"""Event log: round trip, torn-tail truncation, segment roll, validation of events."""
from __future__ import annotations

import os

import pytest

from online.eventlog import HEADER, EventLog
from online.records import Engagement, ServedRecord, validate_event


def served(i: int) -> ServedRecord:
    return ServedRecord(f"r{i}", f"p{i}", "u1", "a1", i % 10, 1_000 + i, "bundle-1", 7, "photo", 500,
                        "ios", "home", [0.5, -1.25], [1e-3, 2.0, 3.5])


def event(i: int, kind: str = "click") -> Engagement:
    return Engagement(f"e{i}", f"r{i}", f"p{i}", kind, 2_000 + i, 12_000 if kind == "dwell" else 0)


def segment_files(path) -> list:
    return sorted(p for p in os.listdir(path) if p.startswith("seg-"))


def test_round_trip_keeps_types_and_offsets(tmp_path):
    log = EventLog(tmp_path)
    recs = [served(0), event(0), event(1, "dwell"), served(1)]
    assert log.append(recs) == [0, 1, 2, 3]
    assert log.append([event(2)]) == [4]
    got = list(log.read())
    assert [o for o, _ in got] == [0, 1, 2, 3, 4]
    assert [r for _, r in got] == recs + [event(2)]
    assert [o for o, _ in log.read(from_offset=3)] == [3, 4]
    log.close()
    reopened = EventLog(tmp_path)
    assert reopened.end_offset == 5
    assert reopened.append([event(9)]) == [5]


@pytest.mark.parametrize("tail", [b"0badc0de [\"E\",\"e9\"", b"\x00\x00garbage", b"deadbeef [\"E\"]\n"])
def test_torn_tail_is_truncated_and_offsets_continue(tmp_path, tail):
    log = EventLog(tmp_path)
    log.append([served(i) for i in range(3)])
    log.close()
    seg = tmp_path / segment_files(tmp_path)[-1]
    good_size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)
    log = EventLog(tmp_path)
    assert seg.stat().st_size == good_size
    assert log.end_offset == 3
    assert log.append([event(3)]) == [3]
    assert [o for o, _ in log.read()] == [0, 1, 2, 3]


def test_partial_line_from_a_killed_append_is_dropped(tmp_path):
    log = EventLog(tmp_path)
    log.append([event(0), event(1)])
    log.close()
    seg = tmp_path / segment_files(tmp_path)[-1]
    data = seg.read_bytes()
    seg.write_bytes(data[:-5])  # the last record lost its end
    log = EventLog(tmp_path)
    assert [r.event_id for _, r in log.read()] == ["e0"]


def test_segments_roll_at_size_limit_and_read_across(tmp_path):
    log = EventLog(tmp_path, segment_bytes=2_000)
    for b in range(10):
        log.append([served(b * 10 + i) for i in range(10)])
    assert len(segment_files(tmp_path)) > 3
    assert [o for o, _ in log.read()] == list(range(100))
    assert [r.request_id for _, r in log.read(from_offset=57)] == [f"r{i}" for i in range(57, 100)]
    log.close()
    assert EventLog(tmp_path, segment_bytes=2_000).end_offset == 100


def test_recent_events_skip_served_records_across_segments(tmp_path):
    log = EventLog(tmp_path, segment_bytes=2_000, fsync=False)
    for b in range(6):
        log.append([event(b * 2), *(served(b * 100 + i) for i in range(10)), event(b * 2 + 1)])
    assert len(segment_files(tmp_path)) == 3                    # four events in each
    assert [e.event_id for e in log.recent_events(3)] == ["e9", "e10", "e11"]
    assert [e.event_id for e in log.recent_events(6)] == [f"e{i}" for i in range(6, 12)]
    assert [e.event_id for e in log.recent_events(100)] == [f"e{i}" for i in range(12)]
    assert [e.event_id for e in log.recent_events(0)] == []
    log.close()
    reader = EventLog(tmp_path, readonly=True)
    assert [e.event_id for e in reader.recent_events(5)] == [f"e{i}" for i in range(7, 12)]


def test_a_damaged_record_is_read_as_malformed_in_its_place_and_nothing_after_it_is_lost(tmp_path):
    from online.records import DAMAGED, Malformed
    from online.replay import read_records
    log = EventLog(tmp_path, segment_bytes=500)
    for i in range(6):
        log.append([served(i)])
    log.append([event(i) for i in range(6, 12)])
    log.close()
    segs = [tmp_path / s for s in segment_files(tmp_path)]
    for seg, at in ((segs[0], len(HEADER) + 12), (segs[-1], len(HEADER) + 12)):  # an old segment; the last
        data = bytearray(seg.read_bytes())
        data[at] ^= 1
        seg.write_bytes(bytes(data))
    damaged = [0, int(segs[-1].name[4:-4])]
    for reader in (EventLog(tmp_path, readonly=True).read, lambda: read_records(tmp_path)):
        got = list(reader())
        assert [o for o, _ in got] == list(range(12))
        assert [o for o, r in got if type(r) is Malformed] == damaged
        assert all(r.reason == DAMAGED for o, r in got if o in damaged)
    writer = EventLog(tmp_path, segment_bytes=500)   # reopening keeps every record after the damaged one
    assert writer.end_offset == 12 and writer.append([event(12)]) == [12]
    assert [o for o, _ in writer.read()] == list(range(13))
    assert [e.event_id for e in writer.recent_events(100)][-1] == "e12"


def test_a_damaged_last_line_of_the_last_segment_is_a_torn_tail_the_writer_cuts(tmp_path):
    log = EventLog(tmp_path)
    log.append([event(0), event(1)])
    log.close()
    seg = tmp_path / segment_files(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[-5] ^= 1
    seg.write_bytes(bytes(data))
    assert [o for o, _ in EventLog(tmp_path, readonly=True).read()] == [0]   # maybe still being written
    writer = EventLog(tmp_path)
    assert writer.end_offset == 1 and writer.append([event(2)]) == [1]
    assert [r.event_id for _, r in writer.read()] == ["e0", "e2"]


@pytest.mark.parametrize("patch, field", [
    ({"event_id": None}, "event.event_id: missing"),
    ({"kind": "poke"}, "event.kind: unknown kind 'poke'"),
    ({"kind": "dwell", "dwell_ms": -5}, "event.dwell_ms: must be >= 0"),
    ({"ts": "soon"}, "event.ts: must be an integer"),
    ({"dwel_ms": 3}, "event.dwel_ms: unknown field"),
    ({"post_id": ""}, "event.post_id: must be a non-empty string"),
])
def test_validate_event_names_the_field(patch, field):
    d = {"event_id": "e1", "request_id": "r1", "post_id": "p1", "kind": "click", "ts": 1}
    d.update(patch)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        validate_event(d)


def test_validate_event_accepts_engagement_and_dict_form():
    ev = event(1, "dwell")
    assert validate_event(ev) == ev
    assert validate_event(ev.to_dict()) == ev
    assert ServedRecord.from_dict(served(3).to_dict()) == served(3)


CHILD = """
import sys
from online.eventlog import EventLog
from online.records import Engagement
log = EventLog(sys.argv[1], segment_bytes=20_000)
i = log.end_offset
while True:
    offs = log.append([Engagement(f"e{i + k}", "r", "p", "view", i + k) for k in range(50)])
    print(offs[-1], flush=True)
    i += 50
"""


def test_kill_9_loses_no_acknowledged_record(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, cwd=root,
                            text=True)
    acked = [int(proc.stdout.readline()) for _ in range(40)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = EventLog(tmp_path)
    assert log.end_offset > acked[-1]
    got = [(o, r.event_id) for o, r in log.read()]
    assert got == [(o, f"e{o}") for o in range(log.end_offset)]


def test_doctests():
    import doctest

    import online.eventlog
    import online.records

    for mod in (online.records, online.eventlog):
        assert doctest.testmod(mod).failed == 0


def test_readonly_reader_follows_a_live_writer_without_truncating(tmp_path):
    writer = EventLog(tmp_path, segment_bytes=300)
    writer.append([event(0), event(1)])
    seg = tmp_path / segment_files(tmp_path)[-1]
    with open(seg, "ab") as f:
        f.write(b"0000")  # the writer is mid-append
    reader = EventLog(tmp_path, readonly=True)
    assert reader.end_offset == 2 and seg.read_bytes().endswith(b"0000")
    with pytest.raises(PermissionError):
        reader.append([event(9)])
    with open(seg, "r+b") as f:  # the writer's append lands (fresh writer: cut the stub first)
        f.truncate(seg.stat().st_size - 4)
    for i in range(2, 8):
        writer.append([event(i)])
    assert len(segment_files(tmp_path)) > 1
    assert [o for o, _ in reader.read(from_offset=1)] == list(range(1, 8))
    assert reader.end_offset == 8


def _damage(seg, at: int, byte: int | None = None) -> None:
    data = bytearray(seg.read_bytes())
    data[at] = data[at] ^ 1 if byte is None else byte
    seg.write_bytes(bytes(data))


def test_a_follower_waits_at_a_damaged_last_line_and_keeps_offsets_when_the_writer_cuts_it(tmp_path):
    from online.tail import LogTailer
    log = EventLog(tmp_path, fsync=False)
    log.append([event(0), event(1), event(2)])
    log.close()
    seg = tmp_path / segment_files(tmp_path)[-1]
    _damage(seg, seg.stat().st_size - 5)                 # the last line: a torn tail, maybe still written
    tailer = LogTailer(tmp_path)
    assert [(o, r.event_id) for o, r in tailer.poll_batch()] == [(0, "e0"), (1, "e1")]
    writer = EventLog(tmp_path, fsync=False)             # the writer restarts: cuts it, offset 2 reused
    assert writer.append([event(10), event(11)]) == [2, 3]
    assert [(o, r.event_id) for o, r in tailer.poll_batch()] == [(2, "e10"), (3, "e11")]


def test_a_damaged_record_stays_a_tombstone_across_reopens_even_with_a_carriage_return_in_it(tmp_path):
    from online.records import DAMAGED, Malformed
    from online.replay import read_records
    log = EventLog(tmp_path, fsync=False)
    log.append([event(i) for i in range(5)])
    log.close()
    seg = tmp_path / segment_files(tmp_path)[-1]
    _damage(seg, len(HEADER) + 20, byte=0x0D)            # a "\r" inside record 0
    with open(seg, "ab") as f:
        f.write(b"0badc0de [\"E\",\"e9\"")               # and a torn append after the last record
    for _ in range(2):                                   # reopening twice changes nothing more
        writer = EventLog(tmp_path, fsync=False)
        assert writer.end_offset == 5
        writer.close()
    writer = EventLog(tmp_path, fsync=False)
    assert writer.append([event(5)]) == [5]
    writer.close()
    for got in (list(EventLog(tmp_path, readonly=True).read()), list(read_records(tmp_path)),
                list(read_records(seg))):                # a directory, or the one segment file
        assert [o for o, _ in got] == list(range(6))
        assert type(got[0][1]) is Malformed and got[0][1].reason == DAMAGED
        assert [r.event_id for _, r in got[1:]] == ["e1", "e2", "e3", "e4", "e5"]


FULL_DISK = r"""
import json, os, resource, signal, sys
sys.path.insert(0, os.getcwd())
from online.eventlog import HEADER, EventLog
from tests.test_eventlog import event, served

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG instead
log = EventLog(sys.argv[1], segment_bytes=int(sys.argv[2]))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
acked, refused = {}, []
batches = [[event(10 * b + i) for i in range(int(sys.argv[3]))] + [served(b)] for b in range(12)]


def fill_up():                     # the disk fills up: 150 bytes left in the segment the next append writes
    segment = max(p for p in os.listdir(sys.argv[1]) if p.startswith("seg-"))
    size = os.path.getsize(os.path.join(sys.argv[1], segment))
    resource.setrlimit(resource.RLIMIT_FSIZE, ((len(HEADER) if size >= log.segment_bytes else size) + 150, hard))


for n, batch in enumerate(batches):
    if n in (4, 7):
        fill_up()
    for attempt in range(4):                          # as a client retries a batch the server refused
        try:
            offsets = log.append(batch)
        except OSError as e:
            refused.append(e.errno)
            acked.update({f"kept {len(acked)}": e.records_kept})   # how many of the batch stayed whole
            if attempt == 1:                          # refused twice; then space is freed
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            continue
        acked.update({str(o): getattr(r, "event_id", None) or r.request_id for o, r in zip(offsets, batch)})
        break
print(json.dumps({"acked": acked, "refused": refused, "end": log.end_offset}))
"""


@pytest.mark.parametrize("per_batch", [1, 10])
def test_a_full_disk_loses_no_acknowledged_record_and_shifts_no_offset(tmp_path, per_batch):
    """Appends that fail part-way (the file size limit stands in for a full disk: the same short write,
    then an error) leave whole records at the next offsets and cut a record written in part, so a retried
    batch, every later append and a reopen find each acknowledged record at its acknowledged offset."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for segment_bytes in (64 << 20, 600):             # and with segments rolling through the failures
        path = tmp_path / f"log{segment_bytes}"
        run = subprocess.run([sys.executable, "-c", FULL_DISK, str(path), str(segment_bytes), str(per_batch)],
                             cwd=root, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["refused"], "the limit should have refused an append"
        kept = {k: out["acked"].pop(k) for k in list(out["acked"]) if k.startswith("kept")}
        # every record in the log was acknowledged, or kept whole by a refused attempt and counted so
        assert any(kept.values()) and out["end"] == len(out["acked"]) + sum(kept.values())
        log = EventLog(path)
        assert log.end_offset == out["end"]
        got = {str(o): getattr(r, "event_id", None) or getattr(r, "request_id", None) for o, r in log.read()}
        assert all(type(r).__name__ != "Malformed" for _, r in log.read())
        assert {o: got.get(o) for o in out["acked"]} == out["acked"]
        # every batch was acknowledged in the end; some records of a refused attempt are there twice
        assert set(out["acked"].values()) == {f"e{10 * b + i}" for b in range(12) for i in range(per_batch)} \
            | {f"r{b}" for b in range(12)}


def test_a_log_takes_one_writer_at_a_time(tmp_path):
    """A second writer (another server given the same --eventlog-dir) is refused, naming the process that
    writes the log: two writers would give the same offsets to different records."""
    import os

    from online.eventlog import LogInUseError
    first = EventLog(tmp_path, fsync=False)
    assert first.append([event(0)]) == [0]
    with pytest.raises(LogInUseError, match=f"written by another process \\(pid {os.getpid()}\\); give each server "
                                            "its own --eventlog-dir"):
        EventLog(tmp_path, fsync=False)
    assert [o for o, _ in EventLog(tmp_path, readonly=True).read()] == [0]     # readers are welcome
    first.close()
    second = EventLog(tmp_path, fsync=False)                                    # once it is closed
    assert second.append([event(1)]) == [1]
    second.close()


def test_a_torn_line_in_opens_neither_hides_the_next_open_nor_counts_as_one(tmp_path):
    """A crash while an open was being recorded leaves part of a line: the next writer ends it first, so its
    own open reads back, and the torn part is not taken for an open."""
    from online.eventlog import OPENS_FILE, log_opens
    EventLog(tmp_path, fsync=False).close()
    with open(tmp_path / OPENS_FILE, "ab") as f:
        f.write(b"1796485099011 12")                 # torn: no newline
    assert len(log_opens(tmp_path)) == 1             # only the whole line
    writer = EventLog(tmp_path, fsync=False)
    writer.close()
    opens = log_opens(tmp_path)
    assert len(opens) == 2 and opens[-1][1] == 0 and all(at != 12 for _, at in opens)


def test_retention_deletes_old_segments_but_never_what_a_learner_still_needs(tmp_path):
    """prune() deletes whole segments last written before the retention, oldest first, never the current
    one nor one holding a record a learner has still to read; offsets do not move, and readers, a writer
    reopening the log and a tailer start at the oldest segment left."""
    import time

    from online.eventlog import log_end
    from online.replay import count_records, read_records
    from online.tail import LogTailer
    log = EventLog(tmp_path, fsync=False, segment_bytes=300)
    for i in range(40):
        log.append([event(i)])
    segs = segment_files(tmp_path)
    assert len(segs) > 6
    old = time.time() - 10 * 3600
    for name in segs[:5]:                                    # the first five were last written 10 h ago
        os.utime(tmp_path / name, (old, old))
    bases = [int(n[4:-4]) for n in segs]
    assert log.prune(3600, keep_from=bases[3]) == bases[:3]  # the learner still needs the fourth's records
    assert log.prune(3600) == bases[3:5]                      # then up to the first young segment
    assert segment_files(tmp_path) == segs[5:]
    assert log.append([event(40)]) == [40]                   # offsets go on
    log.close()
    assert log.prune(0) == []                                 # closed: another writer may own it now
    again = EventLog(tmp_path, fsync=False)
    assert again.end_offset == 41 and log_end(tmp_path) == 41 == count_records(tmp_path)
    assert [o for o, _ in again.read()] == list(range(bases[5], 41))
    again.close()
    assert [o for o, _ in read_records(tmp_path, 0)] == list(range(bases[5], 41))
    assert [o for o, _ in LogTailer(tmp_path, 0).poll_batch()] == list(range(bases[5], 41))


def test_the_server_prunes_its_log_but_keeps_what_its_learner_has_still_to_read(tmp_path):
    import time

    from online.checkpoint import write_checkpoint
    from serving.settings import load_settings
    from serving.sink import LogPruner, SharedEventLog, learner_needs
    settings = load_settings(eventlog_dir=tmp_path / "log", learner_state_dir=tmp_path / "learner",
                             eventlog_retention_h=1)
    assert learner_needs(settings) == 0                  # the learner has no checkpoint yet: keep everything
    shared = SharedEventLog(tmp_path / "log", fsync=False)
    shared.log.segment_bytes = 300
    for i in range(40):
        shared.append([event(i)])
    segs = segment_files(tmp_path / "log")
    old = time.time() - 2 * 3600
    for name in segs:
        os.utime(tmp_path / "log" / name, (old, old))
    bases = [int(n[4:-4]) for n in segs]
    pruner = LogPruner(shared, settings.eventlog_retention_h, lambda: learner_needs(settings))
    assert pruner.prune_now() == []
    write_checkpoint(tmp_path / "learner" / "checkpoints", {"replay_from": bases[4]}, {})
    assert learner_needs(settings) == bases[4]
    assert pruner.prune_now() == bases[:4]               # up to the segment holding what it still needs
    write_checkpoint(tmp_path / "learner" / "checkpoints", {"replay_from": 10 ** 6, "source_log": "another"}, {})
    assert learner_needs(settings) == 0                  # offsets of another log: this one is read from 0
    assert learner_needs(load_settings(eventlog_dir=tmp_path / "log", learner=False)) is None
    assert learner_needs(load_settings(eventlog_dir=tmp_path / "log", bus_url="redis://127.0.0.1:1/0")) is None
    shared.close()
