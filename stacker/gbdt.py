"""Gradient-boosted trees (XGBoost) as a feature extractor: the leaf each tree sends a row to.

``pred_leaf`` returns node ids (0 .. 2**(depth+1) - 2), not leaf positions, so tree ``t`` landing in
node ``n`` becomes the integer feature ``t * 2**(depth+1) + n``: one active feature per tree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xgboost as xgb


@dataclass(frozen=True)
class GBDTConfig:
    trees: int = 200
    depth: int = 6
    learning_rate: float = 0.1
    min_child_weight: float = 5.0
    subsample: float = 0.8
    threads: int = 2
    seed: int = 0

    def params(self) -> dict:
        return {"objective": "binary:logistic", "eval_metric": "logloss", "tree_method": "hist",
                "max_depth": self.depth, "eta": self.learning_rate, "subsample": self.subsample,
                "min_child_weight": self.min_child_weight, "nthread": self.threads, "seed": self.seed,
                "max_bin": 128}


def train_gbdt(X: np.ndarray, y: np.ndarray, config: GBDTConfig, weight: np.ndarray | None = None,
               progress=None) -> xgb.Booster:
    """Train a binary GBDT; ``progress(i, total)`` is called after each tree."""
    dtrain = xgb.DMatrix(X, label=y, weight=weight, nthread=config.threads)
    callbacks = [_Progress(progress, config.trees)] if progress else None
    return xgb.train(config.params(), dtrain, num_boost_round=config.trees, callbacks=callbacks)


class _Progress(xgb.callback.TrainingCallback):
    def __init__(self, report, total):
        self.report, self.total = report, total

    def after_iteration(self, model, epoch, evals_log):
        self.report(epoch + 1, self.total)
        return False


class LeafExtractor:
    """Maps dense rows to integer leaf features [N, trees]."""

    def __init__(self, booster: xgb.Booster, depth: int, threads: int = 2):
        self.booster = booster
        self.depth = depth
        self.node_stride = 1 << (depth + 1)
        self.threads = threads
        self.booster.set_param({"nthread": threads})
        self.trees = booster.num_boosted_rounds()
        self._offsets = np.arange(self.trees, dtype=np.int32) * self.node_stride

    def leaves(self, X: np.ndarray) -> np.ndarray:
        nodes = self.booster.predict(xgb.DMatrix(X, nthread=self.threads), pred_leaf=True)
        return nodes.astype(np.int32).reshape(len(X), self.trees) + self._offsets

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.booster.inplace_predict(X)

    @classmethod
    def load(cls, path, depth: int, threads: int = 2) -> "LeafExtractor":
        booster = xgb.Booster()
        booster.load_model(str(path))
        return cls(booster, depth, threads)
