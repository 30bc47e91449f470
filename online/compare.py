"""Online against frozen: the same bundle scored on a later stream, once frozen and once learning.

The bundle is trained on the earlier part of the table as ``train`` trains one, its extractors' and
LR's slices in the proportions of ``config.slices`` (the test fraction is unused: the stream is the
test). The stream after the bundle's training window is replayed in time order. The frozen stack scores
every impression with the bundle's weights; the online stack scores each impression with what it
has learned so far and learns it 5 minutes after its time (progressive validation), as the online
learner does when an impression's attribution window closes. Metrics are per task over the last
third of the stream, where drift, new posts and new authors have had the longest to accumulate.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from stacker import schema
from stacker.evaluate import progressive
from stacker.features import CandidateBatch
from stacker.metrics import task_metrics, write_json
from stacker.progress import Progress
from stacker import bundle as bundles
from stacker.ranker import StackedRanker
from stacker.train import MIN_SLICE_ROWS, TrainConfig, labels_of, split_by_time, train_bundle


def compare(df, config: TrainConfig, bundle_share: float = 0.5, chunk: int = 100,
            progress: Progress | None = None, online_learning_rate: float | None = None) -> dict:
    progress = progress or Progress()
    head, stream = split_by_time(df, (bundle_share, 1 - bundle_share))
    if len(stream) // 3 < MIN_SLICE_ROWS:
        raise ValueError(f"{len(df):,} rows are too few to compare on: the stream (the latest "
                         f"{1 - bundle_share:.0%}) holds {len(stream):,} rows, and its last third, where the "
                         f"metrics are taken, needs at least {MIN_SLICE_ROWS:,}")
    tasks = tuple(schema.tasks_in(df.columns))
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        bundle = train_bundle(head, Path(work) / "bundle", config, tasks, progress, evaluate_slice=False)
        ranker = StackedRanker.load(bundle)
        tasks = tuple(ranker.tasks)    # training leaves out a task with one outcome
        feats = ranker.features(CandidateBatch.from_table(stream, ranker.spec))
        frozen = ranker.predict_features(feats)
        Y = labels_of(stream, tasks)
        online_vw = config.vw.with_rate(online_learning_rate or config.online_rate)
        online = progressive(tasks, online_vw, bundle / bundles.VW_MODEL, feats.leaves,
                             feats.hidden, feats.ids, feats.context, Y, chunk, progress,
                             "online stack: score, then learn", ts=stream["ts"].to_numpy(np.int64))
        wall = time.time() - t0
    base = labels_of(head, tasks).mean(axis=0)
    last = slice(len(stream) - len(stream) // 3, len(stream))
    windows = np.array_split(np.arange(len(stream)), 20)
    out = {"stream_rows": len(stream), "last_third_rows": len(stream) // 3, "tasks": list(tasks),
           "frozen": {}, "online": {}, "relative_ne_gain": {}, "wall_time_s": round(wall, 1)}
    for k, t in enumerate(tasks):
        f = task_metrics(Y[last, k], frozen[last, k], base[k])
        o = task_metrics(Y[last, k], online[last, k], base[k])
        out["frozen"][t], out["online"][t] = f, o
        out["relative_ne_gain"][t] = 1 - o["ne"] / f["ne"]
    # NE over time: consecutive windows of the stream, frozen vs online (for the plot).
    out["over_time"] = {t: {"ts_ms": [int(stream["ts"].iloc[w[-1]]) for w in windows],
                            "frozen": [task_metrics(Y[w, k], frozen[w, k], base[k])["ne"] for w in windows],
                            "online": [task_metrics(Y[w, k], online[w, k], base[k])["ne"] for w in windows]}
                        for k, t in enumerate(tasks)}
    return out


def format_comparison(r: dict) -> str:
    lines = [f"online vs frozen stack: {r['stream_rows']:,} streamed impressions, metrics over the last "
             f"third ({r['last_third_rows']:,})", "",
             f"{'task':<9}{'frozen NE':>10}{'online NE':>10}{'gain':>8}{'frozen AUC':>11}{'online AUC':>11}"
             f"{'online cal':>11}"]
    for t in r["tasks"]:
        f, o = r["frozen"][t], r["online"][t]
        lines.append(f"{t:<9}{f['ne']:>10.4f}{o['ne']:>10.4f}{r['relative_ne_gain'][t]:>8.2%}"
                     f"{f['auc']:>11.4f}{o['auc']:>11.4f}{o['calibration']:>11.3f}")
    return "\n".join(lines)


def write(r: dict, path: Path) -> None:
    write_json(r, path)


def plot(r: dict, path: Path) -> Path:
    """NE per stream window, frozen vs online, one panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = r["tasks"]
    cols = min(3, len(tasks))
    rows = int(np.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        series = r["over_time"][t]
        days = (np.array(series["ts_ms"]) - series["ts_ms"][0]) / 86_400_000
        ax.plot(days, series["frozen"], marker=".", label="frozen bundle")
        ax.plot(days, series["online"], marker=".", label="learning online")
        ax.set_title(f"{t}: online NE {r['relative_ne_gain'][t]:.1%} lower (last third)", fontsize=9)
        ax.set_xlabel("days into the stream")
        ax.set_ylabel("NE")
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("the same bundle on a later stream: NE over time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
