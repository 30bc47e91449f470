"""Atomic checkpoints of the online learner: model files plus the stream offsets they cover.

A checkpoint is a directory ``<root>/ckpt-<seq:010d>`` holding its files and ``checkpoint.json``
(format version, seq, the caller's ``state`` and the sha256 of every file). It is written into a
``.tmp-*`` directory, fsync'd, renamed into place, and only then named by the ``LATEST`` pointer (written
to a temp file and ``os.replace``'d). A crash at any point leaves either the old or the new checkpoint
current, never a half-written one; leftover temp directories are ignored and cleaned up.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> p = write_checkpoint(root, {"learned_through": 41}, {"click.vw": b"weights"})
>>> state, d = load_latest(root)
>>> state["learned_through"], (d / "click.vw").read_bytes()
(41, b'weights')
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stacker.bundle import sha256_file as _sha256

FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
LATEST = "LATEST"
PREFIX = "ckpt-"


class CheckpointError(RuntimeError):
    """A checkpoint does not match its manifest."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seqs(root: Path) -> list[int]:
    return sorted(int(p.name[len(PREFIX):]) for p in root.glob(PREFIX + "*") if p.name[len(PREFIX):].isdigit())


def write_checkpoint(root: str | os.PathLike, state: dict[str, Any],
                     files: dict[str, Callable[[Path], None] | bytes], keep: int = 3) -> Path:
    """Write a new checkpoint atomically and point ``LATEST`` at it; keep the newest ``keep``.

    ``files`` maps a file name to its bytes or to a callable that writes the file at the given path
    (e.g. ``lambda p: workspace.save(str(p))``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seq = (_seqs(root) or [0])[-1] + 1
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}", dir=root))
    digests = {}
    for name, content in files.items():
        if name == MANIFEST or "/" in name or name.startswith("."):
            raise ValueError(f"checkpoint file name {name!r} is not allowed")
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content(path)
        _fsync(path)
        digests[name] = _sha256(path)
    manifest = {"format_version": FORMAT_VERSION, "seq": seq, "state": state, "files": digests}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    final = root / f"{PREFIX}{seq:010d}"
    os.rename(tmp, final)
    _fsync(root)
    ptr = root / f".{LATEST}.tmp"
    with open(ptr, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(ptr, root / LATEST)
    _fsync(root)
    for old in _seqs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"{PREFIX}{old:010d}", ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Return a checkpoint's manifest after checking its format version and every file's sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / MANIFEST}: format_version {manifest.get('format_version')!r}, "
                              f"expected {FORMAT_VERSION}")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (sha256 differs from {MANIFEST})")
    return manifest


def load_latest(root: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """``(state, directory)`` of the checkpoint ``LATEST`` names, or None when there is none.

    Falls back to the newest complete ``ckpt-*`` directory when ``LATEST`` is missing (a crash between
    the rename and the pointer update). Raises :class:`CheckpointError` naming the bad file when the
    checkpoint does not match its manifest; it is never silently replaced by an older one.
    """
    root = Path(root)
    ptr = root / LATEST
    if ptr.is_file():
        path = root / ptr.read_text().strip()
    else:
        seqs = _seqs(root)
        if not seqs:
            return None
        path = root / f"{PREFIX}{seqs[-1]:010d}"
    return verify(path)["state"], path
