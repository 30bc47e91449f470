"""Offline training of the stack on time slices, and bundle writing.

Slices are cut by time: the extractors (GBDT, DNN) learn from the earliest slice, the sparse LR
from the next (on leaves and hidden activations the frozen extractors produce), and evaluation uses
the latest. Negative downsampling drops only rows negative on every task, decided by a hash of
(request_id, post_id) so any replay makes the same choice, and weights kept negatives by 1 / rate so
probabilities stay calibrated.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import bundle as bundles
from . import schema
from .dnn import DNNConfig, FrozenMLP, train_mlp
from .features import CandidateBatch, FeatureSpec, build_dense, build_sparse
from .gbdt import GBDTConfig, LeafExtractor, train_gbdt
from .hashing import HASH_NAME, collision_rate
from .progress import Progress, warn
from .ranker import StackedRanker
from .vwstack import TaskLearners, VWConfig, learn_text, namespace_values, predict_text, round_hidden
from .vwtext import batch_text

ADAPTIVE_ONLINE_RATE = 0.15     # VW -l online for the adaptive update (its offline pass uses 0.05)
DEFAULT_EV_WEIGHTS = {"click": 1.0, "like": 2.0, "comment": 4.0, "share": 6.0, "hide": -10.0, "dwell": 1.0}


@dataclass(frozen=True)
class TrainConfig:
    gbdt: GBDTConfig = field(default_factory=GBDTConfig)
    dnn: DNNConfig = field(default_factory=DNNConfig)
    vw: VWConfig = field(default_factory=VWConfig)
    slices: tuple[float, float, float] = (0.3, 0.5, 0.2)
    downsample_rate: float = 0.5
    # The optimizer's rate once the bundle learns online; None: FTRL keeps its alpha (its per-coordinate
    # rates already keep old coordinates steady while new posts, authors and user x author pairs learn
    # fast); the adaptive update goes faster than its offline pass so the LR tracks drift.
    online_learning_rate: float | None = None
    ev_weights: dict = field(default_factory=lambda: dict(DEFAULT_EV_WEIGHTS))
    # A first pass over the LR slice with the dense namespaces alone (leaves, DNN, context) before the
    # pass with everything: the ids then learn what the extractors' features leave unexplained instead
    # of sharing what they explain (the global model before the per-id ones, as GLMix fits them).
    dense_warmup: bool = True
    # Before its passes over its own slice, the LR makes one pass with every namespace over the rows of the
    # extractors' slice that downsampling keeps: the ids, id crosses and context tokens then learn from both
    # training slices, as the per-task baselines do; the weights of the leaves and DNN units, which that
    # pass learns on the extractors' own training rows, go on learning in the passes over the LR slice.
    # Only for LRs with ids (the stack): it exists for what the ids learn (docs/evaluation.md, "Learning
    # from both training slices").
    extractor_slice_pass: bool = True
    # After the passes, each task's bias is shifted so the LR's mean prediction on every row of its slice
    # (the negatives downsampling dropped included) equals the slice's label rate: online passes with
    # per-coordinate rates do not end at the slice's level, and under FTRL a kept negative of weight 1/w
    # moves a weight less than 1/w negatives would (on the default world the passes leave share 14% high
    # on its own slice, click and comment 4-7% low).
    refit_biases: bool = True
    chunk: int = 4096
    seed: int = 0

    def __post_init__(self):
        if len(self.slices) != 3 or not (self.slices[0] > 0 and self.slices[1] > 0 and self.slices[2] >= 0) \
                or abs(sum(self.slices) - 1) > 1e-6:
            raise ValueError(f"slices {','.join(map(str, self.slices))}: three fractions that sum to 1, "
                             f"extractors and LR above 0 (extractors, LR, evaluation)")
        if not 0 < self.downsample_rate <= 1:
            raise ValueError(f"downsample rate {self.downsample_rate}: must be in (0, 1]")
        self.vw.with_rate(self.online_rate)    # FTRL refuses an online alpha other than its own

    @property
    def online_rate(self) -> float:
        if self.online_learning_rate is not None:
            return self.online_learning_rate
        return self.vw.rate if self.vw.optimizer == "ftrl" else ADAPTIVE_ONLINE_RATE


def config_key(config: TrainConfig) -> str:
    """A short digest of every training setting (cache keys for bundles trained with defaults)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:10]


def time_slices(ts: np.ndarray, fractions) -> list[np.ndarray]:
    """Row positions of consecutive time slices holding about the given fractions of rows (ties in ``ts``
    keep their order). A slice ends where the timestamp changes nearest its fraction, so that the rows of
    one time (the candidates of one request, a daily batch) fall in one slice; where both changes around
    a cut would empty a slice or move the cut by more than half a slice beside it (a table of a few
    distinct times), the cut stays inside the time (:func:`check_training_slices` warns)."""
    ts = np.asarray(ts)
    order = np.argsort(ts, kind="stable")
    sorted_ts = ts[order]
    bounds = np.round(np.cumsum((0,) + tuple(fractions)) / sum(fractions) * len(order)).astype(int)
    sizes = np.diff(bounds)
    for k in range(1, len(bounds) - 1):
        b = bounds[k]
        if 0 < b < len(order) and sorted_ts[b - 1] == sorted_ts[b]:
            first = int(np.searchsorted(sorted_ts, sorted_ts[b], side="left"))
            after = int(np.searchsorted(sorted_ts, sorted_ts[b], side="right"))
            reach = min(sizes[k - 1], sizes[k]) / 2    # a cut moves by at most half a slice beside it
            nearest = sorted((first, after), key=lambda c: (abs(c - b), c))
            bounds[k] = next((c for c in nearest if bounds[k - 1] < c < bounds[k + 1] and abs(c - b) <= reach), b)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def split_by_time(df: pd.DataFrame, fractions) -> list[pd.DataFrame]:
    """Cut a table into consecutive time slices of about the given fractions of rows (:func:`time_slices`)."""
    return [df.iloc[rows].reset_index(drop=True) for rows in time_slices(df["ts"].to_numpy(), fractions)]


def keep_hash(request_ids, post_ids) -> np.ndarray:
    """Uniform [0, 1) per (request_id, post_id): the deterministic downsampling coin."""
    out = np.empty(len(request_ids))
    for i, (r, p) in enumerate(zip(request_ids, post_ids)):
        d = hashlib.blake2b(f"{r}\x1f{p}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") / 2.0**64
    return out


def downsample(labels: np.ndarray, request_ids, post_ids, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask of kept rows and their importance weights (1 / rate for kept all-negative rows)."""
    if rate >= 1.0:
        return np.ones(len(labels), bool), np.ones(len(labels))
    negative = ~labels.any(axis=1)
    keep = ~negative | (keep_hash(request_ids, post_ids) < rate)
    weights = np.where(negative, 1.0 / rate, 1.0)
    return keep, weights


def downsample_table(df: pd.DataFrame, labels: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`downsample` for the rows of an impression table (``labels``: theirs, [N, T])."""
    return downsample(labels, df["request_id"].to_numpy(object), df["post_id"].to_numpy(object), rate)


def labels_of(df: pd.DataFrame, tasks) -> np.ndarray:
    return np.stack([df[schema.label_column(t)].to_numpy(np.int8) for t in tasks], axis=1)


@dataclass
class Extractors:
    spec: FeatureSpec
    extractor: LeafExtractor
    mlp: FrozenMLP
    booster_path: Path


def train_extractors(df: pd.DataFrame, tasks, config: TrainConfig, workdir: Path,
                     progress: Progress) -> Extractors:
    spec = FeatureSpec.from_table(df)
    X = build_dense(spec, CandidateBatch.from_table(df, spec))
    Y = labels_of(df, tasks)
    any_engagement = Y.any(axis=1).astype(np.float32)
    with progress.task("GBDT (any engagement)", config.gbdt.trees) as bar:
        booster = train_gbdt(X, any_engagement, config.gbdt, progress=lambda i, n: bar.update(1))
    path = workdir / "gbdt.ubj"
    booster.save_model(str(path))
    with progress.task("DNN (multi-task MLP)", config.dnn.epochs) as bar:
        mlp = train_mlp(X, Y, config.dnn, progress=lambda i, n: bar.update(1))
    return Extractors(spec, LeafExtractor(booster, config.gbdt.depth, config.gbdt.threads), mlp, path)


def leaf_dtype(trees: int, node_stride: int):
    """The smallest integer type for leaf features, which run below ``trees * node_stride``: uint16 for
    200 trees of depth 6 (25,600), half the memory of XGBoost's int32 for every row of both training
    slices; int32 past 65,536."""
    return np.uint16 if trees * node_stride <= np.iinfo(np.uint16).max + 1 else np.int32


def stack_features(ex: Extractors, df: pd.DataFrame, values=None, chunk: int = 50_000):
    """Leaves, rounded hidden activations (times the ``d`` value of ``values``), ids and context for
    every row of a table."""
    batch = CandidateBatch.from_table(df, ex.spec)
    X = build_dense(ex.spec, batch)
    ids, ctx = build_sparse(ex.spec, batch)
    small = leaf_dtype(ex.extractor.trees, ex.extractor.node_stride)
    leaves = np.concatenate([ex.extractor.leaves(X[i:i + chunk]).astype(small, copy=False)
                             for i in range(0, len(X), chunk)]) if len(X) else np.zeros((0, ex.extractor.trees), small)
    hidden = round_hidden(ex.mlp.hidden(X), namespace_values(values)["d"])
    return X, leaves, hidden, ids, ctx


ID_NAMESPACES = "upa"


def lr_passes(namespaces: str, config: TrainConfig) -> tuple[str, ...]:
    """The namespaces of each pass the LR makes over its slice: with ``config.dense_warmup``, first all
    but the ids, then ``namespaces``; one pass when the warm-up is off, or the namespaces hold nothing
    but ids or no ids at all."""
    dense = "".join(ns for ns in namespaces if ns not in ID_NAMESPACES)
    return (dense, namespaces) if config.dense_warmup and dense and dense != namespaces else (namespaces,)


def early_pass(namespaces: str, config: TrainConfig) -> bool:
    """Whether the LR first learns the extractors' slice (:attr:`TrainConfig.extractor_slice_pass`): for
    namespaces holding ids."""
    return config.extractor_slice_pass and any(ns in ID_NAMESPACES for ns in namespaces)


def take_rows(feats, rows):
    """The rows ``rows`` of prepared stack features, for the LR (the dense matrix, which it does not read,
    is left out)."""
    return (None,) + tuple(None if x is None else x[rows] for x in feats[1:])


def fit_lr(learners: TaskLearners, feats, Y: np.ndarray, weights: np.ndarray, config: TrainConfig, bar,
           namespaces: str = "ldupac", rows: np.ndarray | None = None, early=None) -> dict | None:
    """Train the LR on the prepared stack features ``feats`` and labels ``Y`` of every row of its slice:
    it learns the rows ``rows`` (those downsampling kept; every row when None) with their importance
    ``weights``, one online pass per entry of :func:`lr_passes`. ``early``, ``(feats, Y, weights)`` of the
    rows downsampling kept in the extractors' slice, is learned first, in one pass with every namespace,
    when :func:`early_pass` says so. With ``config.refit_biases`` the biases are then re-fitted on every
    row of the LR's slice (:func:`refit_biases`); returns what the refit did (None without it). ``bar``
    counts the rows of every pass, then those the refit scores (:func:`lr_work` rows in all)."""
    if len(weights) != (len(Y) if rows is None else len(rows)):
        raise ValueError(f"{len(weights)} importance weights for {len(Y) if rows is None else len(rows)} "
                         "learned rows")
    if early is not None and early_pass(namespaces, config):
        early_feats, early_Y, early_weights = early
        learn_features(learners, early_feats, early_Y, early_weights, config.chunk, bar, namespaces)
    learned = feats if rows is None else take_rows(feats, rows)
    Y_learned = Y if rows is None else Y[rows]
    for pass_namespaces in lr_passes(namespaces, config):
        learn_features(learners, learned, Y_learned, weights, config.chunk, bar, pass_namespaces)
    del learned
    if not config.refit_biases or not len(Y):
        return None
    return refit_biases(learners, feats, Y, namespaces, bar)


def lr_work(namespaces: str, config: TrainConfig, learned: int, slice_rows: int, early: int = 0) -> int:
    """Rows :func:`fit_lr` goes through: the ``early`` rows of the extractors' slice if it learns them,
    ``learned`` rows per pass, then the slice's for the refit."""
    return (early if early_pass(namespaces, config) else 0) + len(lr_passes(namespaces, config)) * learned \
        + (slice_rows if config.refit_biases else 0)


def learn_features(learners: TaskLearners, feats, Y: np.ndarray, weights: np.ndarray, chunk: int,
                   bar, namespaces: str = "ldupac") -> None:
    """One online pass of every task's LR over prepared stack features, ``chunk`` rows at a time."""
    _, leaves, hidden, ids, ctx = feats
    cfg = learners.config
    for a in range(0, len(Y), chunk):
        b = min(a + chunk, len(Y))
        text = batch_text(leaves[a:b], hidden[a:b], ids[a:b], ctx[a:b], cfg.values, namespaces, cfg.interactions)
        learn_text(learners, text, Y[a:b], weights=weights[a:b], score_first=False)
        bar.update(b - a)


def predict_features(learners: TaskLearners, feats, namespaces: str = "ldupac", chunk: int = 8192,
                     bar=None) -> np.ndarray:
    """Every task's probabilities [N, T] from VW itself for prepared stack features (``bar``, if given,
    counts the rows)."""
    _, leaves, hidden, ids, ctx = feats
    cfg = learners.config
    out = []
    for a in range(0, len(ids), chunk):
        out.append(predict_text(learners, batch_text(leaves[a:a + chunk], hidden[a:a + chunk], ids[a:a + chunk],
                                                     ctx[a:a + chunk], cfg.values, namespaces, cfg.interactions)))
        if bar is not None:
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.empty((0, len(learners.tasks)))


def bias_shifts(p: np.ndarray, Y: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Per task, the logit shift b with sum sigmoid(logit(p) + b) = sum y (Newton's method on a monotone
    function); 0 for a task whose rows are all positive or all negative."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    z = np.log(p) - np.log1p(-p)
    out = np.zeros(p.shape[1])
    for k in range(p.shape[1]):
        target = float(Y[:, k].sum())
        if target <= 0 or target >= len(Y):
            continue
        b = 0.0
        for _ in range(iterations):
            q = 1.0 / (1.0 + np.exp(-(z[:, k] + b)))
            f, df = q.sum() - target, float((q * (1 - q)).sum())
            step = float(np.clip(f / max(df, 1e-12), -1.0, 1.0))
            b -= step
            if abs(step) < 1e-7:
                break
        out[k] = b
    return out


def refit_biases(learners: TaskLearners, feats, Y: np.ndarray, namespaces: str = "ldupac", bar=None) -> dict:
    """Shift every task's bias so the LR's mean prediction on ``feats``, every row of its slice, equals
    the rate of ``Y`` (:attr:`TrainConfig.refit_biases`); returns, per task, the shift and the calibration
    (mean prediction / label rate) on the slice before it.

    Every row, not the downsampled rows the LR learned weighted by 1/w: those understate the predictions
    to come, since every kept negative was learned (its ids' weights pulled down by its own label) and
    counts 1/w times (on the default world, under the earlier defaults of a quarter of the negatives
    kept, they put click at 0.85 of its rate where every row puts it at 0.97). Nor the predictions each
    row got before it was learned (progressive validation): the final
    weights are not at the level the learning passed through (docs/evaluation.md, "Calibration")."""
    p = predict_features(learners, feats, namespaces, bar=bar)
    shifts = bias_shifts(p, Y)
    learners.shift_biases(shifts)
    before = p.mean(axis=0) / np.maximum(Y.mean(axis=0), 1e-12)
    return {t: {"shift": round(float(shifts[k]), 6), "slice_calibration": round(float(before[k]), 4)}
            for k, t in enumerate(learners.tasks)}


def learn_lr(learners: TaskLearners, ex: Extractors, df: pd.DataFrame, config: TrainConfig,
             progress: Progress, rate: float | None = None, early_df: pd.DataFrame | None = None) -> dict:
    """Train every task's LR on a table (downsampled; :func:`fit_lr`, which re-fits the biases after its
    last pass), first learning the extractors' slice ``early_df`` if given and configured
    (:attr:`TrainConfig.extractor_slice_pass`); returns counts."""
    tasks = learners.tasks
    rate = config.downsample_rate if rate is None else rate
    Y = labels_of(df, tasks)
    keep, weights = downsample_table(df, Y, rate)
    rows = np.flatnonzero(keep)
    passes = lr_passes("ldupac", config)
    early, early_rows = None, 0
    if early_df is not None and len(early_df) and early_pass("ldupac", config):
        Y_early = labels_of(early_df, tasks)
        keep_early, w_early = downsample_table(early_df, Y_early, rate)
        kept = early_df.iloc[np.flatnonzero(keep_early)].reset_index(drop=True)
        early = (stack_features(ex, kept, config.vw.values), Y_early[keep_early], w_early[keep_early])
        early_rows = len(kept)
    steps = (["extractors' slice"] if early is not None else []) \
        + ([f"{len(passes)} passes"] if len(passes) > 1 else []) + (["bias refit"] if config.refit_biases else [])
    label = "sparse LR (VW, every task" + "".join(f"; {x}" for x in steps) + ")"
    # The refit scores every row of the slice; without it, only the kept rows are featurized.
    table, labels, learned = (df, Y, rows) if config.refit_biases else \
        (df.iloc[rows].reset_index(drop=True), Y[rows], None)
    with progress.task(label, lr_work("ldupac", config, len(rows), len(df), early_rows)) as bar:
        refit = fit_lr(learners, stack_features(ex, table, config.vw.values), labels, weights[rows], config, bar,
                       rows=learned, early=early)
    counts = {"rows": int(len(df)), "kept": int(len(rows)), "rate": rate, "passes": list(passes),
              "extractor_slice_learned": int(early_rows)}
    if refit is not None:
        counts["bias_refit"] = refit
    return counts


def _varying_within_requests(parts: list[pd.DataFrame], columns) -> dict[str, int]:
    """For each of ``columns`` that is not one value within every request of the tables ``parts``, how many
    requests hold more than one (missing values count as one value)."""
    out: dict[str, int] = {}
    for part in parts:
        if not columns or len(part) < 2:
            continue
        codes = pd.factorize(part["request_id"])[0]
        order = np.argsort(codes, kind="stable")
        request = codes[order]                      # each row's request, grouped
        same = request[1:] == request[:-1]
        for col in columns:
            v = part[col].to_numpy(np.float64)[order]
            differs = same & (v[1:] != v[:-1]) & ~(np.isnan(v[1:]) & np.isnan(v[:-1]))
            if differs.any():
                out[col] = out.get(col, 0) + len(np.unique(request[1:][differs]))
    return out


MIN_SLICE_ROWS = 200   # below this a slice cannot fit the trees, the network and the LR's biases


FEW_OUTCOMES = 30   # a task with fewer positives (or negatives) in the LR's slice is warned about


def check_training_slices(parts: list[pd.DataFrame], tasks) -> tuple[tuple[str, ...], list[str]]:
    """The tasks that can be learned from these slices, and warnings about the rest and about what will be
    learned poorly; refuses slices too small, or without a task that has both outcomes.

    ``parts``: the extractors' and the LR's slices (and the test slice, which is not checked)."""
    from .vwstack import MAX_TASKS
    train_rows = len(parts[0]) + len(parts[1])
    if min(len(parts[0]), len(parts[1])) < MIN_SLICE_ROWS:
        raise ValueError(f"{train_rows + sum(len(p) for p in parts[2:]):,} rows are too few to train on: the "
                         f"extractors' and the LR's time slices hold {len(parts[0]):,} and {len(parts[1]):,} "
                         f"rows, and each needs at least {MIN_SLICE_ROWS:,}")
    warnings, kept = [], []
    for task in tasks:
        col = schema.label_column(task)
        # The LR, its bias refit and the base rate learn from the LR slice alone: both outcomes must be there.
        positives, rows = int(parts[1][col].sum()), len(parts[1])
        if positives in (0, rows):
            warnings.append(f"{col}: {'no' if positives == 0 else 'every'} row of the LR's {rows:,} training "
                            f"rows is positive, so {task} is not learned (a task needs both outcomes; "
                            f"{int(parts[0][col].sum()):,} positives among the extractors' {len(parts[0]):,})")
        else:
            kept.append(task)
            if min(positives, rows - positives) < FEW_OUTCOMES:
                fewer = "positives" if positives < rows - positives else "negatives"
                warnings.append(f"{col}: only {min(positives, rows - positives):,} {fewer} among the LR's "
                                f"{rows:,} training rows: {task} is learned from almost nothing, and its "
                                "offline figures are mostly noise")
    if not kept:
        raise ValueError(f"no task has both outcomes in the LR's {len(parts[1]):,} training rows: "
                         + "; ".join(warnings))
    if len(kept) > MAX_TASKS:
        raise ValueError(f"{len(kept)} tasks ({', '.join(schema.label_column(t) for t in kept)}): one stack "
                         f"learns at most {MAX_TASKS}; leave the others' label columns out of the table")
    warnings += [f"{schema.label_column(t)}: not an event kind ({', '.join(schema.TASKS)}), so the online "
                 f"learner will see no engagement for it" for t in kept if t not in schema.TASKS]
    empty = [c for c in schema.feature_columns(parts[0].columns) if parts[0][c].isna().all()]
    if empty:
        warnings.append(f"{', '.join(empty)}: no value in the extractors' slice (the earliest "
                        f"{len(parts[0]):,} rows), so the GBDT and the DNN learn nothing from "
                        f"{'them' if len(empty) > 1 else 'it'}; default 0")
    if "position" not in parts[0].columns:
        warnings.append("no position column: every impression is taken as shown at the top, so position "
                        "bias is not learned and lower slots' lower engagement is read as the posts' own")
    names = ("extractors'", "LR's", "test")
    for k in range(len(parts) - 1):
        if len(parts[k]) and len(parts[k + 1]) and parts[k]["ts"].max() >= parts[k + 1]["ts"].min():
            warnings.append(f"the {names[k]} and the {names[k + 1]} slices share the time "
                            f"{int(parts[k + 1]['ts'].min())}: the table has too few distinct times to cut "
                            "between them, so rows of that time fall on both sides")
    absent = [c for c in schema.CONTEXT_COLUMNS if c not in parts[0].columns]
    if absent:
        warnings.append(f"no {' or '.join(absent)} column: every impression is taken as without that context "
                        "(\"\", as a Rank request that does not give it), so its effect is not learned")
    unread = [c for c in parts[0].columns if c not in schema.KEY_COLUMNS + schema.CONTEXT_COLUMNS
              and not c.startswith((schema.FEATURE_PREFIX, schema.LABEL_PREFIX, schema.TRUE_PREFIX))]
    if unread:
        warnings.append(f"{', '.join(unread[:6])}{' and others' if len(unread) > 6 else ''}: not read (features "
                        f"are f.<name>, tasks label.<task>, context {' and '.join(schema.CONTEXT_COLUMNS)})")
    varying = _varying_within_requests(parts[:2], [c for c in schema.feature_columns(parts[0].columns)
                                                   if c.startswith(schema.FEATURE_PREFIX + "user.")])
    for col, requests in varying.items():
        warnings.append(f"{col}: differs between the rows of {requests:,} requests, but a Rank request gives a "
                        "user feature once for all its candidates (a per-candidate value is named without user.)")
    keys = pd.concat([p[["request_id", "post_id"]] for p in parts], ignore_index=True)
    repeated = int(keys.duplicated().sum())
    if repeated:
        warnings.append(f"{repeated:,} rows repeat another row's (request_id, post_id): an impression should "
                        "appear once, or it is learned as often as it appears")
    return tuple(kept), warnings


def _writable(out_dir) -> Path:
    """``out_dir``, once it is sure that writing a bundle there replaces nothing but a bundle."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / bundles.MANIFEST).is_file() and \
            (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not a bundle; a bundle is written to a new or empty "
                         f"directory, or over another bundle")
    return out_dir


def write_bundle(out_dir: Path, ex: Extractors, learners: TaskLearners, config: TrainConfig,
                 meta: dict) -> Path:
    """Write a complete, checksummed bundle directory and return its path."""
    out_dir = _writable(out_dir)
    tmp = bundles.staging_dir(out_dir)
    try:
        return _write_bundle(out_dir, tmp, ex, learners, config, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)    # gone unless it became the bundle


def _write_bundle(out_dir: Path, tmp: Path, ex: Extractors, learners: TaskLearners, config: TrainConfig,
                  meta: dict) -> Path:
    (tmp / "vw").mkdir()
    shutil.copyfile(ex.booster_path, tmp / "gbdt.ubj")
    ex.mlp.save(tmp / "dnn.npz")
    learners.save(tmp / bundles.VW_MODEL)
    weights = learners.weights()
    bundles.save_sparse_weights(tmp / "lr_weights.npz", weights)
    nonzero = int(np.count_nonzero(weights))
    used_rows = int(np.any(weights != 0, axis=1).sum())
    manifest = {
        "bundle_id": meta.pop("bundle_id", None) or bundles.new_bundle_id(),
        "created_at": int(time.time() * 1000),
        "feature_spec": ex.spec.to_dict(),
        "tasks": list(learners.tasks),
        "ev_weights": {t: config.ev_weights.get(t, 0.0) for t in learners.tasks},
        "gbdt": {**asdict(config.gbdt), "node_stride": ex.extractor.node_stride,
                 "target": "any_engagement", "shared_across_tasks": True},
        "dnn": {**asdict(config.dnn), "hidden_size": ex.mlp.hidden_size,
                "inputs_clipped_to_training_range": ex.mlp.lo is not None},
        "vw": {"bits": config.vw.bits, "hash_seed": config.vw.hash_seed, "args": config.vw.args(),
               **config.vw.to_dict(), "online_learning_rate": config.online_rate,
               "interactions": list(config.vw.interactions),
               "shared_tasks": [t for t, on in zip(learners.tasks, learners.shared) if on],
               "namespace_hashes": learners.namespace_hashes(), "nonzero_weights": nonzero,
               "rows_used": used_rows, "expected_collision_rate": collision_rate(used_rows, config.vw.bits - 3)},
        "id_hash": HASH_NAME,
        "downsampling": {"rate": config.downsample_rate, "method": "importance weight 1/rate on "
                         "kept all-negative rows, kept by blake2b(request_id, post_id)"},
        **meta,
    }
    bundles.finalize(tmp, manifest)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def train_bundle(df: pd.DataFrame, out_dir, config: TrainConfig = TrainConfig(),
                 tasks=None, progress: Progress | None = None, evaluate_slice: bool = True) -> Path:
    """Train the full stack on a table of impressions and write a bundle."""
    from .metrics import normalized_entropy, task_metrics

    _writable(out_dir)
    progress = progress or Progress()
    tasks = tuple(tasks or schema.tasks_in(df.columns))
    started = time.time()
    parts = split_by_time(df, config.slices if evaluate_slice else config.slices[:2])
    asked = tasks
    tasks, warnings = check_training_slices(parts, tasks)
    unweighted = [t for t in tasks if t not in config.ev_weights]
    if unweighted:
        warnings.append(f"{', '.join(schema.label_column(t) for t in unweighted)}: no EV weight "
                        f"(TrainConfig.ev_weights), so {'it weighs' if len(unweighted) == 1 else 'they weigh'} 0 "
                        "in Rank's order unless a request's task_weights gives one")
    for w in warnings:
        warn(w)
    with tempfile.TemporaryDirectory() as work:
        ex = train_extractors(parts[0], tasks, config, Path(work), progress)
        learners = TaskLearners(tasks, config.vw)
        counts = learn_lr(learners, ex, parts[1], config, progress, early_df=parts[0])
        wall = time.time() - started
        meta = {
            "training": {"rows_per_slice": {"extractors": len(parts[0]), "lr": len(parts[1]),
                                            "lr_kept_after_downsampling": counts["kept"],
                                            # rows of the extractors' slice the LR learned first
                                            "lr_early_pass_over_extractors": counts["extractor_slice_learned"],
                                            "test": len(parts[2]) if evaluate_slice else 0},
                         "lr_passes": counts["passes"],
                         "lr_extractor_slice_pass": config.extractor_slice_pass,
                         **({"lr_bias_refit": counts["bias_refit"]} if "bias_refit" in counts else {}),
                         "time_range_ms": [int(parts[0]["ts"].min()), int(parts[1]["ts"].max())],
                         "wall_time_s": round(wall, 2), **({"warnings": warnings} if warnings else {}),
                         **({"tasks_left_out": [t for t in asked if t not in tasks]} if len(tasks) < len(asked)
                            else {})},
        }
        if evaluate_slice and len(parts[2]):
            test = parts[2]
            progress.note(f"scoring the test slice ({len(test):,} rows)")
            feats = stack_features(ex, test, config.vw.values)
            p = predict_features(learners, feats)
            base = labels_of(parts[1], tasks).mean(axis=0)
            Y = labels_of(test, tasks)
            outside = ex.mlp.out_of_range(feats[0]) / len(test)
            meta["offline_metrics"] = {
                "test_rows": len(test),
                "test_time_range_ms": [int(test["ts"].min()), int(test["ts"].max())],
                # base_rate_ne: the NE of predicting the training base rate for every test row, the
                # model's yardstick (above 1 when the test slice's rate has moved away from training's).
                "tasks": {t: {**task_metrics(Y[:, k], p[:, k], base[k]),
                              "base_rate_ne": normalized_entropy(Y[:, k], np.full(len(Y), base[k]), base[k])}
                          for k, t in enumerate(tasks)},
                # Share of the test slice's rows with each dense input outside the DNN's training range.
                "inputs_out_of_range": {ex.spec.dense_names[j]: round(float(outside[j]), 6)
                                        for j in np.flatnonzero(outside)}}
        out = write_bundle(Path(out_dir), ex, learners, config, meta)
        learners.close()
    return out


__all__ = ["TrainConfig", "train_bundle", "split_by_time", "downsample", "StackedRanker"]
