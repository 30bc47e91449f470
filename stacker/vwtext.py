"""Fast VW text for a batch: one fixed-width byte matrix built with numpy instead of per-row f-strings.

The text means to VW exactly what :func:`stacker.vwstack.example_lines` writes: integer feature names
are read as integers (``00052`` is ``52``), and VW's parser drops zero-valued features, so the DNN block
may list every unit (zeros included) with zero-padded fixed decimals. ``tests/test_learner.py`` checks
that VW predicts and learns identically from both texts.

Every line of a batch has the same layout, so a template row holding the constant bytes (label prefix,
namespace markers, spaces, the DNN unit names, ``:``/``.``, newline) is cached per layout and only the
digits are written, straight into strided views of the output matrix (8-byte table look-ups).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from stacker.vwstack import DNN_DECIMALS, PAIR_LETTERS, namespace_marker, namespace_values, pair_names, pair_values

_ZERO = ord("0")
_SPACE = ord(" ")

# Row v: the 8 ASCII digits of v (zero-padded), as one uint64 per value; 5-digit values only (< 100000).
_TABLE8 = ((np.arange(100_000)[:, None] // 10 ** np.arange(7, -1, -1) % 10).astype(np.uint8) + _ZERO)
_TABLE8_U64 = np.ascontiguousarray(_TABLE8).view(np.uint64).ravel()
_TABLE5 = _TABLE8[:, 3:]  # kept for callers of the old helper


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """[..., width] ASCII digits of non-negative integers (< 10**10), zero-padded (table look-ups)."""
    v = np.asarray(values).astype(np.int64)
    if width <= 5:
        return _TABLE8_U64[v].view(np.uint8).reshape(v.shape + (8,))[..., 8 - width:]
    hi, lo = np.divmod(v, 100_000)
    return np.concatenate([_digits(hi, width - 5), _digits(lo, 5)], axis=-1)


def _cells(buf: np.ndarray, start: int, k: int, cell: int) -> np.ndarray:
    """View [n, k, cell] of columns ``start .. start + k*cell`` of a C-contiguous [n, width] matrix."""
    n, width = buf.shape
    return np.lib.stride_tricks.as_strided(buf[:, start:], shape=(n, k, cell), strides=(width, cell, 1),
                                           writeable=True)


@lru_cache(maxsize=64)
def _layout(n_leaves: int, lw: int, units: int, uw: int, iw: int, n_ctx: int,
            markers: tuple[tuple[str, bytes], ...] = (), namespaces: str = "ldupac", pairs: str = ""):
    """Template row and column offsets of one layout; ``markers`` holds each namespace's marker
    with its value (``|l:0.05 ``; ``|l `` for value 1); ``namespaces`` the blocks written, ``pairs``
    the id-cross namespaces written after them."""
    mk = {ns: b"|%s " % ns.encode() for ns in "lupac"}
    mk.update(dict(markers))
    parts: list[bytes] = []
    offs = {}

    def block(ns: str, marker: bytes, body: bytes) -> None:
        parts.append(marker)
        offs[ns] = sum(map(len, parts))
        parts.append(body)

    if "l" in namespaces:
        block("l", mk["l"], (b"0" * lw + b" ") * n_leaves)
    dcell = uw + 1 + iw + 1 + DNN_DECIMALS + 1
    if "d" in namespaces:
        block("d", b"|d ", b"".join(b"%0*d:" % (uw, j) + b"0" * iw + b"." + b"0" * DNN_DECIMALS + b" "
                                    for j in range(units)))
    for ns in "upa":
        if ns in namespaces:
            block(ns, mk[ns], b"0" * 10 + b" ")
    if "c" in namespaces:
        block("c", mk["c"], (b"0" * 10 + b" ") * n_ctx)
    for ns in pairs:
        block(ns, mk[ns], b"0" * 10 + b" ")
    parts.append(b"\n")
    row = b"".join(parts)
    return np.frombuffer(row, np.uint8), offs, dcell


def batch_text(leaves: np.ndarray, hidden: np.ndarray, ids: np.ndarray, ctx: np.ndarray,
               values=None, namespaces: str = "ldupac", interactions=()) -> bytes:
    """Newline-separated rows ``|l ... |d ... |u . |p . |a . |c ... |x .`` for N rows, without label or
    task token (:func:`stacker.vwstack.learn_text` adds them); ``values`` gives each namespace's feature
    value (``hidden`` is already scaled by its ``d``); ``namespaces`` selects the blocks written and
    ``interactions`` the id crosses, as in :func:`stacker.vwstack.example_lines`."""
    n = len(ids)
    if n == 0:
        return b""
    lw = max(1, len(str(int(leaves.max())))) if leaves.size else 1
    scale = 10 ** DNN_DECIMALS
    h = np.rint(hidden.astype(np.float64) * scale).astype(np.int64)  # hidden is already rounded
    if (h < 0).any():
        raise ValueError("hidden activations must be non-negative (ReLU) for the fixed-width writer")
    iw = max(1, len(str(int(h.max() // scale)))) if h.size else 1
    units = hidden.shape[1]
    uw = len(str(max(units - 1, 0)))
    crossed = [j for j, (x, y) in enumerate(interactions) if x in namespaces and y in namespaces]
    pairs = "".join(PAIR_LETTERS[j] for j in crossed)
    all_values = {**namespace_values(values), **pair_values(values, interactions)}
    markers = tuple((k, namespace_marker(k, v).encode() + b" ") for k, v in sorted(all_values.items()) if k != "d")
    row, offs, dcell = _layout(leaves.shape[1], lw, units, uw, iw, ctx.shape[1], markers, namespaces, pairs)
    width = len(row)
    buf = np.empty((n, width), np.uint8)
    buf[:] = row
    if "l" in offs and leaves.shape[1]:
        _cells(buf, offs["l"], leaves.shape[1], lw + 1)[:, :, :lw] = _digits(leaves, lw)
    if "d" in offs and units:
        d = _cells(buf, offs["d"], units, dcell)
        a = uw + 1
        d[:, :, a:a + iw] = _digits(h // scale, iw)
        d[:, :, a + iw + 1:a + iw + 1 + DNN_DECIMALS] = _digits(h % scale, DNN_DECIMALS)
    for k, ns in enumerate("upa"):
        if ns in offs:
            buf[:, offs[ns]:offs[ns] + 10] = _digits(ids[:, k], 10)
    if "c" in offs and ctx.shape[1]:
        _cells(buf, offs["c"], ctx.shape[1], 11)[:, :, :10] = _digits(ctx, 10)
    if pairs:
        names = pair_names(ids, interactions)
        for j in crossed:
            ns = PAIR_LETTERS[j]
            buf[:, offs[ns]:offs[ns] + 10] = _digits(names[:, j], 10)
    return buf.tobytes()
