"""`feedrank export`: served records joined with their events, written back as an impression table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feedsim.simulate import simulate
from online.eventlog import EventLog
from online.export import export_table
from online.records import ServedRecord
from online.workload import workload
from stacker import schema
from stacker.dataset import read_table
from stacker.features import table_features
from stacker.ranker import StackedRanker

WINDOW_MS = 5_000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    """3,000 simulated impressions served by the tiny bundle, 80% of them viewed, in a real event log."""
    ranker = StackedRanker.load(tiny_bundle)
    df = simulate(3_000, seed=11)
    records = workload(df, ranker.spec, ranker.bundle_id, WINDOW_MS, seed=2, view_share=0.8)
    log = tmp_path_factory.mktemp("export") / "log"
    with EventLog(log, fsync=False) as out:
        out.append(records)
    viewed = {(r.request_id, r.post_id) for r in records if not isinstance(r, ServedRecord) and r.kind == "view"}
    return df, ranker, log, viewed


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_export_gives_back_the_viewed_impressions_with_their_labels_and_features(served, tiny_bundle,
                                                                                tmp_path, suffix):
    df, ranker, log, viewed = served
    out = tmp_path / f"served{suffix}"
    summary = export_table(log, [tiny_bundle], out, window_ms=WINDOW_MS, include_open=True, progress=False)
    table = read_table(out)
    assert summary["rows"] == len(table) == len(viewed)
    assert summary["never_viewed"] == len(df) - len(viewed)
    assert summary["bundles"] == [ranker.bundle_id]
    assert table["ts"].is_monotonic_increasing

    original = df.set_index(["request_id", "post_id"]).loc[list(zip(table["request_id"], table["post_id"]))]
    for col in ("ts", "user_id", "author_id", "position", "media_type", "created_at", "ctx.device", "ctx.surface"):
        assert (table[col].to_numpy() == original[col].to_numpy()).all(), col
    for task in schema.TASKS:
        col = schema.label_column(task)
        assert (table[col].to_numpy() == original[col].to_numpy()).all(), task
        assert summary["positives"][task] == int(table[col].sum())
    names = [*ranker.spec.user_features, *ranker.spec.post_features]
    expected = table_features(original.reset_index(), ranker.spec, names)
    assert np.array_equal(table[[schema.FEATURE_PREFIX + n for n in names]].to_numpy(np.float32), expected)
    assert not any(c.startswith(schema.TRUE_PREFIX) for c in table.columns)


def test_open_windows_are_left_out_unless_asked_and_the_export_retrains(served, tiny_bundle, tmp_path):
    from stacker.dnn import DNNConfig
    from stacker.gbdt import GBDTConfig
    from stacker.progress import Progress
    from stacker.train import TrainConfig, train_bundle
    from stacker.vwstack import VWConfig
    df, ranker, log, viewed = served
    summary = export_table(log, [tiny_bundle], tmp_path / "t.parquet", window_ms=WINDOW_MS, progress=False)
    table = read_table(tmp_path / "t.parquet")
    assert summary["open_at_end"] > 0 and summary["open_at_end_exported"] == 0
    assert summary["rows"] + summary["open_at_end"] == len(viewed)
    # what is left out is the latest: impressions whose window had not closed by the end of the log
    assert table["ts"].max() <= df["ts"].max() - WINDOW_MS

    config = TrainConfig(gbdt=GBDTConfig(trees=10), dnn=DNNConfig(epochs=1, batch_size=128), vw=VWConfig(bits=18))
    bundle = train_bundle(table, tmp_path / "retrained", config, progress=Progress(enabled=False))
    assert StackedRanker.load(bundle).spec.user_features == ranker.spec.user_features


def test_records_of_a_bundle_not_given_stop_the_export_naming_it(served, tiny_bundle, other_bundle, tmp_path):
    """The first record of an unknown bundle stops the export, after chunks were already written to the
    partial file: the output is never created and the partial file is removed."""
    df, ranker, log, _ = served
    other = StackedRanker.load(other_bundle)
    after_swap = workload(simulate(200, seed=12).assign(ts=lambda d: d["ts"] + int(df["ts"].max())), other.spec,
                          other.bundle_id, WINDOW_MS)
    mixed = tmp_path / "mixed"
    with EventLog(mixed, fsync=False) as out_log:
        out_log.append(list(read_records_of(log)) + after_swap)
    out = tmp_path / "t.parquet"
    with pytest.raises(ValueError, match=f"served by bundle {other.bundle_id}, whose manifest was not given"):
        export_table(mixed, [tiny_bundle], out, window_ms=WINDOW_MS, progress=False, chunk_rows=50)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    both = export_table(mixed, [tiny_bundle, other_bundle], out, window_ms=WINDOW_MS, progress=False,
                        include_open=True)
    assert both["bundles"] == sorted([ranker.bundle_id, other.bundle_id])


def read_records_of(log):
    from online.replay import read_records
    return (rec for _, rec in read_records(log))


def test_nothing_to_export_is_an_error_not_an_empty_table(tiny_bundle, tmp_path):
    ranker = StackedRanker.load(tiny_bundle)
    unviewed = workload(simulate(300, seed=13), ranker.spec, ranker.bundle_id, WINDOW_MS, view_share=0.0)
    log = tmp_path / "log"
    with EventLog(log, fsync=False) as out_log:
        out_log.append(unviewed)
    out = tmp_path / "t.jsonl"
    with pytest.raises(ValueError, match="no impression to export .*300 never viewed.*--returned-is-viewed"):
        export_table(log, [tiny_bundle], out, window_ms=WINDOW_MS, progress=False)
    assert not out.exists()
    assert export_table(log, [tiny_bundle], out, window_ms=WINDOW_MS, progress=False, include_open=True,
                        returned_is_viewed=True)["rows"] == 300
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an event log"):
        export_table(tmp_path / "empty", [tiny_bundle], out, progress=False)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_table(log, [tiny_bundle], tmp_path / "dir.parquet", progress=False)


def test_duplicate_late_and_unmatched_events_are_counted_and_change_no_label(tiny_bundle, tmp_path):
    from online.records import Engagement
    ranker = StackedRanker.load(tiny_bundle)
    df = simulate(1_000, seed=14)
    records = workload(df, ranker.spec, ranker.bundle_id, WINDOW_MS)
    first_click = next(i for i, r in enumerate(records) if getattr(r, "kind", None) == "click")
    c = records[first_click]
    first = records[0]
    like = df.set_index(["request_id", "post_id"]).loc[(first.request_id, first.post_id), "label.like"]
    records.insert(first_click + 1, Engagement(c.event_id, c.request_id, c.post_id, "click", c.ts + 1))
    records.insert(first_click + 2, Engagement("stray", "no-such-request", "p0", "click", c.ts + 2))
    records.append(Engagement("late-like", first.request_id, first.post_id, "like", first.ts + 100))
    log = tmp_path / "log"
    with EventLog(log, fsync=False) as out_log:
        out_log.append(records)
    summary = export_table(log, [tiny_bundle], tmp_path / "t.parquet", window_ms=WINDOW_MS, progress=False,
                           include_open=True)
    assert (summary["duplicate_events"], summary["late_events"], summary["unmatched_events"]) == (1, 1, 1)
    table = read_table(tmp_path / "t.parquet").set_index(["request_id", "post_id"])
    assert table.loc[(first.request_id, first.post_id), "label.like"] == like
    assert summary["positives"]["click"] == int(df["label.click"].sum())


def test_export_command(served, tiny_bundle, other_bundle, tmp_path):
    """The CLI with a directory holding both bundles; a bad output name is refused before any work."""
    _, ranker, log, viewed = served
    both = tmp_path / "bundles"
    both.mkdir()
    for b in (tiny_bundle, other_bundle):
        (both / Path(b).name).symlink_to(Path(b).resolve())
    run = subprocess.run([sys.executable, "-m", "feedrank.cli", "export", "--log", str(log), "--bundle", str(both),
                          "--out", str(tmp_path / "t.jsonl"), "--window-ms", str(WINDOW_MS), "--include-open",
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"wrote {len(viewed):,} impressions" in run.stdout and ranker.bundle_id in run.stdout
    assert len(read_table(tmp_path / "t.jsonl")) == len(viewed)
    (tmp_path / "t.jsonl").write_text("mine")
    again = subprocess.run(run.args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "t.jsonl exists; give another path, or --force" in again.stderr
    assert (tmp_path / "t.jsonl").read_text() == "mine"
    forced = subprocess.run(run.args + ["--force"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and len(read_table(tmp_path / "t.jsonl")) == len(viewed)

    bad = subprocess.run([sys.executable, "-m", "feedrank.cli", "export", "--log", str(log), "--bundle",
                          str(tiny_bundle), "--out", str(tmp_path / "t.csv"), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown table format '.csv'" in bad.stderr

    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(log, damaged)
    seg = sorted(damaged.glob("seg-*.log"))[0]
    data = bytearray(seg.read_bytes())
    data[data.index(b"\n", 5_000) + 20] ^= 0x01                  # one record's payload, mid-log
    seg.write_bytes(bytes(data))
    run = subprocess.run([sys.executable, "-m", "feedrank.cli", "export", "--log", str(damaged), "--bundle",
                          str(both), "--out", str(tmp_path / "d.jsonl"), "--window-ms", str(WINDOW_MS),
                          "--include-open", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "skipped: 1 log records holding no well-formed record" in run.stdout


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_long_export_is_written_in_chunks_with_the_same_rows(served, tiny_bundle, tmp_path, suffix):
    _, _, log, viewed = served
    whole = export_table(log, [tiny_bundle], tmp_path / f"whole{suffix}", window_ms=WINDOW_MS,
                         include_open=True, progress=False)
    chunked = export_table(log, [tiny_bundle], tmp_path / f"chunked{suffix}", window_ms=WINDOW_MS,
                           include_open=True, progress=False, chunk_rows=300)
    a = read_table(tmp_path / f"whole{suffix}")
    b = read_table(tmp_path / f"chunked{suffix}")
    assert chunked["rows"] == whole["rows"] == len(b) == len(viewed)
    assert chunked["positives"] == whole["positives"]
    key = ["ts", "request_id", "post_id"]
    a, b = (t.sort_values(key, kind="stable").reset_index(drop=True) for t in (a, b))
    assert a.equals(b)
    assert not list(tmp_path.glob(".*partial*"))


def test_train_reads_an_event_log_directly(served, tiny_bundle, tmp_path):
    """`feedrank train --data LOG --served-by BUNDLE` joins and exports the log on the way in."""
    _, _, log, _ = served
    cmd = [sys.executable, "-m", "feedrank.cli", "train", "--data", str(log), "--out", str(tmp_path / "b"),
           "--trees", "5", "--epochs", "1", "--bits", "18", "--window-ms", str(WINDOW_MS), "--quiet"]
    missing = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "--served-by" in missing.stderr and not (tmp_path / "b").exists()
    run = subprocess.run(cmd + ["--served-by", str(tiny_bundle)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "joined" in run.stderr and f"source: event log {log}" in run.stdout
    ranker = StackedRanker.load(tmp_path / "b")
    assert ranker.spec.user_features == StackedRanker.load(tiny_bundle).spec.user_features
