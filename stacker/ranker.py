"""The transport-neutral ranker: one user, N candidates, per-task probabilities in one pass."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle as bundles
from .dnn import FrozenMLP
from .features import CandidateBatch, FeatureSpec, build_dense, build_sparse
from .gbdt import LeafExtractor
from .vwstack import SLOTS, SparseScorer, VWConfig, example_lines, round_hidden


@dataclass
class StackFeatures:
    """Everything the sparse LR reads for N candidates."""

    dense: np.ndarray
    leaves: np.ndarray
    hidden: np.ndarray
    ids: np.ndarray
    context: np.ndarray
    values: dict | None = None       # each namespace's feature value (the bundle's VW ``values``)
    interactions: tuple = ()         # the bundle's id crosses

    def vw_lines(self) -> list[str]:
        return example_lines(self.leaves, self.hidden, self.ids, self.context, values=self.values,
                             interactions=self.interactions)


class StackedRanker:
    """GBDT leaves + frozen DNN hidden layer + per-task sparse LR, loaded from a bundle.

    ``predict`` is the serving path (numpy copy of the VW weights); ``apply_update`` swaps in
    weights the online learner published, between requests.
    """

    def __init__(self, manifest: dict, extractor: LeafExtractor, mlp: FrozenMLP, scorer: SparseScorer,
                 path: Path | None = None):
        self.manifest = manifest
        self.path = path
        self.spec = FeatureSpec.from_dict(manifest["feature_spec"])
        self.tasks = tuple(manifest["tasks"])
        self.ev_weights = dict(manifest["ev_weights"])
        self.bundle_id = manifest["bundle_id"]
        self.update_seq = 0
        self.covered_offset = -1
        self.extractor, self.mlp, self.scorer = extractor, mlp, scorer

    @classmethod
    def load(cls, path, threads: int = 2) -> "StackedRanker":
        path = Path(path)
        manifest = bundles.verify(path)
        try:
            extractor = LeafExtractor.load(path / "gbdt.ubj", manifest["gbdt"]["depth"], threads)
            mlp = FrozenMLP.load(path / "dnn.npz")
            weights = bundles.load_sparse_weights(path / "lr_weights.npz")
        except Exception as e:  # a file that passed its checksum but does not parse
            raise bundles.BundleError(f"{path}: cannot load model files ({e})") from e
        vw = manifest["vw"]
        if weights.shape != (1 << (vw["bits"] - 3), SLOTS):
            raise bundles.BundleError(f"{path / 'lr_weights.npz'}: shape {weights.shape} does not match "
                                      f"-b {vw['bits']} (expected {(1 << (vw['bits'] - 3), SLOTS)})")
        n_dense = len(FeatureSpec.from_dict(manifest["feature_spec"]).dense_names)
        ranges = "" if mlp.lo is None else f" ({mlp.lo.shape[0]} and {mlp.hi.shape[0]} input bounds)"
        if mlp.mean.shape[0] != n_dense or (mlp.lo is not None and not mlp.lo.shape == mlp.hi.shape == mlp.mean.shape):
            raise bundles.BundleError(f"{path / 'dnn.npz'}: expects {mlp.mean.shape[0]} inputs{ranges}, the "
                                      f"feature spec has {n_dense}")
        clipped = manifest.get("dnn", {}).get("inputs_clipped_to_training_range")
        if clipped is not None and clipped != (mlp.lo is not None):
            raise bundles.BundleError(f"{path / 'dnn.npz'}: the manifest says inputs_clipped_to_training_range "
                                      f"{clipped}, the file {'holds' if mlp.lo is not None else 'lacks'} the ranges")
        if extractor.trees != manifest["gbdt"]["trees"]:
            raise bundles.BundleError(f"{path / 'gbdt.ubj'}: has {extractor.trees} trees, manifest "
                                      f"says {manifest['gbdt']['trees']}")
        scorer = SparseScorer(weights, vw["namespace_hashes"], VWConfig.from_dict(vw), manifest["tasks"],
                              leaf_space=extractor.trees * extractor.node_stride)
        return cls(manifest, extractor, mlp, scorer, path)

    @property
    def version(self) -> str:
        return f"{self.bundle_id}+{self.update_seq}"

    def features(self, batch: CandidateBatch, timings: dict | None = None) -> StackFeatures:
        t0 = time.perf_counter()
        dense = build_dense(self.spec, batch)
        ids, ctx = build_sparse(self.spec, batch)
        t1 = time.perf_counter()
        leaves = self.extractor.leaves(dense)
        t2 = time.perf_counter()
        hidden = round_hidden(self.mlp.hidden(dense), self.scorer.values["d"])
        t3 = time.perf_counter()
        if timings is not None:
            timings["features"] = timings.get("features", 0.0) + (t1 - t0)
            timings["gbdt"] = timings.get("gbdt", 0.0) + (t2 - t1)
            timings["dnn"] = timings.get("dnn", 0.0) + (t3 - t2)
        return StackFeatures(dense, leaves, hidden, ids, ctx, self.scorer.values, self.scorer.interactions)

    def predict_features(self, f: StackFeatures, timings: dict | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        p = self.scorer.predict(f.leaves, f.hidden, f.ids, f.context)
        if timings is not None:
            timings["lr"] = timings.get("lr", 0.0) + (time.perf_counter() - t0)
        return p

    def predict(self, batch: CandidateBatch, timings: dict | None = None) -> np.ndarray:
        """Per-task probabilities [N, T] for every candidate of the batch."""
        return self.predict_features(self.features(batch, timings), timings)

    def ev(self, probs: np.ndarray, weights: dict | None = None) -> np.ndarray:
        """Expected engagement value Σ w_task · P(task)."""
        w = dict(self.ev_weights, **(weights or {}))
        return probs @ np.array([w.get(t, 0.0) for t in self.tasks])

    def apply_update(self, rows: np.ndarray, values: np.ndarray, update_seq: int,
                     covered_offset: int | None = None) -> None:
        """Overwrite weight rows [K] with values [K, 8] published by the online learner."""
        self.scorer.weights[rows] = values
        self.scorer.refresh()
        self.update_seq = update_seq
        if covered_offset is not None:
            self.covered_offset = max(self.covered_offset, int(covered_offset))
