"""Snapshot: write the live model (bundle + current LR weights) as a new, loadable bundle."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from stacker import bundle as bundles
from stacker.ranker import StackedRanker

from .errors import NotReady


def write_snapshot(ranker: StackedRanker, out_root: Path) -> Path:
    """Copy the live bundle with the serving LR weights (online updates included) and a new id.

    The resumable ``vw/lr.model`` is the source bundle's: the online learner, not the
    server, owns the VW state. A learner started on the snapshot first sets that model's weights to
    the snapshot's (``TaskLearners.set_weights``), so it goes on from what the snapshot serves.
    """
    if ranker.path is None:
        raise NotReady("Snapshot: the live model has no bundle directory to copy")
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    manifest = bundles.read_manifest(ranker.path)
    new_id = bundles.new_bundle_id("s")
    dst = out_root / new_id
    tmp = out_root / (new_id + ".partial")
    shutil.copytree(ranker.path, tmp)
    bundles.save_sparse_weights(tmp / "lr_weights.npz", ranker.scorer.weights)
    manifest.pop("files", None)
    manifest.update(bundle_id=new_id, created_at=int(time.time() * 1000),
                    snapshot_of={"bundle_id": ranker.bundle_id, "update_seq": ranker.update_seq,
                                 "version": ranker.version})
    bundles.finalize(tmp, manifest)
    os.replace(tmp, dst)
    return dst.resolve()   # the caller is not in the server's working directory
