"""A served-records-and-events workload from an impression table (e.g. ``feedsim.simulate``).

Each row becomes the :class:`ServedRecord` a server would have logged (raw inputs in the bundle's spec
order) plus a ``view`` event shortly after, and one event per positive label within the attribution
window (``dwell`` with a duration above the threshold). Records are returned in time order, as a
server's log would hold them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from online.records import DEFAULT_DWELL_THRESHOLD_MS, Engagement, ServedRecord
from stacker import schema
from stacker.features import FeatureSpec, table_features


def served_records(df: pd.DataFrame, spec: FeatureSpec, bundle_id: str, update_seq: int = 0) -> list[ServedRecord]:
    uf = table_features(df, spec, spec.user_features).tolist()
    pf = table_features(df, spec, spec.post_features).tolist()
    it = zip(df["request_id"], df["post_id"], df["user_id"], df["author_id"], df["position"].tolist(),
             df["ts"].tolist(), df["media_type"], df["created_at"].tolist(), df["ctx.device"], df["ctx.surface"],
             uf, pf)
    return [ServedRecord(r, p, u, a, pos, ts, bundle_id, update_seq, m, c, d, s, f, g)
            for r, p, u, a, pos, ts, m, c, d, s, f, g in it]


def workload(df: pd.DataFrame, spec: FeatureSpec, bundle_id: str, window_ms: int, tasks=schema.TASKS,
             view_delay_ms: int = 200, seed: int = 0, view_share: float = 1.0) -> list[ServedRecord | Engagement]:
    """Served records and their events, sorted by event time (served before events at equal ts)."""
    rng = np.random.default_rng(seed)
    served = served_records(df, spec, bundle_id)
    n = len(served)
    ts = df["ts"].to_numpy(np.int64)
    viewed = rng.uniform(size=n) < view_share
    items: list[tuple[int, int, object]] = [(int(t), 0, s) for t, s in zip(ts.tolist(), served)]
    for i in np.flatnonzero(viewed).tolist():
        s = served[i]
        items.append((s.ts + view_delay_ms, 1, Engagement(f"{s.request_id}/{s.post_id}/view", s.request_id,
                                                          s.post_id, "view", s.ts + view_delay_ms)))
    delays = rng.integers(view_delay_ms + 1, max(view_delay_ms + 2, window_ms // 2), size=(n, len(tasks)))
    for k, task in enumerate(tasks):
        col = schema.label_column(task)
        if col not in df.columns:
            continue
        for i in np.flatnonzero(df[col].to_numpy() > 0).tolist():
            s = served[i]
            t = s.ts + int(delays[i, k])
            kind, dwell = (task, 0) if task != "dwell" else ("dwell", DEFAULT_DWELL_THRESHOLD_MS + 5_000)
            items.append((t, 2, Engagement(f"{s.request_id}/{s.post_id}/{kind}", s.request_id, s.post_id,
                                           kind, t, dwell)))
    items.sort(key=lambda x: (x[0], x[1]))
    return [x[2] for x in items]
