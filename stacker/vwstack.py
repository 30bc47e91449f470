"""The sparse logistic regressions on top: one per task, learned jointly in one Vowpal Wabbit workspace.

Namespaces (first letters distinct, since ``-q`` crosses by first letter): ``l`` tree leaves,
``d`` DNN last hidden layer, ``u`` user id, ``p`` post id, ``a`` author id, ``c`` context tokens, and
one namespace per id cross (``x`` for the first of ``VWConfig.interactions``, ``y`` for the second, ...)
holding the pair's own feature (``(16777619 * u) ^ a``, 32 bits), written by us rather than crossed by VW.

**One LR per task, sharing id effects.** Every impression is learned as one example per task (parsed
once, then switched from task to task in place, :meth:`TaskLearners.switch_ops`); a task token
(namespace ``T``) is crossed with every data namespace (``-q Tl -q Td ...``, linear terms ignored), so
each task has its own weight for every feature: its own logistic regression. Examples of the tasks in
the shared group (the positive engagements by default; ``hide`` learns alone) also carry the shared
token (namespace ``S``), crossed with the id crosses (and the ids of ``VWConfig.shared_ids``, none by
default): a user×author pair's weight under ``S`` is learned from every positive task's labels at
once, so rare tasks (comment, share) borrow what clicks, likes and dwells say about the same pair.
Sharing the user, post and author weights too lowers offline NE a little more but ranks worse in
the closed loop (``feedrank demo``: 65–67% of the oracle's expected clicks against 72–73%), so it
is off. The task tokens'
own weights are the task biases (``--noconstant``).

**Weight layout.** With ``R = 2**(bits - 3)``, the token of task ``k`` is the feature whose cross with a
feature at VW index ``i`` lands at ``i ^ (k * R)`` (the shared token uses ``k = 7``): its name is chosen
through the inverse of VW's FNV multiplier. Viewed as ``[8, R]`` planes, all tasks' weights of one
feature share a row: serving keeps the transposed copy ``[R, 8]`` (one cache line per feature) and
reads task ``k`` of a feature at index ``i`` at row ``i % R``, slot ``(i // R) ^ k``. Ids, contexts and
pairs need one row gather per candidate, as before; leaves and DNN units go through small per-task
tables rebuilt on every weight update.

The LRs learn with FTRL-proximal (per-coordinate rates alpha / (beta + sqrt(sum g^2)), McMahan et al.):
unlike VW's default adaptive update, whose first step on a coordinate has the same size for a click
and a non-click, its first steps follow the gradient, so a user x author pair seen a handful of times
learns from its clicks. VW has no per-namespace learning rate; each namespace's features carry a fixed
value instead (``VWConfig.values``, written once on the namespace marker, ``|l:0.05``), and a feature
of value v learns about v^2 times as fast: the 200 always-active leaves learn slowly, ids fast. DNN
activations are multiplied by the ``d`` value before they are written; a pair's value is the product
of its two namespaces' values.

All feature names are integers, so an example's weight indices are computable outside VW:
``(name + hash_space(ns)) & 0xFFFFFFFF`` masked to ``-b`` bits; a cross ``-q Tx`` of strided indices
``i_T, i_x`` is ``(16777619 * i_T) ^ i_x``. :class:`SparseScorer` scores from a numpy copy of the
weights with exactly this hashing (the serving path), and the bundle tests check it against VW's own
predictions.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from itertools import repeat

import numpy as np

NAMESPACES = {"leaves": "l", "dnn": "d", "user": "u", "post": "p", "author": "a", "context": "c"}
DNN_DECIMALS = 4
_FNV = np.uint64(16777619)
_M32 = np.uint64(0xFFFFFFFF)


DEFAULT_VALUES = (("l", 0.05), ("d", 0.1), ("u", 1.2), ("p", 1.2), ("a", 1.5), ("c", 1.0))
UNIT_VALUES = (("l", 1.0), ("d", 1.0), ("u", 1.0), ("p", 1.0), ("a", 1.0), ("c", 1.0))
TOKEN_NS, SHARED_NS = "T", "S"
SLOTS, SHARED_SLOT = 8, 7
MAX_TASKS = SHARED_SLOT                    # slots 0..6 for tasks, 7 for the shared token
PAIR_LETTERS = "xyzwvk"                    # namespaces of the id crosses, in the order configured
DEFAULT_SHARED = ("click", "like", "comment", "share", "dwell")
PARSE_LINES = 1024


@dataclass(frozen=True)
class VWConfig:
    bits: int = 26                        # one workspace for every task: 2**(bits-3) rows of 8 slots
    interactions: tuple[str, ...] = ("ua", "up")
    hash_seed: int = 0
    optimizer: str = "ftrl"               # "ftrl" or VW's default "adaptive"
    ftrl_alpha: float = 0.1
    ftrl_beta: float = 1.0
    learning_rate: float = 0.05           # -l and --power_t of the adaptive optimizer
    power_t: float = 0.5
    l2: float = 0.0
    values: tuple[tuple[str, float], ...] = DEFAULT_VALUES   # value of each namespace's features
    shared_tasks: tuple[str, ...] = DEFAULT_SHARED           # tasks whose id-cross effects are pooled
    shared_value: float = 1.0                                # value of the shared token
    shared_ids: str = ""                                     # ids (u, p, a) pooled too, beside the crosses

    def __post_init__(self):
        if self.optimizer not in ("ftrl", "adaptive"):
            raise ValueError(f"unknown VW optimizer {self.optimizer!r} (ftrl or adaptive)")
        if self.bits < 4:
            raise ValueError(f"-b {self.bits}: at least 4 bits (8 slots per row)")
        if len(self.interactions) > len(PAIR_LETTERS):
            raise ValueError(f"at most {len(PAIR_LETTERS)} id crosses, got {len(self.interactions)}")
        for pair in self.interactions:
            if len(pair) != 2 or not set(pair) <= set("upa") or pair[0] == pair[1]:
                raise ValueError(f"id cross {pair!r}: two different letters of u (user), p (post), a (author)")
        if len({frozenset(pair) for pair in self.interactions}) != len(self.interactions):
            raise ValueError(f"id crosses {','.join(self.interactions)}: a cross is listed twice")
        if not set(self.shared_ids) <= set("upa"):
            raise ValueError(f"shared ids {self.shared_ids!r}: letters of u (user), p (post), a (author)")

    @property
    def shared_namespaces(self) -> str:
        """Namespaces crossed with the shared token: the id crosses, and the ids of ``shared_ids``."""
        return "".join(ns for ns in "upa" if ns in self.shared_ids) + self.pair_letters

    @property
    def rate(self) -> float:
        """The optimizer's step size: FTRL's alpha, or the adaptive optimizer's -l."""
        return self.ftrl_alpha if self.optimizer == "ftrl" else self.learning_rate

    @property
    def pair_letters(self) -> str:
        return PAIR_LETTERS[:len(self.interactions)]

    def shared_mask(self, tasks) -> np.ndarray:
        """Which of ``tasks`` carry the shared token (none unless at least two of them are shared)."""
        mask = np.array([t in self.shared_tasks for t in tasks], bool)
        return mask if mask.sum() >= 2 else np.zeros(len(mask), bool)

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
        data = "ldupac" + self.pair_letters
        q = " ".join([f"-q {TOKEN_NS}{ns}" for ns in data]
                     + [f"-q {SHARED_NS}{ns}" for ns in self.shared_namespaces])
        opt = (f"--ftrl --ftrl_alpha {self.ftrl_alpha:g} --ftrl_beta {self.ftrl_beta:g}"
               if self.optimizer == "ftrl" else f"-l {self.learning_rate:g} --power_t {self.power_t:g}")
        return (f"--quiet -b {self.bits} --loss_function logistic --link logistic --save_resume "
                f"--hash_seed {self.hash_seed} {opt} --l2 {self.l2:g} --noconstant --ignore_linear {data} {q}")

    @classmethod
    def from_dict(cls, vw: dict) -> "VWConfig":
        """The settings a bundle manifest's ``vw`` section records."""
        return cls(bits=vw["bits"], interactions=tuple(vw["interactions"]), hash_seed=vw.get("hash_seed", 0),
                   optimizer=vw["optimizer"], ftrl_alpha=vw["ftrl_alpha"], ftrl_beta=vw["ftrl_beta"],
                   learning_rate=vw["learning_rate"], power_t=vw["power_t"], l2=vw["l2"],
                   values=tuple(sorted(vw["values"].items())), shared_tasks=tuple(vw["shared_tasks"]),
                   shared_value=vw["shared_value"], shared_ids=vw["shared_ids"])

    def to_dict(self) -> dict:
        return {"optimizer": self.optimizer, "ftrl_alpha": self.ftrl_alpha, "ftrl_beta": self.ftrl_beta,
                "learning_rate": self.learning_rate, "power_t": self.power_t, "l2": self.l2,
                "values": dict(self.values), "shared_tasks": list(self.shared_tasks),
                "shared_value": self.shared_value, "shared_ids": self.shared_ids, "layout": "task-slots-v1"}


def token_index(slot: int, bits: int) -> int:
    """VW index (b bits) of the token whose cross with index i lands at ``i ^ (slot * 2**(bits-3))``."""
    rows = 1 << (bits - 3)
    return (pow(int(_FNV), -1, 1 << bits) * (slot * rows)) % (1 << bits)


def token_name(slot: int, bits: int, ns_hash: int) -> int:
    """Integer feature name of that token in a namespace hashed to ``ns_hash``."""
    return (token_index(slot, bits) - int(ns_hash)) % (1 << 32)


def pair_names(ids: np.ndarray, interactions) -> np.ndarray:
    """[N, len(interactions)] 32-bit names of the id pairs (``ids`` columns: user, post, author)."""
    col = {"u": 0, "p": 1, "a": 2}
    if not len(interactions):
        return np.zeros((len(ids), 0), np.uint64)
    ids = ids.astype(np.uint64)
    return np.stack([((_FNV * ids[:, col[x]]) ^ ids[:, col[y]]) & _M32 for x, y in interactions], axis=1)


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


def pair_values(values, interactions) -> dict[str, float]:
    """The value of each id-cross namespace: the product of its two namespaces' values."""
    v = namespace_values(values)
    return {PAIR_LETTERS[j]: v[x] * v[y] for j, (x, y) in enumerate(interactions)}


def example_lines(leaves: np.ndarray, hidden: np.ndarray, ids: np.ndarray, ctx: np.ndarray,
                  namespaces: str = "ldupac", values=None, interactions=()) -> list[str]:
    """VW text lines (no label, no task token) for N rows; ``hidden`` must already be rounded (and scaled).

    ``namespaces`` selects the blocks written (letters of :data:`NAMESPACES`), so ablations such as
    leaves-only or ids-only LRs use the same writer; an id cross of ``interactions`` is written when
    both its namespaces are; ``values`` gives each namespace's feature value (written once, on the
    namespace marker; the DNN block carries its scaled activations instead).
    """
    v = namespace_values(values)
    m = {k: namespace_marker(k, x) for k, x in v.items() if k != "d"}
    pv = pair_values(values, interactions)
    pairs = pair_names(ids, interactions)
    crossed = [j for j, (x, y) in enumerate(interactions) if x in namespaces and y in namespaces]
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
        for j in crossed:
            letter = PAIR_LETTERS[j]
            parts.append(f"{namespace_marker(letter, pv[letter])} {pairs[i, j]}")
        lines.append(" ".join(parts))
    return lines


class SparseScorer:
    """Scores examples from a numpy copy of the multi-task VW weights (``[2**(bits-3), 8]``, see the
    module docstring for the layout)."""

    def __init__(self, weights: np.ndarray, ns_hash: dict[str, int], config: VWConfig, tasks,
                 leaf_space: int | None = None):
        bits = self.bits = config.bits
        self.rows = 1 << (bits - 3)
        if weights.shape != (self.rows, SLOTS):
            raise ValueError(f"weights of shape {weights.shape}, expected ({self.rows}, {SLOTS}) for -b {bits}")
        self.weights = weights
        self.tasks = tuple(tasks)
        T = len(self.tasks)
        self.interactions = config.interactions
        self.pair_letters = config.pair_letters
        self.values = {**namespace_values(config.values), **pair_values(config.values, self.interactions)}
        self.shared = config.shared_mask(self.tasks)
        self.shared_value = float(config.shared_value)
        # Whether the shared token crosses each id column (u, p, a) and each id cross.
        self._shared_ids = np.array([ns in config.shared_namespaces for ns in "upa"], bool)
        self._shared_pairs = np.array([ns in config.shared_namespaces for ns in self.pair_letters], bool)
        self.ns_hash = {k: np.uint64(v) for k, v in ns_hash.items()}
        self._bmask = np.uint64((1 << bits) - 1)
        self._shift = np.uint64(bits - 3)
        self._rmask = np.uint64(self.rows - 1)
        self._task_slots = np.arange(T, dtype=np.uint64)
        self._bias_index = np.array([token_index(k, bits) for k in range(T)], np.uint64)
        self._shared_index = np.array([token_index(SHARED_SLOT, bits)], np.uint64)
        # Leaf features take only trees * 2**(depth+1) values: keep their per-task weights in a compact
        # table (~0.6 MB, cache-resident) instead of gathering 200 rows per candidate.
        self._leaf_index = None if leaf_space is None else self.index("l", np.arange(leaf_space))
        self._dnn: tuple[int, np.ndarray] | None = None
        self.refresh()

    # -- indices ---------------------------------------------------------------------------------
    def index(self, ns: str, names: np.ndarray) -> np.ndarray:
        """VW index (``-b`` bits) of features of namespace ``ns`` named ``names`` (any shape)."""
        return ((np.asarray(names).astype(np.uint64) + self.ns_hash[ns]) & _M32) & self._bmask

    def binary_index(self, ids, ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """VW indices [N, F] of the binary features other than leaves (user, post, author, the context
        tokens, the id pairs), their values [F], and whether the shared token crosses them [F]."""
        pairs = pair_names(ids, self.interactions)
        parts = [self.index("u", ids[:, 0:1]), self.index("p", ids[:, 1:2]), self.index("a", ids[:, 2:3]),
                 self.index("c", ctx)]
        parts += [self.index(letter, pairs[:, j:j + 1]) for j, letter in enumerate(self.pair_letters)]
        v = self.values
        vals = np.concatenate([[v["u"], v["p"], v["a"]], np.full(ctx.shape[1], v["c"]),
                               [v[letter] for letter in self.pair_letters]])
        shared = np.concatenate([self._shared_ids, np.zeros(ctx.shape[1], bool), self._shared_pairs])
        return np.concatenate(parts, axis=1), vals, shared

    def rows_of(self, index: np.ndarray) -> np.ndarray:
        return (index & self._rmask).astype(np.intp)

    def slot_weights(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-task weights [..., T] and shared-token weights [...] of features at VW indices ``index``."""
        block = np.take(self.weights, self.rows_of(index), axis=0)            # [..., 8]
        plane = (index >> self._shift)[..., None]
        task = np.take_along_axis(block, (plane ^ self._task_slots).astype(np.intp), axis=-1)
        shared = np.take_along_axis(block, (plane ^ np.uint64(SHARED_SLOT)).astype(np.intp), axis=-1)[..., 0]
        return task, shared

    def effective(self, index: np.ndarray, shared_cols: np.ndarray) -> np.ndarray:
        """Each task's weight [..., T] of features at ``index`` (task slot plus, for the shared tasks
        and the shared columns, the shared slot times the shared token's value); values not applied."""
        task, shared = self.slot_weights(index)
        s = shared * (np.asarray(shared_cols, float) * self.shared_value)
        return task + s[..., None] * self.shared

    def binary_rows(self, ids, ctx) -> np.ndarray:
        """Every weight row the examples' ids, contexts and id crosses (and the biases) read: what
        learning them changes, beside their leaves' rows (:meth:`leaf_rows`) and the DNN units'
        (:meth:`dnn_rows`)."""
        index, _, _ = self.binary_index(ids, ctx)
        return np.concatenate([self.rows_of(index).ravel(), self.rows_of(self._bias_index),
                               self.rows_of(self._shared_index)])

    def leaf_rows(self, leaves) -> np.ndarray:
        """Every weight row the examples' GBDT leaves read."""
        return self.rows_of(self.index("l", leaves)).ravel()

    def bias_slots(self, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row, slot) of every task's bias weight (or of the tokens at ``index``)."""
        index = self._bias_index if index is None else index
        return self.rows_of(index), (index >> self._shift).astype(np.intp)

    def _dnn_index(self, hidden_size: int) -> np.ndarray:
        return self.index("d", np.arange(hidden_size))

    def dnn_rows(self, hidden_size: int) -> np.ndarray:
        return self.rows_of(self._dnn_index(hidden_size))

    # -- tables ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the derived tables (leaves, DNN units, biases) after the weights changed."""
        self._leaf_table = None if self._leaf_index is None else \
            np.ascontiguousarray(self.slot_weights(self._leaf_index)[0])          # [leaf_space, T]
        if self._dnn is not None:
            self._dnn = (self._dnn[0], self._dnn_weights(self._dnn[0]))
        # A token's own (linear) weight is its task's bias; the shared token's adds to the shared tasks'.
        self.bias = self.weights[self.bias_slots()].astype(np.float64)
        self.bias += self.shared * self.shared_value * float(self.weights[self.bias_slots(self._shared_index)][0])

    def _dnn_weights(self, hidden_size: int) -> np.ndarray:
        return np.ascontiguousarray(self.slot_weights(self._dnn_index(hidden_size))[0]).astype(np.float64)

    def dnn_table(self, hidden_size: int) -> np.ndarray:
        """Per-task weights [H, T] of the DNN units."""
        if self._dnn is None or self._dnn[0] != hidden_size:
            self._dnn = (hidden_size, self._dnn_weights(hidden_size))
        return self._dnn[1]

    def leaf_weights(self, leaves: np.ndarray) -> np.ndarray:
        """Per-task weights [N, L, T] of the leaves (values not applied)."""
        if self._leaf_table is not None:
            return np.take(self._leaf_table, leaves, axis=0)
        return self.slot_weights(self.index("l", leaves))[0]

    # -- scoring ---------------------------------------------------------------------------------
    def logits(self, leaves, hidden, ids, ctx) -> np.ndarray:
        """Raw scores [N, T]; ``hidden`` must be rounded like the text VW learned from."""
        index, vals, shared_cols = self.binary_index(ids, ctx)
        task, shared = self.slot_weights(index)                                    # [N, F, T], [N, F]
        z = np.einsum("nft,f->nt", task.astype(np.float64), vals)
        if self.shared.any():
            z += (shared.astype(np.float64) @ (vals * shared_cols * self.shared_value))[:, None] * self.shared
        leaf = np.ascontiguousarray(self.leaf_weights(leaves).transpose(0, 2, 1))  # [N, T, L]
        z += self.values["l"] * leaf.sum(axis=2, dtype=np.float64)
        z += hidden.astype(np.float64) @ self.dnn_table(hidden.shape[1])
        return z + self.bias

    def predict(self, leaves, hidden, ids, ctx) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(leaves, hidden, ids, ctx)))


LISTED_SHARE = 0.005   # below this share of non-zero weights, VW's own listing is faster and smaller


def read_weights(workspace, index) -> np.ndarray:
    """VW's weights (slot 0 of each stride) at the indices ``index``, as float32: pylibvw reads no more
    than one weight at a time."""
    import pylibvw

    index = index.tolist() if isinstance(index, np.ndarray) else index
    return np.fromiter(map(pylibvw.vw.get_weight, repeat(workspace), index, repeat(0)), np.float32, len(index))


def workspace_weights(workspace, bits: int, args: str | None = None, chunk: int = 1 << 20) -> np.ndarray:
    """Dense float32 copy of a workspace's weights, as rows of 8 slots ``[2**(bits-3), 8]``.

    Given the workspace's ``args``, from the model VW saves (:func:`_saved_weights`): 1.3-1.6 s and little
    memory beyond the copy for the 4M non-zero weights of a stack trained on 1M impressions at ``-b 26``.
    Otherwise, or when that copy does not check out against VW's own weights, VW lists its non-zero
    weights (``json_weights``) at about 3 us and 600 bytes apiece while it writes (2.5 GiB and 10 s for
    those 4M), and reading every weight one at a time takes 0.15 us apiece (10 s at ``-b 26``) and no
    memory beyond the copy; a sample of 65,536 weights decides between those two: under
    ``LISTED_SHARE`` of them non-zero (a small model), the listing, otherwise the scan."""
    size = 1 << bits
    sample = np.arange(0, size, max(1, size >> 16))
    sampled = read_weights(workspace, sample)
    if args is not None:
        saved = _saved_weights(workspace, bits, args, sample, sampled)
        if saved is not None:
            return saved
    if np.count_nonzero(sampled) < LISTED_SHARE * len(sample):
        return _listed_weights(workspace, bits)
    rows = size >> 3
    out = np.empty((rows, SLOTS), dtype=np.float32)
    for slot in range(SLOTS):
        for a in range(0, rows, chunk):
            b = min(a + chunk, rows)
            out[a:b, slot] = read_weights(workspace, range(slot * rows + a, slot * rows + b))
    return out


SPOT_CHECKS = 4096   # saved records compared with VW's own weights, beside the sample


def _saved_weights(workspace, bits: int, args: str, sample: np.ndarray, sampled: np.ndarray) -> np.ndarray | None:
    """:func:`workspace_weights` from the model VW saves: after a header as long as that of a model with
    the same ``args`` and nothing learned, one record per non-zero weight, its index (uint32 below 31
    bits) and its state (the weight first: FTRL's weight, z and n). None, to fall back on reading VW's
    weights, unless the records parse as ascending indices below ``2**bits`` and agree exactly with VW
    on every weight of ``sample`` (``sampled``) and on ``SPOT_CHECKS`` records."""
    import os
    import tempfile

    from vowpalwabbit import pyvw

    if bits >= 31:
        return None
    with tempfile.TemporaryDirectory(prefix="feedrank-weights-") as tmp:
        model = os.path.join(tmp, "model")
        workspace.save(model)
        # The header's length does not depend on -b (saving a blank -b 26 model takes 0.9 s; at -b 12,
        # 10 ms); the blank model with the very same arguments is the second try.
        small = re.sub(r"(^|\s)-b \d+", r"\1-b 12", args)
        for blank_args in dict.fromkeys([small, args]):
            blank = pyvw.Workspace(blank_args)
            try:
                blank.save(os.path.join(tmp, "blank"))
            finally:
                blank.finish()
            found = _weight_records(model, os.path.getsize(os.path.join(tmp, "blank")), workspace, bits,
                                    sample, sampled)
            if found is not None:
                return found
    return None


def _weight_records(model: str, header: int, workspace, bits: int, sample: np.ndarray,
                    sampled: np.ndarray) -> np.ndarray | None:
    """The weights of a saved model whose records start at ``header``, checked (:func:`_saved_weights`)."""
    import os

    length = os.path.getsize(model) - header
    if length <= 0 or length % 4:
        return None
    with open(model, "rb") as f:
        head = np.frombuffer(f.read(header), np.uint8)
        words = np.fromfile(f, dtype="<u4")
    size, rows = 1 << bits, 1 << (bits - 3)

    def agrees(index, weight) -> bool:                  # VW's own weights at these indices
        return np.array_equal(read_weights(workspace, index), weight)

    for floats in (3, 1, 2, 4):                  # FTRL with --save_resume writes three floats
        width = 1 + floats
        if len(words) % width:
            continue
        records = words.reshape(-1, width)
        index = records[:, 0].astype(np.int64)
        weight = np.ascontiguousarray(records[:, 1]).view(np.float32)
        if not len(index) or index[-1] >= size or np.any(np.diff(index) <= 0):
            continue
        # A header taken too long by whole records would drop the first ones and pass every check on the
        # rest: the 4 * width bytes before the records must not read as a record VW agrees with.
        if len(head) >= 4 * width:
            before = np.ascontiguousarray(head[-4 * width:]).view("<u4")
            if before[0] < index[0] and before[1] and agrees(before[:1].astype(np.int64), before[1:2].view(np.float32)):
                continue
        out = np.zeros((rows, SLOTS), np.float32)
        out[index % rows, index // rows] = weight
        if not np.array_equal(out[sample % rows, sample // rows], sampled):
            continue
        picks = np.random.default_rng(0).choice(len(index), min(SPOT_CHECKS, len(index)), replace=False)
        picks = np.union1d(picks, [0, len(index) - 1])   # the first and last records always
        if agrees(index[picks], weight[picks]):
            return out
    return None


def _listed_weights(workspace, bits: int) -> np.ndarray:
    """:func:`workspace_weights` from VW's JSON listing of its non-zero weights."""
    entries = json.loads(workspace.json_weights())["weights"]
    flat = np.zeros(1 << bits, dtype=np.float32)
    if entries:
        idx = np.fromiter((e["index"] for e in entries), dtype=np.int64, count=len(entries))
        val = np.fromiter((e["value"] for e in entries), dtype=np.float32, count=len(entries))
        flat[idx] = val
    return np.ascontiguousarray(flat.reshape(SLOTS, -1).T)


def namespace_hashes(workspace, pair_letters: str = "") -> dict[str, int]:
    letters = list(NAMESPACES.values()) + list(pair_letters) + [TOKEN_NS, SHARED_NS]
    return {ns: int(workspace.hash_space(ns)) for ns in letters}


class TaskLearners:
    """Every task's LR in one VW workspace (see the module docstring): a row is parsed once and learned
    as one example per task, switched in place to carry that task's token (and the shared token for the
    shared tasks).

    Importance weights carry negative downsampling (1 / rate on kept negatives).
    """

    def __init__(self, tasks, config: VWConfig, model_path=None):
        import pylibvw  # noqa: F401  (import here: the serving path never needs pylibvw)
        from vowpalwabbit import pyvw

        self._pylibvw = pylibvw
        self.tasks = tuple(tasks)
        if len(self.tasks) > MAX_TASKS:
            raise ValueError(f"{len(self.tasks)} tasks: one workspace holds at most {MAX_TASKS}")
        self.config = config
        args = config.args()
        if model_path is not None:
            args += f" -i {model_path}"
        self.workspace = pyvw.Workspace(args)
        self.rows = 1 << (config.bits - 3)
        self.shared = config.shared_mask(self.tasks)
        ht, hs = self.workspace.hash_space(TOKEN_NS), self.workspace.hash_space(SHARED_NS)
        sv = config.shared_value
        shared_token = (b"|%s %d " % (namespace_marker(SHARED_NS, sv).encode(),
                                      token_name(SHARED_SLOT, config.bits, hs)))
        self._tokens = [b"|%s %d " % (TOKEN_NS.encode(), token_name(k, config.bits, ht))
                        + (shared_token if self.shared[k] else b"") for k in range(len(self.tasks))]
        # Each task's token features as VW stores them in a parsed (set-up) example, to switch a parsed
        # example from task to task in place: one parse per row instead of one per row and task.
        lib, ws = self._pylibvw, self.workspace
        self._t_ns, self._s_ns = ord(TOKEN_NS), ord(SHARED_NS)
        self._token_features = []
        for k in range(len(self.tasks)):
            ex = ws._parse(self._tokens[k])[0]
            self._token_features.append(tuple(
                tuple((ex.feature(ns, j), ex.feature_weight(ns, j)) for j in range(ex.num_features_in(ns)))
                for ns in (self._t_ns, self._s_ns)))
            lib.vw._finish_example(ws, ex)
        if any(len(t) != 1 for t, _ in self._token_features) or \
                any(len(s) != int(on) for (_, s), on in zip(self._token_features, self.shared)):
            raise RuntimeError("VW parsed the task tokens into an unexpected number of features")
        self._plans: dict = {}

    def switch_ops(self, src: int, dst: int) -> tuple:
        """What makes a parsed example of task ``src`` the example of task ``dst``, in place:
        ``(token, shared)``, ``token`` the ``(index, value)`` to push after popping the task token (None
        when ``src == dst``), ``shared`` the shared token's ``(index, value)`` to push, False to pop it,
        or None to leave it.

        The example stays set up: popping one token feature and pushing another with its stored (strided)
        index keeps VW's feature count and sums right since both have the same value; the shared token
        comes or goes where exactly one of the two tasks is shared."""
        if src == dst:
            return None, None
        (t_dst, s_dst), shared = self._token_features[dst], self.shared
        if shared[src] == shared[dst]:
            return t_dst[0], None
        return t_dst[0], (s_dst[0] if shared[dst] else False)

    def plan(self, mask: tuple, score_first: bool) -> tuple:
        """How :func:`learn_text` goes through a row learned for the tasks of ``mask``: ``(first, steps)``,
        ``first`` the task the row is parsed as, each step ``(task, token, shared, act)`` with
        :meth:`switch_ops`'s ``token`` and ``shared`` and ``act`` 0 to score the task, 1 to learn it, 2 to
        learn it and keep the prediction its learn made. Memoised per mask (a batch has a handful)."""
        key = (mask, score_first)
        plan = self._plans.get(key)
        if plan is None:
            todo = [k for k, on in enumerate(mask) if on]
            # VW's learn scores an example before updating it, so a task's learn-time prediction is
            # progressive, except that a row's shared tasks see the updates its earlier shared tasks made
            # to the shared weights: those after the first are scored before the row is learned.
            scored = [k for k in todo if self.shared[k]][1:] if score_first else []
            seq = [(k, 0) for k in scored] + [(k, 2 if score_first and k not in scored else 1) for k in todo]
            first = seq[0][0] if seq else 0
            steps, cur = [], first
            for k, act in seq:
                steps.append((k, *self.switch_ops(cur, k), act))
                cur = k
            plan = self._plans[key] = (first, tuple(steps))
        return plan

    def pretouch(self) -> None:
        """Touch one weight per page so the first updates do not pay for page faults."""
        ws, step = self.workspace, 4096 // 16
        for i in range(0, 1 << self.config.bits, step):
            ws.set_weight(i, 0, ws.get_weight(i))

    def parse(self, lines: list[bytes]) -> list:
        """VW examples of newline-terminated lines, parsed ``PARSE_LINES`` at a time (one large text parses
        several times slower per line than the same lines in pieces)."""
        parse = self.workspace._parse
        out: list = []
        for a in range(0, len(lines), PARSE_LINES):
            out.extend(parse(b"".join(lines[a:a + PARSE_LINES])))
        return out

    def learn(self, lines: list[str], labels: np.ndarray, learn_mask: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> np.ndarray:
        """Learn rows (labels [N, T] in 0/1); returns the probabilities [N, T] every task had for the
        batch before it was learned (NaN where not learned)."""
        return learn_text(self, "\n".join(lines).encode(), labels, learn_mask, weights)

    def predict(self, lines: list[str]) -> np.ndarray:
        """Probabilities [N, T] from VW itself for text lines (reference path, used by tests)."""
        return predict_text(self, "\n".join(lines).encode())

    def weights(self) -> np.ndarray:
        """Numpy copy ``[2**(bits-3), 8]`` of the weights (rows of slots, see the module docstring)."""
        return workspace_weights(self.workspace, self.config.bits, self.config.args())

    def get_weights(self, rows: np.ndarray) -> np.ndarray:
        """Current weights [len(rows), 8] of the given rows (one get_weight call per slot: pylibvw reads
        no more than one weight at a time)."""
        index = np.asarray(rows, np.int64)[:, None] + np.arange(SLOTS, dtype=np.int64) * self.rows
        return read_weights(self.workspace, index.ravel()).reshape(-1, SLOTS)

    def shift_biases(self, shifts) -> None:
        """Add ``shifts[k]`` to task k's bias (a shift of its logit on every example).

        Under FTRL a weight is recomputed from its state at the coordinate's next update,
        ``w = -z / (l2 + (beta + sqrt(n)) / alpha)``, so ``z`` is set to match the new weight: learning
        goes on from the shifted bias (saved, resumed and served alike)."""
        for k, shift in enumerate(shifts):
            if shift:
                i = token_index(k, self.config.bits)
                self._set_weight(i, self.workspace.get_weight(i, 0) + float(shift))

    def _set_weight(self, i: int, w: float) -> None:
        """Set the weight at VW index ``i``; under FTRL, with its ``z`` to match, since FTRL recomputes a
        weight from its state at the coordinate's next update: ``w = -z / (l2 + (beta + sqrt(n)) / alpha)``."""
        ws, cfg = self.workspace, self.config
        ws.set_weight(i, 0, w)
        if cfg.optimizer == "ftrl":
            ws.set_weight(i, 1, -w * (cfg.l2 + (cfg.ftrl_beta + math.sqrt(ws.get_weight(i, 2))) / cfg.ftrl_alpha))

    def set_weights(self, weights: np.ndarray) -> int:
        """Make the workspace's weights those of ``weights`` (``[2**(bits-3), 8]``, as :meth:`weights`
        gives them), with FTRL's ``z`` set to match each weight changed (as :meth:`shift_biases` does);
        returns how many weights changed. For a bundle whose numpy copy holds weights learned after its VW
        model was saved (a snapshot of a served model): learning goes on from what it serves."""
        rows, slots = np.nonzero(self.weights() != weights)
        for r, k, w in zip(rows.tolist(), slots.tolist(), weights[rows, slots].astype(np.float64).tolist()):
            self._set_weight(k * self.rows + r, w)
        return len(rows)

    def save(self, path) -> None:
        self.workspace.save(str(path))

    def namespace_hashes(self) -> dict[str, int]:
        return namespace_hashes(self.workspace, self.config.pair_letters)

    def weighted_examples(self) -> float:
        return float(self.workspace.get_weighted_examples())

    def close(self) -> None:
        if self.workspace is not None:
            self.workspace.finish()
            self.workspace = None


def _switch(lib_example, ex, t_ns: int, s_ns: int, token, shared) -> None:
    """Switch a parsed example from one task to another (``token``, ``shared``: :meth:`TaskLearners.switch_ops`
    of two different tasks; callers skip the no-op switch, whose ``token`` is None)."""
    lib_example.pop_feature(ex, t_ns)
    lib_example.push_hashed_feature(ex, t_ns, *token)
    if shared is False:
        lib_example.pop_feature(ex, s_ns)
    elif shared is not None:
        lib_example.ensure_namespace_exists(ex, s_ns)
        lib_example.push_hashed_feature(ex, s_ns, *shared)


def _split_lines(text: bytes) -> list[bytes]:
    lines = text.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def learn_text(learners: TaskLearners, text: bytes, labels: np.ndarray, mask: np.ndarray | None = None,
               weights: np.ndarray | None = None, score_first: bool = True) -> np.ndarray:
    """Learn batch text (rows without labels, see :mod:`stacker.vwtext`) for every task of ``mask``.

    Each row is parsed once and switched from task to task in place (:meth:`TaskLearners.plan`).
    With ``score_first`` every (row, task) learned is scored with the weights learned from the rows
    before it and none of its own row's labels (progressive validation: the shared id weights would
    otherwise carry one task's label into another's score within a row); returns those probabilities
    [N, T] (NaN where not learned). Without it (offline training) nothing is returned but NaN.
    """
    lib, ws = learners._pylibvw, learners.workspace
    preds = np.full(labels.shape, np.nan)
    if not len(labels):
        return preds
    lines = _split_lines(text)
    if len(lines) != len(labels):
        raise ValueError(f"{len(lines)} rows of text for a batch of {len(labels)}")
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    plan, tokens = learners.plan, learners._tokens
    plans = [plan(tuple(m), score_first) for m in mask.tolist()]
    # The parse sets the importance weight (a label string set later changes only the label's sign)
    # and carries the token of the row's first task.
    examples = learners.parse([b"1 %g " % wi + tokens[first] + line + b"\n"
                               for wi, line, (first, _) in zip(w.tolist(), lines, plans)])
    if len(examples) != len(lines):
        raise ValueError(f"VW parsed {len(examples)} examples from {len(lines)} rows")
    learn, predict, finish = lib.vw.learn, lib.vw.predict, lib.vw._finish_example
    set_label, get_pred = lib.example.set_label_string, lib.example.get_simplelabel_prediction
    switch, example, t_ns, s_ns = _switch, lib.example, learners._t_ns, learners._s_ns
    strings: dict[tuple[int, float], str] = {}
    out = preds.tolist() if score_first else None
    rows_out = repeat(None) if out is None else out
    for ex, wi, (_, steps), row, o in zip(examples, w.tolist(), plans, labels.tolist(), rows_out):
        last = 1  # the label the example carries: the parse's, then the last set (most rows are
        # negative for every task)
        for k, token, shared, act in steps:
            if token is not None:  # the first step of a row is already its parsed task
                switch(example, ex, t_ns, s_ns, token, shared)
            if act == 0:
                predict(ws, ex)
                o[k] = get_pred(ex)
                continue
            y = 1 if row[k] else -1
            if y != last:
                label = strings.get((y, wi))
                if label is None:
                    label = strings[(y, wi)] = "%d %g" % (y, wi)
                set_label(ex, ws, label, 0)
                last = y
            learn(ws, ex)
            if act == 2:
                o[k] = get_pred(ex)
        finish(ws, ex)
    return preds if out is None else np.array(out, np.float64)


def predict_text(learners: TaskLearners, text: bytes) -> np.ndarray:
    """Probabilities [N, T] for batch text (rows without labels); each row is parsed once."""
    lib, ws = learners._pylibvw, learners.workspace
    lines = _split_lines(text) if text else []
    T = len(learners.tasks)
    if not lines:
        return np.empty((0, T))
    examples = learners.parse([learners._tokens[0] + line + b"\n" for line in lines])
    predict, get_pred, finish = lib.vw.predict, lib.example.get_simplelabel_prediction, lib.vw._finish_example
    switches = [learners.switch_ops(k - 1, k) for k in range(1, T)]
    switch, example, t_ns, s_ns = _switch, lib.example, learners._t_ns, learners._s_ns
    out = np.empty((len(examples), T))
    for i, ex in enumerate(examples):
        predict(ws, ex)
        out[i, 0] = get_pred(ex)
        for k, ops in enumerate(switches, 1):
            switch(example, ex, t_ns, s_ns, *ops)
            predict(ws, ex)
            out[i, k] = get_pred(ex)
        finish(ws, ex)
    return out
