"""Plots of offline results: NE per variant and task, calibration curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

def variant_color(variant: str, variants) -> tuple:
    """A variant's colour, by its place among the report's ``variants``: the same in every plot of a run,
    those that leave a variant out included."""
    colors = plt.get_cmap("tab10").colors
    return colors[list(variants).index(variant) % len(colors)]


def ne_plot(report: dict, path: Path) -> Path:
    tasks, variants = report["tasks"], list(report["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4.5))
    width = 0.8 / len(variants)
    ne = np.array([[report["variants"][v][t]["ne"] for t in tasks] for v in variants], dtype=float)  # None: NaN
    for i, v in enumerate(variants):
        ax.bar(np.arange(len(tasks)) + i * width, ne[i], width, label=v, color=variant_color(v, variants))
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("normalized entropy (lower is better)")
    ax.set_title(f"{report['dataset']}: NE on the latest time slice ({report['test_rows']:,} rows)")
    lo, hi = (np.nanmin(ne), np.nanmax(ne)) if np.isfinite(ne).any() else (0.0, 1.0)
    ax.set_ylim(max(0.0, lo - 0.1), max(1.15, hi + 0.05))   # every bar whole
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_plot(report: dict, path: Path, bins: int = 12) -> Path:
    """Reliability curves (mean predicted vs observed, quantile bins) per task."""
    preds, tasks = report["_predictions"], report["tasks"]
    y = preds["y"]
    cols = min(3, len(tasks))
    rows = int(np.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for k, task in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        top = 0.0
        for v in report["variants"]:
            if v == "base_rate":
                continue
            p = preds[v][:, k]
            edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
            if len(edges) < 2:   # one value for every row: one point
                edges = np.array([edges[0], edges[0]])
            idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
            mp = np.bincount(idx, p, len(edges) - 1) / np.maximum(np.bincount(idx, None, len(edges) - 1), 1)
            my = np.bincount(idx, y[:, k], len(edges) - 1) / np.maximum(np.bincount(idx, None, len(edges) - 1), 1)
            ax.plot(mp, my, marker=".", label=v, lw=1, color=variant_color(v, report["variants"]))
            top = max(top, mp.max(), my.max())
        ax.plot([0, top], [0, top], color="grey", ls="--", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("mean predicted")
        ax.set_ylabel("observed rate")
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['dataset']}: calibration on the latest time slice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recovery_plot(report: dict, path: Path, task: str | None = None) -> Path:
    """Per variant, the variance of its gap to the true logit split by source (the parts sum to it,
    :func:`feedsim.attribution.recovery`): each component of the simulated world it misses, what the
    true logit holds beyond a sum of components (other), and its own noise."""
    rec = report["recovery"]
    task = task or ("click" if "click" in report["tasks"] else report["tasks"][0])
    variants = list(rec)
    parts = list(rec[variants[0]][task]["missed_variance"])
    fig, ax = plt.subplots(figsize=(10.5, 0.45 * len(variants) + 2))
    right, left = np.zeros(len(variants)), np.zeros(len(variants))   # positive parts stack right, negative left
    colors = plt.get_cmap("tab20").colors
    grey = {"other": "darkgrey", "noise": "lightgrey"}
    for i, part in enumerate([*parts, "other", "noise"]):
        vals = np.array([rec[v][task][part] if part in grey else rec[v][task]["missed_variance"][part]
                         for v in variants])
        start = np.where(vals >= 0, right, left + vals)
        ax.barh(variants, np.abs(vals), left=start, color=grey.get(part, colors[i % len(colors)]), label=part)
        right += np.maximum(vals, 0)
        left += np.minimum(vals, 0)
    ax.axvline(0.0, color="black", lw=0.6)
    ax.invert_yaxis()
    ax.set_xlabel(f"variance of (true {task} logit - variant's logit), by source")
    ax.set_title(f"{report['dataset']}: what each variant misses of the world's {task} logit")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
