"""Offline comparison: every variant trained on the same time slices, evaluated on the latest.

Variants: ``base_rate``; ``lr_ids`` (VW on ids and context only); ``gbdt`` (XGBoost per task) and
``dnn`` (the multi-task MLP), both trained on all rows the stack uses in total (extractor + LR
slices) so no variant wins by seeing fresher data; ``gbdt_lr`` and ``dnn_lr`` (one extractor under
the LR); ``stack`` (frozen at the end of its LR slice); ``stack_online`` (the same stack, resumed
with the bundle's online settings (FTRL: its own alpha), scoring the test slice in arrival order and
learning each row ``label_delay_ms`` after its time (default 5 minutes, the online learner's default
attribution window: an impression is learned when its window closes): progressive validation, the
way the served stack runs); ``oracle`` (true probabilities, simulated data only); plus any peers passed in.
Every LR variant's biases are re-fitted after its passes, as ``train`` does
(:func:`stacker.train.refit_biases`; ``lr_bias_refit`` in the report), unless
``TrainConfig.refit_biases`` is off. On simulated data, given the world's logit components, the
report also says what each variant recovers of each component (``recovery``; :mod:`feedsim.attribution`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import schema
from .dnn import train_mlp
from .gbdt import train_gbdt
from .metrics import task_metrics, write_json
from .progress import Progress, warn
from .train import (MIN_SLICE_ROWS, TrainConfig, check_training_slices, downsample_table, early_pass, fit_lr,
                    labels_of, lr_work, predict_features, split_by_time, stack_features, take_rows,
                    time_slices, train_extractors)
from .vwstack import TaskLearners, VWConfig, learn_text, predict_text
from .vwtext import batch_text

LR_VARIANTS = {"gbdt_lr": "l", "dnn_lr": "d", "stack": "ldupac"}


def _learn_and_predict(tasks, config, namespaces, train_feats, Y, rows, weights, test_feats, progress, name,
                       refits: dict, keep: Path | None = None, early=None):
    """Train one LR variant on the rows ``rows`` of its slice (features and labels of every row: the
    refit uses them all, :func:`stacker.train.fit_lr`), after the extractors' slice's kept rows ``early``
    where :func:`stacker.train.early_pass` says so, and score the test slice; what its bias refit did
    goes to ``refits[name]``; ``keep`` saves its VW models there."""
    learners = TaskLearners(tasks, config.vw)
    early_rows = 0 if early is None else len(early[1])
    with progress.task(f"{name}: LR", lr_work(namespaces, config, len(rows), len(Y), early_rows)) as bar:
        refit = fit_lr(learners, train_feats, Y, weights, config, bar, namespaces, rows=rows, early=early)
    if refit is not None:
        refits[name] = refit
    p = predict_features(learners, test_feats, namespaces)
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        learners.save(keep)
    learners.close()
    return p


LABEL_DELAY_MS = 300_000  # the online learner's default attribution window: an impression is learned once it closes


def progressive(tasks, vw: VWConfig, model_path, leaves, hidden, ids, ctx, Y: np.ndarray, chunk: int,
                progress, desc: str = "stack_online: score, then learn", ts: np.ndarray | None = None,
                label_delay_ms: int = LABEL_DELAY_MS) -> np.ndarray:
    """Resume the VW model at ``model_path`` under ``vw`` and run rows in time order, scoring each with
    the weights learned from the rows whose labels it could have had (progressive validation). Returns
    the pre-update probabilities [N, T].

    With ``ts`` (row times in ms, non-decreasing), a row's labels are learned ``label_delay_ms`` after
    its time, as the served learner learns an impression when its attribution window closes, and rows
    are scored ``chunk`` at a time with everything learned before the chunk's first row's labels
    were due. Without it, each chunk is scored, then learned."""
    learners = TaskLearners(tasks, vw, model_path=model_path)
    out = np.empty((len(Y), len(tasks)))

    def text(a, b):
        return batch_text(leaves[a:b], hidden[a:b], ids[a:b], ctx[a:b], vw.values, interactions=vw.interactions)

    if ts is not None and np.any(np.diff(ts) < 0):
        raise ValueError("progressive: rows must be in time order")
    learned = 0
    with progress.task(desc, len(Y)) as bar:
        for a in range(0, len(Y), chunk):
            b = min(a + chunk, len(Y))
            if ts is not None:
                due = int(np.searchsorted(ts, ts[a] - label_delay_ms, side="left"))
                if due > learned:
                    learn_text(learners, text(learned, due), Y[learned:due], score_first=False)
                    learned = due
            out[a:b] = predict_text(learners, text(a, b))  # the whole chunk before any of it is learned
            if ts is None:
                learn_text(learners, text(a, b), Y[a:b], score_first=False)
            bar.update(b - a)
    learners.close()
    return out


def evaluate(df: pd.DataFrame, config: TrainConfig = TrainConfig(), dataset: str = "simulated",
             tasks=None, peers: dict | None = None, progress: Progress | None = None,
             online_chunk: int = 100, components: dict | None = None,
             label_delay_ms: int = LABEL_DELAY_MS) -> dict:
    """Train every variant and evaluate all of them on the latest time slice.

    ``peers`` maps a variant name to ``f(train_df, test_df) -> probs [N_test, T]``. ``components``
    (simulated data: the world's logit components per row of ``df``, from
    ``simulate(..., return_components=True)``) adds ``"recovery"``: per variant and task, the share of
    each component's effect the variant recovers (:mod:`feedsim.attribution`).
    Returns ``{"dataset", "test_rows", "variants": {variant: {task: metrics}}, ...}``.
    """
    progress = progress or Progress()
    tasks = tuple(tasks or schema.tasks_in(df.columns))
    started = time.time()
    extract, lr_slice, test = split_by_time(df, config.slices)
    tasks, warnings = check_training_slices([extract, lr_slice, test], tasks)
    if len(test) < MIN_SLICE_ROWS:
        raise ValueError(f"{len(df):,} rows are too few to evaluate on: the test slice (the latest "
                         f"{config.slices[2]:.0%}) holds {len(test):,} rows and needs at least {MIN_SLICE_ROWS:,}")
    span_ms = int(test["ts"].max() - test["ts"].min())
    if span_ms <= label_delay_ms:
        warnings.append(f"the test slice spans {span_ms / 1000:g} s, no more than the label delay "
                        f"({label_delay_ms / 1000:g} s): stack_online learns no label before scoring its rows, "
                        f"so it equals stack")
    for w in warnings:
        warn(w)
    train_all = pd.concat([extract, lr_slice], ignore_index=True)
    Y_test = labels_of(test, tasks)
    base = labels_of(train_all, tasks).mean(axis=0)
    preds: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.time()
        preds[name] = fn()
        timings[name] = round(time.time() - t0, 2)

    preds["base_rate"] = np.tile(base, (len(test), 1))
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        ex = train_extractors(extract, tasks, config, Path(work), progress)
        timings["extractors"] = round(time.time() - t0, 2)
        Y_lr = labels_of(lr_slice, tasks)
        keep, weights = downsample_table(lr_slice, Y_lr, config.downsample_rate)
        rows = np.flatnonzero(keep)
        # Every row of both training slices (the LR variants refit their biases on every row of theirs;
        # lr_ids learns from both slices); the LR slice's are the last of them.
        all_feats = stack_features(ex, train_all, config.vw.values)
        lr_feats = tuple(x[len(extract):] for x in all_feats)
        # The stack first learns the extractors' slice (the rows downsampling keeps there), as train does.
        Y_ex = labels_of(extract, tasks)
        keep_ex, weights_ex = downsample_table(extract, Y_ex, config.downsample_rate)
        early = (take_rows(tuple(x[:len(extract)] for x in all_feats), np.flatnonzero(keep_ex)),
                 Y_ex[keep_ex], weights_ex[keep_ex]) if early_pass("ldupac", config) else None
        refits: dict = {}
        test_feats = stack_features(ex, test, config.vw.values)
        models = Path(work) / "stack_vw" / "lr.model"
        for name, namespaces in LR_VARIANTS.items():
            timed(name, lambda: _learn_and_predict(tasks, config, namespaces, lr_feats, Y_lr, rows,
                                                   weights[rows], test_feats, progress, name, refits,
                                                   keep=models if name == "stack" else None, early=early))
        online_vw = config.vw.with_rate(config.online_rate)
        test_ts = test["ts"].to_numpy(np.int64)
        timed("stack_online", lambda: progressive(tasks, online_vw, models, *test_feats[1:], Y_test,
                                                  online_chunk, progress, ts=test_ts,
                                                  label_delay_ms=label_delay_ms))

        # Baselines see every row the stack saw, extractor and LR slices together.
        X_all = all_feats[0]
        Y_all = labels_of(train_all, tasks)

        def gbdt():
            out = np.empty((len(test), len(tasks)))
            with progress.task("gbdt: one XGBoost per task", len(tasks)) as bar:
                for k in range(len(tasks)):
                    booster = train_gbdt(X_all, Y_all[:, k], config.gbdt)
                    out[:, k] = booster.inplace_predict(test_feats[0])
                    bar.update(1)
            return out
        timed("gbdt", gbdt)
        with progress.task("dnn: multi-task MLP", config.dnn.epochs) as bar:
            timed("dnn", lambda: train_mlp(X_all, Y_all, config.dnn,
                                           progress=lambda i, n: bar.update(1)).predict_proba(test_feats[0]))

        keep_all, w_all = downsample_table(train_all, Y_all, config.downsample_rate)
        rows_all = np.flatnonzero(keep_all)
        timed("lr_ids", lambda: _learn_and_predict(tasks, config, "upac", all_feats, Y_all, rows_all,
                                                   w_all[rows_all], test_feats, progress, "lr_ids", refits))
    for name, fn in (peers or {}).items():
        progress.note(f"{name}: training peer")
        timed(name, lambda: np.asarray(fn(train_all, test)).reshape(len(test), len(tasks)))
    if all(schema.true_column(t) in test.columns for t in tasks):
        preds["oracle"] = np.stack([test[schema.true_column(t)].to_numpy(np.float64) for t in tasks], 1)

    order = ["base_rate", "lr_ids", "gbdt", "dnn", "gbdt_lr", "dnn_lr", "stack", "stack_online", *(peers or {}),
             "oracle"]
    variants = {v: {t: task_metrics(Y_test[:, k], preds[v][:, k], base[k]) for k, t in enumerate(tasks)}
                for v in order if v in preds}
    report = {"dataset": dataset, "test_rows": int(len(test)), "variants": variants,
              "tasks": list(tasks),
              "train_rows": {"extractors": len(extract), "lr": len(lr_slice), "lr_kept": int(len(rows)),
                             "lr_early_pass_over_extractors": 0 if early is None else len(early[1])},
              "stack_online_label_delay_ms": int(label_delay_ms), "lr_bias_refit": refits,
              "seconds": timings, "wall_time_s": round(time.time() - started, 1),
              **({"warnings": warnings} if warnings else {}), "_predictions": {"y": Y_test, **preds}}
    report["calibration_bound"] = {t: calibration_bound(variants["base_rate"][t]["positives"]) for t in tasks}
    if "oracle" in variants:
        oracle = variants["oracle"]
        # None where the oracle itself does no better than the base rate (a small slice of a rare task)
        report["oracle_share"] = {v: {t: (1 - per[t]["ne"]) / (1 - oracle[t]["ne"]) if oracle[t]["ne"] < 1
                                      else None for t in tasks}
                                  for v, per in variants.items() if v not in ("base_rate", "oracle")}
        # Against the true probabilities rather than the labels: what is the model's own bias and not
        # the luck of a test slice's draws (a rare task's observed rate strays a few percent from its
        # true rate; the oracle's calibration against the labels says by how much).
        truth = preds["oracle"].mean(axis=0)
        report["calibration_vs_truth"] = {v: {t: float(preds[v][:, k].mean() / truth[k]) for k, t in enumerate(tasks)}
                                          for v in variants if v != "oracle"}
    report["checks"] = acceptance_checks(report)
    if components is not None and "oracle" in preds:
        from feedsim.attribution import report_recovery
        test_rows = time_slices(df["ts"].to_numpy(), config.slices)[2]
        comps = {k: np.asarray(v)[test_rows] for k, v in components.items()}
        report["recovery"] = report_recovery(preds, preds["oracle"], comps, tasks,
                                             [v for v in variants if v not in ("base_rate", "oracle")])
    return report


def format_table(report: dict) -> str:
    tasks = report["tasks"]
    lines = [f"dataset {report['dataset']}: {report['test_rows']:,} test rows (latest time slice)", ""]
    w = max(10, *(len(v) + 1 for v in report["variants"]))
    head = f"{'variant':<{w}}" + "".join(f"{t:>22}" for t in tasks)
    lines += [head, f"{'':<{w}}" + "".join(f"{'NE   AUC   cal':>22}" for _ in tasks), "-" * len(head)]
    for v, per_task in report["variants"].items():
        cells = "".join(f"{_cell(m['ne'], 8, 4)} {_cell(m['auc'], 5, 3)} {_cell(m['calibration'], 5, 2)}"
                        for m in (per_task[t] for t in tasks))
        lines.append(f"{v:<{w}}{cells}")
    lines.append("")
    lines.append("positives per task: " + ", ".join(
        f"{t} {report['variants']['base_rate'][t]['positives']}" for t in tasks))
    checks = format_checks(report)
    if checks:
        lines += ["", checks]
    if "recovery" in report:
        lines += ["", format_recovery(report)]
    return "\n".join(lines)


def _cell(x: float, width: int, digits: int) -> str:
    """``x`` in a table cell of ``width`` characters, never wider (a huge NE reads as ">999")."""
    text = f"{x:>{width}.{digits}f}"
    return text if len(text) <= width else f"{'>' + '9' * (width - digits - 2):>{width}}"


def calibration_bound(positives: int) -> float:
    """How far calibration may stray from 1 on a test slice with that many positives:
    max(0.05, 3 / sqrt(positives))."""
    return float(max(0.05, 3.0 / np.sqrt(max(positives, 1))))


def calibrated(calibration: float, bound: float) -> bool:
    """Whether a calibration is within its bound (NaN, a task without positives, is not)."""
    return bool(abs(calibration - 1) <= bound)


def acceptance_checks(report: dict) -> dict:
    """For ``stack`` and ``stack_online``: the first task's (click's) NE relative to ``gbdt``'s, the share
    of the oracle's 1 - NE it keeps, and the tasks whose calibration is outside
    :func:`calibration_bound`."""
    tasks, variants = report["tasks"], report["variants"]
    task = "click" if "click" in tasks else tasks[0]
    out = {}
    for v in ("stack", "stack_online"):
        if v not in variants:
            continue
        out[v] = {"task": task,
                  "ne_vs_gbdt": variants[v][task]["ne"] / variants["gbdt"][task]["ne"] - 1
                  if "gbdt" in variants else None,
                  "oracle_share": report.get("oracle_share", {}).get(v, {}).get(task),
                  "uncalibrated": [t for t in tasks
                                   if not calibrated(variants[v][t]["calibration"], report["calibration_bound"][t])]}
    return out


def format_checks(report: dict) -> str:
    """One line per stack variant of :func:`acceptance_checks`."""
    variants, lines = report["variants"], []
    for v, c in report.get("checks", {}).items():
        parts = []
        if c["ne_vs_gbdt"] is not None:
            parts.append(f"{c['task']} NE {c['ne_vs_gbdt']:+.2%} against gbdt")
        if c["oracle_share"] is not None:
            parts.append(f"keeps {c['oracle_share']:.1%} of the oracle's 1 - NE")
        truth = report.get("calibration_vs_truth", {}).get(v, {})
        off = [f"{t} {variants[v][t]['calibration']:.3f} (bound {report['calibration_bound'][t]:.3f}"
               + (f"; {truth[t]:.3f} against the true probabilities)" if t in truth else ")")
               for t in c["uncalibrated"]]
        parts.append("calibrated on every task" if not off else "calibration outside its bound: " + ", ".join(off))
        lines.append(f"{v}: " + "; ".join(parts))
    return "\n".join(lines)


def format_recovery(report: dict, task: str | None = None) -> str:
    """Per variant, the share of each component of the world's ``task`` logit (default click) it
    recovers, and the variance of its gap to the true logit (what it misses, and its own noise)."""
    rec = report["recovery"]
    task = task or ("click" if "click" in report["tasks"] else report["tasks"][0])
    PARTS = list(next(iter(rec.values()))[task]["recovered"])
    w = max(10, *(len(v) + 1 for v in rec))
    lines = [f"{task}: share of each component of the true logit a variant recovers "
             "(simulated world; 1 = all of it)",
             f"{'variant':<{w}}" + "".join(f"{p[:9]:>10}" for p in PARTS) + f"{'gap var':>9}{'noise':>7}"]
    for v, per_task in rec.items():
        r = per_task[task]
        cells = "".join(f"{'-':>10}" if r["recovered"][p] is None else f"{r['recovered'][p]:>10.2f}" for p in PARTS)
        lines.append(f"{v:<{w}}{cells}{r['gap_variance']:>9.3f}{r['noise']:>7.3f}")
    return "\n".join(lines)


def write_outputs(report: dict, json_path: Path | None, plot_dir: Path | None) -> list[Path]:
    written = []
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    if json_path:
        written.append(write_json(public, json_path))
    if plot_dir:
        from .plots import calibration_plot, ne_plot
        plot_dir = Path(plot_dir)
        plot_dir.mkdir(parents=True, exist_ok=True)
        written.append(ne_plot(public, plot_dir / "ne.png"))
        written.append(calibration_plot(report, plot_dir / "calibration.png"))
        if "recovery" in public:
            from .plots import recovery_plot
            written.append(recovery_plot(public, plot_dir / "recovery.png"))
    return written
