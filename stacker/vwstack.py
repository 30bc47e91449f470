"""The sparse logistic regressions on top: one Vowpal Wabbit workspace per task.

Namespaces (first letters distinct, since ``-q`` crosses by first letter): ``l`` tree leaves,
``d`` DNN last hidden layer, ``u`` user id, ``p`` post id, ``a`` author id, ``c`` context tokens.

The LRs learn with FTRL-proximal (per-coordinate rates alpha / (beta + sqrt(sum g^2)), McMahan et al.):
unlike VW's default adaptive update, whose first step on a coordinate has the same size for a click
and a non-click, its first steps follow the gradient, so a user x author pair seen a handful of times
learns from its clicks. VW has no per-namespace learning rate; each namespace's features carry a fixed
value instead (``VWConfig.values``, written once on the namespace marker, ``|l:0.05``), and a feature
of value v learns about v^2 times as fast: the 200 always-active leaves learn slowly, ids fast. DNN
activations are multiplied by the ``d`` value before they are written.

All feature names are integers, so an example's weight indices are computable outside VW:
``(name + hash_space(ns)) & 0xFFFFFFFF`` masked to ``-b`` bits; a cross ``-q xy`` of strided indices
``i_x, i_y`` is ``(16777619 * i_x) ^ i_y``; the constant is ``11650396``. :class:`SparseScorer`
scores from a numpy copy of the weights with exactly this hashing — the serving path — and the
bundle tests check it against VW's own predictions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

NAMESPACES = {"leaves": "l", "dnn": "d", "user": "u", "post": "p", "author": "a", "context": "c"}
DNN_DECIMALS = 4
_CONSTANT = 11650396
_FNV = np.uint64(16777619)
_M32 = np.uint64(0xFFFFFFFF)


DEFAULT_VALUES = (("l", 0.05), ("d", 0.1), ("u", 1.2), ("p", 1.2), ("a", 1.5), ("c", 1.0))
UNIT_VALUES = (("l", 1.0), ("d", 1.0), ("u", 1.0), ("p", 1.0), ("a", 1.0), ("c", 1.0))


@dataclass(frozen=True)
class VWConfig:
    bits: int = 24
    interactions: tuple[str, ...] = ("ua", "up")
    hash_seed: int = 0
    optimizer: str = "ftrl"               # "ftrl" or VW's default "adaptive"
    ftrl_alpha: float = 0.1
    ftrl_beta: float = 1.0
    learning_rate: float = 0.05           # -l and --power_t of the adaptive optimizer
    power_t: float = 0.5
    l2: float = 0.0
    values: tuple[tuple[str, float], ...] = DEFAULT_VALUES   # value of each namespace's features

    def __post_init__(self):
        if self.optimizer not in ("ftrl", "adaptive"):
            raise ValueError(f"unknown VW optimizer {self.optimizer!r} (ftrl or adaptive)")

    @property
    def rate(self) -> float:
        """The optimizer's step size: FTRL's alpha, or the adaptive optimizer's -l."""
        return self.ftrl_alpha if self.optimizer == "ftrl" else self.learning_rate

    def with_rate(self, rate: float) -> "VWConfig":
        """The same settings at another step size, to resume a model with (online learning).

        FTRL keeps its alpha: its weights are -z * alpha / (beta + sqrt(n)), so resuming a model with
        another alpha would rescale every learned weight at once."""
        if self.optimizer == "adaptive":
            return replace(self, learning_rate=rate)
        if rate != self.ftrl_alpha:
            raise ValueError(f"an FTRL model resumes with its own alpha ({self.ftrl_alpha:g}), not {rate:g}: "
                             "another alpha would rescale every learned weight")
        return self

    def args(self) -> str:
        q = " ".join(f"-q {pair}" for pair in self.interactions)
        opt = (f"--ftrl --ftrl_alpha {self.ftrl_alpha:g} --ftrl_beta {self.ftrl_beta:g}"
               if self.optimizer == "ftrl" else f"-l {self.learning_rate:g} --power_t {self.power_t:g}")
        return (f"--quiet -b {self.bits} --loss_function logistic --link logistic --save_resume "
                f"--hash_seed {self.hash_seed} {opt} --l2 {self.l2:g} {q}").strip()

    def to_dict(self) -> dict:
        return {"optimizer": self.optimizer, "ftrl_alpha": self.ftrl_alpha, "ftrl_beta": self.ftrl_beta,
                "learning_rate": self.learning_rate, "power_t": self.power_t, "l2": self.l2,
                "values": dict(self.values)}


def namespace_values(values) -> dict[str, float]:
    """Per-namespace feature values as a dict (missing namespaces, and ``None``, are 1)."""
    out = dict(UNIT_VALUES)
    out.update(dict(values or {}))
    return out


def round_hidden(hidden: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """DNN activations times the ``d`` value, as VW reads them back from text (fixed decimals)."""
    return np.round(hidden.astype(np.float64) * scale, DNN_DECIMALS).astype(np.float32)


def namespace_marker(ns: str, value: float) -> str:
    """``|l`` or ``|l:0.05``: VW multiplies every feature of the namespace by the marker's value."""
    return f"|{ns}" if value == 1.0 else f"|{ns}:{value:g}"


def example_lines(leaves: np.ndarray, hidden: np.ndarray, ids: np.ndarray, ctx: np.ndarray,
                  namespaces: str = "ldupac", values=None) -> list[str]:
    """VW text lines (no label) for N rows; ``hidden`` must already be rounded (and scaled).

    ``namespaces`` selects the blocks written (letters of :data:`NAMESPACES`), so ablations such as
    leaves-only or ids-only LRs use the same writer; ``values`` gives each namespace's feature value
    (written once, on the namespace marker; the DNN block carries its scaled activations instead).
    """
    v = namespace_values(values)
    m = {k: namespace_marker(k, x) for k, x in v.items() if k != "d"}
    fmt = f"{{}}:{{:.{DNN_DECIMALS}f}}"
    lines = []
    for i in range(len(ids)):
        parts = []
        if "l" in namespaces:
            parts.append(f"{m['l']} " + " ".join(map(str, leaves[i].tolist())))
        if "d" in namespaces:
            h = hidden[i]
            parts.append("|d " + " ".join(fmt.format(j, h[j]) for j in np.flatnonzero(h)))
        if "u" in namespaces:
            parts.append(f"{m['u']} {ids[i, 0]}")
        if "p" in namespaces:
            parts.append(f"{m['p']} {ids[i, 1]}")
        if "a" in namespaces:
            parts.append(f"{m['a']} {ids[i, 2]}")
        if "c" in namespaces:
            parts.append(f"{m['c']} " + " ".join(map(str, ctx[i].tolist())))
        lines.append(" ".join(parts))
    return lines


class SparseScorer:
    """Scores examples from a numpy copy of the per-task VW weights (un-strided, [2**bits, T])."""

    def __init__(self, weights: np.ndarray, ns_hash: dict[str, int], bits: int, interactions,
                 leaf_space: int | None = None, values=None):
        self.weights = weights
        self.values = namespace_values(values)
        self.ns_hash = {k: np.uint64(v) for k, v in ns_hash.items()}
        self.bits = bits
        self.interactions = tuple(interactions)
        self._mask = np.uint64((1 << bits) - 1)
        self._smask = np.uint64((1 << (bits + 2)) - 1)
        self._constant = _CONSTANT & ((1 << bits) - 1)
        # Leaf features take only trees * 2**(depth+1) values: keep their weights in a compact table
        # (~0.6 MB, cache-resident) instead of gathering 200 rows per candidate from the full table.
        self._leaf_rows = None if leaf_space is None else \
            (self._hashed("l", np.arange(leaf_space)) & self._mask).astype(np.intp)
        self._leaf_table = None
        self.refresh()

    def refresh(self) -> None:
        """Rebuild derived tables after the weights changed (online updates)."""
        if self._leaf_rows is not None:
            self._leaf_table = self.weights[self._leaf_rows]

    def _hashed(self, ns: str, names: np.ndarray) -> np.ndarray:
        return (names.astype(np.uint64) + self.ns_hash[ns]) & _M32

    def namespace_features(self, leaves, ids, ctx) -> dict[str, np.ndarray]:
        """32-bit hashed indices per namespace letter, each [N, k] (binary features only)."""
        return {"l": self._hashed("l", leaves), "u": self._hashed("u", ids[:, 0:1]),
                "p": self._hashed("p", ids[:, 1:2]), "a": self._hashed("a", ids[:, 2:3]),
                "c": self._hashed("c", ctx)}

    def binary_indices(self, leaves, ids, ctx, include_leaves: bool = True) -> np.ndarray:
        """Weight-table rows of every binary feature [N, F] (leaves, ids, context, crosses, constant)."""
        ns = self.namespace_features(leaves, ids, ctx)
        parts = [ns[k] & self._mask for k in (("l", "u", "p", "a", "c") if include_leaves else ("u", "p", "a", "c"))]
        for x, y in self.interactions:
            ix = (ns[x] << np.uint64(2))[:, :, None]
            iy = (ns[y] << np.uint64(2))[:, None, :]
            cross = (((_FNV * ix) ^ iy) & self._smask) >> np.uint64(2)
            parts.append(cross.reshape(len(leaves), -1))
        parts.append(np.full((len(leaves), 1), self._constant, np.uint64))
        return np.concatenate(parts, axis=1).astype(np.intp)

    def binary_values(self, n_leaves: int, n_ctx: int, include_leaves: bool = True) -> np.ndarray | None:
        """The feature value of each column of :meth:`binary_indices` (``None`` when all are 1)."""
        v = self.values
        width = {"l": n_leaves, "u": 1, "p": 1, "a": 1, "c": n_ctx}
        cols = [np.full(width[k], v[k]) for k in (("l", "u", "p", "a", "c") if include_leaves else ("u", "p", "a", "c"))]
        cols += [np.full(width[x] * width[y], v[x] * v[y]) for x, y in self.interactions]
        cols.append(np.ones(1))
        out = np.concatenate(cols)
        return None if np.all(out == 1.0) else out

    def dnn_indices(self, hidden_size: int) -> np.ndarray:
        return (self._hashed("d", np.arange(hidden_size)) & self._mask).astype(np.intp)

    def logits(self, leaves, hidden, ids, ctx) -> np.ndarray:
        """Raw scores [N, T]; ``hidden`` must be rounded like the text VW learned from."""
        table = self._leaf_table
        rows = self.binary_indices(leaves, ids, ctx, include_leaves=table is None)
        # Gather [N, F, T], then sum over a contiguous last axis: ~3x faster than summing axis 1.
        gathered = np.ascontiguousarray(np.take(self.weights, rows, axis=0).transpose(0, 2, 1))
        values = self.binary_values(leaves.shape[1], ctx.shape[1], include_leaves=table is None)
        z = gathered.sum(axis=2, dtype=np.float64) if values is None else gathered.astype(np.float64) @ values
        if table is not None:
            leaf = np.ascontiguousarray(np.take(table, leaves, axis=0).transpose(0, 2, 1))
            z += self.values["l"] * leaf.sum(axis=2, dtype=np.float64)
        z += hidden.astype(np.float64) @ self.weights[self.dnn_indices(hidden.shape[1])]
        return z

    def predict(self, leaves, hidden, ids, ctx) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(leaves, hidden, ids, ctx)))


def workspace_weights(workspace, bits: int) -> np.ndarray:
    """Dense float32 copy (un-strided) of a workspace's non-zero weights."""
    entries = json.loads(workspace.json_weights())["weights"]
    out = np.zeros(1 << bits, dtype=np.float32)
    if entries:
        idx = np.fromiter((e["index"] for e in entries), dtype=np.int64, count=len(entries))
        val = np.fromiter((e["value"] for e in entries), dtype=np.float32, count=len(entries))
        out[idx] = val
    return out


def namespace_hashes(workspace) -> dict[str, int]:
    return {ns: int(workspace.hash_space(ns)) for ns in NAMESPACES.values()}


class TaskLearners:
    """One VW workspace per task, learning from one parsed example per row.

    Rows are parsed once (by the first workspace) and learned by every task's workspace with that
    task's label; VW leaves the pre-update prediction on the example, which is what progressive
    validation needs. Importance weights carry negative downsampling (1 / rate on kept negatives).
    """

    def __init__(self, tasks, config: VWConfig, model_paths: dict | None = None):
        import pylibvw  # noqa: F401  (import here: the serving path never needs pylibvw)
        from vowpalwabbit import pyvw

        self._pylibvw = pylibvw
        self.tasks = tuple(tasks)
        self.config = config
        self.workspaces = []
        for task in self.tasks:
            args = config.args()
            if model_paths and task in model_paths:
                args += f" -i {model_paths[task]}"
            self.workspaces.append(pyvw.Workspace(args))

    def pretouch(self) -> None:
        """Touch one weight per page so the first updates do not pay for page faults."""
        step = 4096 // 16
        for ws in self.workspaces:
            for i in range(0, 1 << self.config.bits, step):
                ws.set_weight(i, 0, ws.get_weight(i))

    def learn(self, lines: list[str], labels: np.ndarray, learn_mask: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> np.ndarray:
        """Learn rows (labels [N, T] in 0/1); returns the pre-update probabilities [N, T]."""
        lib, first = self._pylibvw, self.workspaces[0]
        n, t = labels.shape
        preds = np.full((n, t), np.nan)
        w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        # Parsing sets the example up; it must carry a label then, or VW marks it test-only.
        text = "\n".join(f"1 {w[i]:g} {line}" for i, line in enumerate(lines))
        examples = first._parse(text) if lines else []
        for i, ex in enumerate(examples):
            for k, ws in enumerate(self.workspaces):
                if learn_mask is not None and not learn_mask[i, k]:
                    continue
                lib.example.set_label_string(ex, ws, f"{1 if labels[i, k] else -1} {w[i]:g}", 0)
                lib.vw.learn(ws, ex)
                preds[i, k] = lib.example.get_simplelabel_prediction(ex)
            lib.vw._finish_example(first, ex)
        return preds

    def predict(self, lines: list[str]) -> np.ndarray:
        """Probabilities [N, T] from VW itself for text lines (reference path, used by tests)."""
        return predict_text(self, "\n".join(lines).encode())

    def weights(self) -> np.ndarray:
        """Numpy copy [2**bits, T] of every task's weights."""
        return np.stack([workspace_weights(ws, self.config.bits) for ws in self.workspaces], axis=1)

    def get_weights(self, rows: np.ndarray) -> np.ndarray:
        """Current weights [len(rows), T] at the given un-strided indices."""
        out = np.empty((len(rows), len(self.workspaces)), np.float32)
        for k, ws in enumerate(self.workspaces):
            get = ws.get_weight
            out[:, k] = [get(int(r)) for r in rows]
        return out

    def save(self, paths: dict) -> None:
        for task, ws in zip(self.tasks, self.workspaces):
            ws.save(str(paths[task]))

    def namespace_hashes(self) -> dict[str, int]:
        return namespace_hashes(self.workspaces[0])

    def close(self) -> None:
        for ws in self.workspaces:
            ws.finish()
        self.workspaces = []


def learn_text(learners: TaskLearners, text: bytes, labels: np.ndarray, mask: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> np.ndarray:
    """:meth:`TaskLearners.learn` over prebuilt batch text (see :mod:`stacker.vwtext`); pre-update probabilities.

    Same calls in the same order as :meth:`TaskLearners.learn` (so the same models), minus the per-call
    numpy indexing and string formatting.
    """
    lib, first, wss = learners._pylibvw, learners.workspaces[0], learners.workspaces
    preds = np.full(labels.shape, np.nan)
    mask = np.ones(labels.shape, bool) if mask is None else mask
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    if not len(labels):
        return preds
    examples = first._parse(text)  # bytes: pybind11 reads them as std::string without a decode copy
    if len(examples) != len(labels):
        raise ValueError(f"VW parsed {len(examples)} examples from a batch of {len(labels)}")
    set_label, learn, get_pred = lib.example.set_label_string, lib.vw.learn, lib.example.get_simplelabel_prediction
    finish = lib.vw._finish_example
    out: list[float] = []
    push = out.append
    strings: dict[float, tuple[str, str]] = {}
    task_idx = range(labels.shape[1])
    for ex, mrow, lrow, w in zip(examples, mask.tolist(), labels.tolist(), weights.tolist()):
        lab = strings.get(w)
        if lab is None:
            lab = strings[w] = (f"-1 {w:g}", f"1 {w:g}")
        cur = 1  # the text's own label prefix is "1 <w>"; learning leaves the label as it is
        for k in task_idx:
            if mrow[k]:
                ws = wss[k]
                y = 1 if lrow[k] else 0
                if y != cur:  # re-parsing an identical label string changes nothing
                    set_label(ex, ws, lab[y], 0)
                    cur = y
                learn(ws, ex)
                push(get_pred(ex))
        finish(first, ex)
    preds[mask] = out
    return preds


def predict_text(learners: TaskLearners, text: bytes) -> np.ndarray:
    """Probabilities [N, T] for prebuilt batch text (labels, if the text has them, are ignored)."""
    lib, first = learners._pylibvw, learners.workspaces[0]
    examples = first._parse(text) if text else []
    predict, get_pred, finish = lib.vw.predict, lib.example.get_simplelabel_prediction, lib.vw._finish_example
    out = np.empty((len(examples), len(learners.workspaces)))
    for i, ex in enumerate(examples):
        for k, ws in enumerate(learners.workspaces):
            predict(ws, ex)
            out[i, k] = get_pred(ex)
        finish(first, ex)
    return out
