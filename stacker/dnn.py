"""The multi-task MLP: trained with scikit-learn, frozen to a ``.npz``, run with numpy alone.

Shared hidden layers (ReLU) and one sigmoid output per task. Once frozen, the last hidden layer is a
feature block of the sparse LR; the serving path never imports scikit-learn.

The frozen network clips every input to the range it was trained on before standardizing it. A
feature that barely varies over the training rows (the time of day when a bundle learns from a few
minutes of a served log, a count that only grows) has a tiny standard deviation, and standardized
values far outside anything the network saw would move its hidden layer, and with it every task's
LR, as time goes on. Clipped, such a feature holds at the edge of what the network learned.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class DNNConfig:
    hidden: tuple[int, ...] = (128, 32)
    epochs: int = 8
    batch_size: int = 512
    learning_rate: float = 1e-3
    l2: float = 1e-5
    seed: int = 0


def fit_mlp(X: np.ndarray, Y: np.ndarray, config: DNNConfig, progress=None):
    """Fit the multi-task MLP on X [N, D], Y [N, T] (0/1); returns (scaler, sklearn model, (min, max) of
    each input over X)."""
    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X).astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=config.hidden, activation="relu", solver="adam",
                        alpha=config.l2, batch_size=config.batch_size,
                        learning_rate_init=config.learning_rate, max_iter=1, warm_start=True,
                        random_state=config.seed, shuffle=True)
    # One task: a 1-d target (the same single logistic output; a column vector makes sklearn warn).
    target = Y.ravel() if Y.ndim == 2 and Y.shape[1] == 1 else Y
    others = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)    # (the later filter is matched first)
        for epoch in range(config.epochs):
            mlp.fit(Xs, target)
            # scikit-learn catches Ctrl-C inside an epoch, warns and returns the half-trained network: stop
            # here as everywhere else instead of training on and writing a bundle from it.
            if any("interrupted by user" in str(w.message) for w in caught):
                raise KeyboardInterrupt
            others += caught
            caught.clear()
            if progress:
                progress(epoch + 1, config.epochs)
    for w in others:                     # every other warning goes on to the caller
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return scaler, mlp, (X.min(axis=0), X.max(axis=0))


def freeze(scaler: StandardScaler, mlp: MLPClassifier, bounds=None) -> "FrozenMLP":
    """Export a fitted scaler + MLP (and the inputs' training range, see :func:`fit_mlp`) to the
    numpy-only :class:`FrozenMLP`."""
    lo, hi = bounds if bounds is not None else (None, None)
    return FrozenMLP(scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32),
                     [w.astype(np.float32) for w in mlp.coefs_],
                     [b.astype(np.float32) for b in mlp.intercepts_],
                     lo=None if lo is None else np.asarray(lo, np.float32),
                     hi=None if hi is None else np.asarray(hi, np.float32))


def train_mlp(X: np.ndarray, Y: np.ndarray, config: DNNConfig, progress=None) -> "FrozenMLP":
    """Fit and freeze in one step."""
    return freeze(*fit_mlp(X, Y, config, progress))


class FrozenMLP:
    """Numpy forward pass of a frozen MLP; ``lo``/``hi``: the range each input is clipped to (the
    training rows' minimum and maximum; ``None`` in networks frozen without it: no clipping)."""

    def __init__(self, mean, scale, weights, biases, lo=None, hi=None):
        self.mean, self.scale = mean, scale
        self.weights, self.biases = weights, biases
        self.lo, self.hi = lo, hi
        self.hidden_size = weights[-1].shape[0]

    def hidden(self, X: np.ndarray) -> np.ndarray:
        """Activations of the last hidden layer [N, H] (float32)."""
        X = np.asarray(X, np.float32)
        if self.lo is not None:
            X = np.clip(X, self.lo, self.hi)
        h = (X - self.mean) / self.scale
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = h @ w
            h += b
            np.maximum(h, 0.0, out=h)
        return h

    def out_of_range(self, X: np.ndarray) -> np.ndarray:
        """Per input column, how many rows of ``X`` lie outside the training range (and are clipped):
        int64 [D], zeros for a network frozen without its range."""
        if self.lo is None:
            return np.zeros(self.mean.shape[0], np.int64)
        X = np.asarray(X, np.float32)
        return ((X < self.lo) | (X > self.hi)).sum(axis=0)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Per-task probabilities [N, T] from the network's own output layer."""
        z = self.hidden(X) @ self.weights[-1] + self.biases[-1]
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    def save(self, path) -> None:
        arrays = {"mean": self.mean, "scale": self.scale}
        if self.lo is not None:
            arrays["lo"], arrays["hi"] = self.lo, self.hi
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"W{i}"], arrays[f"b{i}"] = w, b
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path) -> "FrozenMLP":
        with np.load(path) as z:
            layers = sum(1 for k in z.files if k.startswith("W"))
            bounded = "lo" in z.files and "hi" in z.files
            if bounded != ("lo" in z.files or "hi" in z.files):
                raise ValueError(f"{path}: holds only one of the inputs' range arrays lo, hi")
            return cls(z["mean"], z["scale"], [z[f"W{i}"] for i in range(layers)],
                       [z[f"b{i}"] for i in range(layers)],
                       lo=z["lo"] if bounded else None, hi=z["hi"] if bounded else None)
