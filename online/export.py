"""Export what the server served, joined with its engagements, as an impression table.

``feedrank export --log DIR --bundle DIR --out table.parquet`` reads an event log (the server's own, or
one the learner follows), joins served records with their events on event time exactly as the online
learner does (:class:`online.joiner.Joiner`: attribution window, allowed lateness, views), and writes
one row per impression that was viewed, in the offline-training format (``stacker/schema.py``), with
every task's label. ``feedrank train --data`` retrains the stack from it.

Served records hold their dense inputs in the spec order of the bundle that served them, so the export
needs that bundle's manifest (``--bundle``, repeatable; a directory of bundles works too). The table's
feature columns are the union over the bundles seen; a feature one bundle did not have is left empty
(training fills it with the spec's default).

Nothing is dropped silently: the summary counts impressions never viewed, impressions whose attribution
window is still open at the end of the log (their labels are not final, so they are left out unless
``include_open``), and the joiner's duplicates, late and unmatched events. A served record from a bundle
whose manifest was not given stops the export, naming the bundle, and so does a log with nothing to
export; either way the output file is not touched.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from online.eventlog import CorruptLogError, check_log_path
from online.joiner import Joiner
from online.records import DEFAULT_DWELL_THRESHOLD_MS, Malformed, ServedRecord
from online.replay import read_records, records_left
from stacker import schema
from stacker.bundle import MANIFEST, BundleError, candidate_bundles, read_manifest
from stacker.dataset import TableWriter
from stacker.features import FeatureSpec


#: What a bad log, bundle or output path raises; the commands turn these into a one-line message.
EXPORT_ERRORS = (ValueError, OSError, BundleError, CorruptLogError)


def bundle_specs(paths) -> dict[str, FeatureSpec]:
    """``bundle_id -> FeatureSpec`` from bundle directories, or directories holding bundles."""
    specs: dict[str, FeatureSpec] = {}
    for path in map(Path, paths):
        refused: list = []
        found = [path] if (path / MANIFEST).is_file() else candidate_bundles(path, refused)
        if not found:
            raise BundleError("; ".join(map(str, refused)) if refused else
                              f"{path}: neither a bundle directory nor a directory of bundles")
        for d in found:
            m = read_manifest(d)
            specs[m["bundle_id"]] = FeatureSpec.from_dict(m["feature_spec"])
    return specs


class _Rows:
    """Columns of the exported table, appended one joined impression at a time."""

    def __init__(self, specs: dict[str, FeatureSpec], tasks):
        self.specs, self.tasks = specs, tuple(tasks)
        self.names = list(dict.fromkeys(n for s in specs.values() for n in (*s.user_features, *s.post_features)))
        self.column = {n: j for j, n in enumerate(self.names)}
        self.keys: list[tuple] = []
        self.features: list[np.ndarray] = []
        self.labels: list[tuple[int, ...]] = []
        self._index: dict[str, tuple[np.ndarray, int]] = {}
        self.bundles: set[str] = set()

    def add(self, s: ServedRecord, labels: dict[str, int]) -> None:
        where = self._index.get(s.bundle_id)
        if where is None:
            spec = self.specs[s.bundle_id]
            cols = np.array([self.column[n] for n in (*spec.user_features, *spec.post_features)], np.int64)
            where = self._index[s.bundle_id] = (cols, len(spec.user_features) + len(spec.post_features))
        cols, width = where
        values = s.user_features + s.post_features
        if len(values) != width:
            raise ValueError(f"served record ({s.request_id}, {s.post_id}) has {len(values)} feature values; "
                             f"bundle {s.bundle_id} has {width} features")
        row = np.full(len(self.names), np.nan, np.float32)
        row[cols] = values
        self.features.append(row)
        self.bundles.add(s.bundle_id)
        self.keys.append((s.ts, s.request_id, s.user_id, s.post_id, s.author_id, s.position, s.media_type,
                          s.created_at, s.device, s.surface))
        self.labels.append(tuple(labels.get(t, 0) for t in self.tasks))

    def __len__(self) -> int:
        return len(self.keys)

    def take(self) -> pd.DataFrame:
        """The rows added since the last call, in time order, as a table chunk."""
        keys = pd.DataFrame(self.keys, columns=[*schema.KEY_COLUMNS, *schema.CONTEXT_COLUMNS])
        features = np.vstack(self.features) if self.features else np.zeros((0, len(self.names)), np.float32)
        labels = np.array(self.labels, np.int8).reshape(len(self.labels), len(self.tasks))
        df = pd.concat([keys,
                        pd.DataFrame(features, columns=[schema.FEATURE_PREFIX + n for n in self.names]),
                        pd.DataFrame(labels, columns=[schema.label_column(t) for t in self.tasks])], axis=1)
        self.keys, self.features, self.labels = [], [], []
        return df.sort_values("ts", kind="stable").reset_index(drop=True)


def export_table(log, bundles, out, window_ms: int = 300_000, lateness_ms: int = 5_000,
                 returned_is_viewed: bool = False, dwell_threshold_ms: int = DEFAULT_DWELL_THRESHOLD_MS,
                 include_open: bool = False, progress: bool = True, chunk_rows: int = 200_000,
                 name: str | None = None) -> dict:
    """Join the log's served records and events and write the impression table ``out`` (.parquet or
    .jsonl). Returns the summary: rows written, positives per task, and what was left out and why.
    ``name``: what error messages call the table (default ``out``).

    Rows are written ``chunk_rows`` at a time, each chunk in time order; impressions are labelled when
    their window closes, so the table as a whole is in time order up to one attribution window
    (training sorts by time anyway)."""
    from tqdm import tqdm
    started = time.time()
    specs = bundle_specs(bundles)
    if not specs:
        raise ValueError("give at least one --bundle (the bundles the log's records were served with)")
    if Path(out).suffix.lower() not in (".parquet", ".jsonl"):
        raise ValueError(f"{out}: unknown table format {Path(out).suffix!r} (use .parquet or .jsonl)")
    if Path(out).is_dir():
        raise ValueError(f"{out}: is a directory; give the table's file name (.parquet or .jsonl)")
    log = check_log_path(log)
    tasks = schema.TASKS
    joiner = Joiner(tasks, window_ms, allowed_lateness_ms=lateness_ms, max_open=1 << 62,
                    returned_is_viewed=returned_is_viewed, dwell_threshold_ms=dwell_threshold_ms)
    rows = _Rows(specs, tasks)
    records = malformed = 0
    positives = np.zeros(len(tasks), np.int64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = TableWriter(out, name=f"{out if name is None else name} (exported from {log})")
    bar = tqdm(total=records_left(log), unit="rec", desc="export", disable=not progress)

    def flush() -> None:
        chunk = rows.take()
        positives[:] += chunk[[schema.label_column(t) for t in tasks]].sum().to_numpy()
        writer.write(chunk)

    def take(examples) -> None:
        for x in examples:
            if x.final:
                rows.add(x.served, x.labels)
        if len(rows) >= chunk_rows:
            flush()

    try:
        for offset, rec in read_records(log):
            records += 1
            bar.update(1)
            if type(rec) is Malformed:
                malformed += 1
                continue
            if isinstance(rec, ServedRecord):
                if rec.bundle_id not in specs:
                    raise ValueError(f"{log}: the record at offset {offset} was served by bundle {rec.bundle_id}, "
                                     f"whose manifest was not given (known: {', '.join(sorted(specs))}); add its "
                                     "directory to the bundles given (export --bundle, train --served-by). "
                                     "Nothing was written.")
                take(joiner.add_served(rec, offset))
            else:
                take(joiner.add_event(rec, offset))
        bar.close()
        last = joiner.flush()
        open_at_end = sum(1 for x in last if x.final)   # viewed, window still open (unviewed: never viewed)
        if include_open:
            take(last)
        if len(rows) or not writer.rows:
            flush()
        stats = joiner.stats.as_dict()
        if not writer.rows:
            raise ValueError(f"{log}: no impression to export ({stats['served']:,} served, "
                             f"{stats['expired_unviewed']:,} never viewed, {open_at_end:,} still in their "
                             "attribution window); a backend that sends no views needs --returned-is-viewed, "
                             "and --include-open exports open windows. Nothing was written.")
        writer.commit()
    finally:
        writer.close()
    return {"out": str(out), "records": records, "rows": writer.rows,
            "positives": {t: int(n) for t, n in zip(tasks, positives)},
            "bundles": sorted(rows.bundles),
            "served": stats["served"], "never_viewed": stats["expired_unviewed"],
            "open_at_end": open_at_end, "open_at_end_exported": open_at_end if include_open else 0,
            "duplicate_served": stats["duplicate_served"], "duplicate_events": stats["duplicates"],
            "late_events": stats["late"], "unmatched_events": stats["unmatched"], "malformed_records": malformed,
            "seconds": round(time.time() - started, 2)}
