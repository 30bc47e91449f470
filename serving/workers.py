"""N server processes sharing one port (SO_REUSEPORT), each with its own bundle copy in memory.

One process is GIL-bound; several give parallel Python. Each worker has its own event-log
directory (``<eventlog_dir>/worker-<i>``) because an EventLog has one writer. The bundle watcher
runs in every worker, so ``--model-dir`` hot swaps reach all of them; ``Reload`` reaches the
worker that received it, which broadcasts it to its siblings through a small file in a shared control
directory (:class:`ReloadBroadcast`); each sibling loads the bundle in the background.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .settings import ServingSettings

log = logging.getLogger(__name__)


class ReloadBroadcast:
    """Reloads shared between worker processes: ``publish`` writes ``reload.json``, ``check`` loads it."""

    def __init__(self, control_dir: Path, model, worker: int):
        self.path = Path(control_dir) / "reload.json"
        self.model, self.worker = model, worker
        self.origin = f"{worker}-{os.getpid()}-{id(self):x}"  # who published an order
        self.seen_ns = self._mtime()

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def publish(self, bundle_path: str) -> None:
        tmp = self.path.with_name(f"reload.{self.origin}.tmp")
        # The bundles the origin counted as seen (LiveModel.reload): every worker skips the same ones.
        seen = {str(p): list(map(list, state)) for p, state in self.model.seen_at_reload.items()}
        tmp.write_text(json.dumps({"bundle_path": str(bundle_path), "origin": self.origin, "at": time.time(),
                                   "seen": seen}))
        os.replace(tmp, self.path)
        self.seen_ns = self._mtime()

    def check(self) -> None:
        mtime = self._mtime()
        if mtime == self.seen_ns:
            return
        self.seen_ns = mtime
        order = json.loads(self.path.read_text())
        if order["origin"] != self.origin:
            from .errors import RefusedBundle
            try:
                seen = order.get("seen")
                self.model.reload(order["bundle_path"], seen=None if seen is None else
                                  {Path(p): tuple(map(tuple, state)) for p, state in seen.items()})
            except RefusedBundle:
                pass  # logged by the model; this worker keeps serving its current bundle


def _worker(settings: ServingSettings, index: int) -> None:
    logging.basicConfig(level=settings.log_level,
                        format=f"%(asctime)s worker-{index} %(name)s %(levelname)s %(message)s")
    from .server import serve
    sys.exit(serve(settings, worker=index))


def serve_workers(settings: ServingSettings) -> int:
    if settings.port == 0:
        print("feedrank serve: --workers > 1 needs a fixed --port (workers share it)", file=sys.stderr)
        return 2
    control = tempfile.mkdtemp(prefix="feedrank-workers-")
    settings = settings.model_copy(update={"control_dir": Path(control)})
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(settings, i), name=f"worker-{i}") for i in range(settings.workers)]
    for p in procs:
        p.start()

    def forward(signum, frame) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker drains with its own grace

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        while p.is_alive():
            p.join(0.2)  # timed, so a forwarded signal is handled promptly
    return max((p.exitcode or 0) for p in procs)
