"""Measure event-log append and read throughput: ``python -m online.bench_eventlog [N]``.

A quarter of the records are served records with 8 user and 16 post features, the rest events;
appends go in batches of 500 with one fsync each.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time

from online.eventlog import EventLog
from online.records import Engagement, ServedRecord


def sample_records(n: int, seed: int = 0) -> list[ServedRecord | Engagement]:
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    out: list[ServedRecord | Engagement] = []
    for i in range(n):
        if i % 4 == 0:
            out.append(ServedRecord(f"req-{i}", f"post-{i}", f"user-{i % 100}", f"author-{i % 50}", i % 30, t0 + i,
                                    "bundle-1", 3, "photo", t0 - 86_400_000, "ios", "home",
                                    [rng.random() for _ in range(8)], [rng.random() for _ in range(16)]))
        else:
            out.append(Engagement(f"ev-{i}", f"req-{i - i % 4}", f"post-{i - i % 4}", "view", t0 + i + 500))
    return out


def main(n: int = 200_000, batch: int = 500) -> None:
    records = sample_records(n)
    with tempfile.TemporaryDirectory() as d, EventLog(d, fsync=True) as log:
        t = time.perf_counter()
        for i in range(0, n, batch):
            log.append(records[i:i + batch])
        append_s = time.perf_counter() - t
        t = time.perf_counter()
        count = sum(1 for _ in log.read())
        read_s = time.perf_counter() - t
    print(f"append: {n / append_s:,.0f} records/s (batches of {batch}, fsync per batch)")
    print(f"read:   {count / read_s:,.0f} records/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
