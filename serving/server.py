"""Assemble and run the gRPC server: servicers, health, reflection, TLS, metrics, hot swap, SIGTERM.

``feedrank serve`` calls :func:`serve`; tests call :func:`build` and drive the returned
:class:`RankingServer` directly (port 0, real channel).
"""
from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from feedrank.v1 import ranking_pb2 as pb

from .errors import RefusedBundle
from .events import EventIngest
from .handler import RankingHandler
from .metrics import LearnerStatusCollector, ServingMetrics, SinkCollector
from .model import NO_MODEL_HINT, BundleWatcher, LiveModel, UpdateFollower
from .servicer import AdminServicer, RankerServicer, TimedPool, add_to_server
from .settings import ServingSettings
from .sink import BusEventLog, EventLogSink, LogPruner, SharedEventLog, learner_needs
from .snapshot import write_snapshot

log = logging.getLogger(__name__)
SERVICES = (pb.DESCRIPTOR.services_by_name["Ranker"].full_name, pb.DESCRIPTOR.services_by_name["Admin"].full_name)


@dataclass
class RankingServer:
    settings: ServingSettings
    server: grpc.Server
    port: int
    model: LiveModel
    handler: RankingHandler
    health: health.HealthServicer
    metrics: ServingMetrics
    event_log: SharedEventLog | None = None
    sink: EventLogSink | None = None
    watcher: BundleWatcher | None = None
    pruner: LogPruner | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    draining: threading.Event = field(default_factory=threading.Event)

    def set_serving(self, serving: bool) -> None:
        """Health for every service; once draining it stays NOT_SERVING (a swap may still land)."""
        serving = serving and not self.draining.is_set()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            self.health.set(name, status)

    def drain(self) -> None:
        """Health NOT_SERVING for good; calls are still answered until :meth:`stop`."""
        self.draining.set()
        self.set_serving(False)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, then drain in-flight RPCs for ``grace`` seconds, then close the logs."""
        if self.stopped.is_set():
            return
        self.drain()
        if self.watcher:
            self.watcher.stop()
        if self.pruner:
            self.pruner.stop()
            self.pruner.join(30)   # before the log closes: then no other writer's segments are touched
        self.server.stop(self.settings.grace_s if grace is None else grace).wait()
        if self.sink:
            self.sink.close()
        if self.event_log:
            self.event_log.close()
        self.stopped.set()


def limit_native_threads(openmp_threads: int) -> None:
    """One BLAS thread and ``openmp_threads`` OpenMP threads: gRPC already runs requests in parallel,
    and spinning BLAS/OpenMP pools fighting over two cores made the DNN 30× and the GBDT 9× slower."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    threadpool_limits(openmp_threads, user_api="openmp")


def keep_large_allocations_in_heap() -> None:
    """Serve numpy's per-request temporaries (a few MB each) from the heap instead of fresh mmaps.

    glibc maps allocations above its mmap threshold anew and unmaps them on free; in gRPC's worker
    threads that meant page-faulting ~5 MB of temporaries on every Rank (the LR stage took 4.5 ms
    instead of 1.5 ms). Raising the threshold (and the trim threshold with it) reuses that memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


def build(settings: ServingSettings, worker: int = 0, metrics_http: bool = True, learner=None) -> RankingServer:
    """Create, load (if a bundle is configured) and start a server; returns at once.

    ``learner`` (a :class:`~serving.learner_process.LearnerSupervisor`) is told of every bundle that
    goes live, so the online learner learns the bundle being served."""
    limit_native_threads(settings.xgb_threads)
    keep_large_allocations_in_heap()
    # Background threads (served-record sink, watchers) must not hold the GIL for the default 5 ms
    # slices while a request waits to resume after a GIL-releasing numpy/XGBoost call.
    sys.setswitchinterval(0.0005)
    metrics = ServingMetrics()
    if settings.online_metrics_file is not None:
        metrics.registry.register(LearnerStatusCollector(settings.online_metrics_file))
    holder: dict = {}

    def on_swap(ranker) -> None:
        metrics.set_model(ranker.bundle_id, ranker.update_seq, str(ranker.path))
        if learner is not None and ranker.path is not None:
            learner.follow(ranker.path, ranker.bundle_id)
        if "server" in holder:
            holder["server"].set_serving(True)

    model = LiveModel(settings.xgb_threads, on_swap=on_swap, model_dir=settings.model_dir)
    event_log = sink = ingest = None
    if settings.eventlog_dir is not None:
        path = Path(settings.eventlog_dir) / (f"worker-{worker}" if settings.workers > 1 else "")
        event_log = BusEventLog(path, settings.bus_url, settings.eventlog_fsync) if settings.bus_url \
            else SharedEventLog(path, fsync=settings.eventlog_fsync)
        sink = EventLogSink(event_log, settings.served_batch, settings.served_flush_ms, settings.served_queue)
        metrics.registry.register(SinkCollector(sink))
    handler = RankingHandler(model, settings, sink)
    if event_log is not None:
        ingest = EventIngest(event_log, settings.dedup_window, settings.max_string_len, settings.max_future_ms,
                             returned=handler.returned)
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    ranker_svc = RankerServicer(handler, ingest, metrics, settings.online_metrics_file, settings.max_events,
                                settings.max_queue_ms / 1000)
    admin_svc = AdminServicer(model, token, metrics, lambda r: write_snapshot(r, settings.snapshot_dir))
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 1 if settings.workers > 1 else 0)]
    server = grpc.server(TimedPool(max_workers=settings.threads), options=options,
                         maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None)
    add_to_server(ranker_svc, "Ranker", server)
    add_to_server(admin_svc, "Admin", server)
    health_svc = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_svc, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert and settings.tls_key:
        creds = grpc.ssl_server_credentials([(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    rs = RankingServer(settings, server, port, model, handler, health_svc, metrics, event_log, sink)
    if event_log is not None and settings.eventlog_retention_h > 0:
        rs.pruner = LogPruner(event_log, settings.eventlog_retention_h, lambda: learner_needs(settings))
        rs.pruner.start()
    holder["server"] = rs
    rs.set_serving(False)
    server.start()
    if settings.metrics_port is not None and metrics_http:
        metrics.serve_http(settings.metrics_port + worker, settings.host if settings.host != "[::]" else "0.0.0.0")
    _load_initial(rs)
    checks = []
    if settings.control_dir is not None:  # sibling workers: share Reloads
        from .workers import ReloadBroadcast
        broadcast = ReloadBroadcast(settings.control_dir, model, worker)
        admin_svc.reload_hook = broadcast.publish
        checks.append(broadcast.check)
    if settings.updates_dir is not None and settings.update_poll_s > 0:
        checks.append(UpdateFollower(model, settings.updates_dir).check)
        model.on_update = lambda r: metrics.set_model(r.bundle_id, r.update_seq, str(r.path), swap=False)
    if checks or (settings.model_dir is not None and settings.poll_interval_s > 0):
        ticks = [t for t in (settings.update_poll_s if settings.updates_dir else 0, 0.5 if settings.control_dir else 0,
                             settings.poll_interval_s) if t > 0]
        rs.watcher = BundleWatcher(model, settings.model_dir, settings.poll_interval_s, tuple(checks), min(ticks))
        rs.watcher.start()
    return rs


def _load_initial(rs: RankingServer) -> None:
    s = rs.settings
    try:
        if s.bundle is not None:
            rs.model.load(s.bundle)
        elif s.model_dir is not None:
            rs.model.load_newest(s.model_dir)
    except RefusedBundle as e:
        log.error("%s", e)
    if not rs.model.ready and s.bundle is None:    # a refused --bundle stops the server (serve) instead
        log.warning("%s", NO_MODEL_HINT)


def serve(settings: ServingSettings, worker: int = 0, learner=None) -> int:
    """Run until SIGTERM/SIGINT: health NOT_SERVING, keep answering for ``drain_delay_s``, drain in-flight
    calls for ``grace_s``, stop."""
    rs = build(settings, worker, learner=learner)
    if settings.bundle is not None and not rs.model.ready:  # the one bundle named cannot be served
        rs.stop(0)
        log.error("not serving: the bundle given with --bundle was refused (see above)%s",
                  "" if settings.model_dir is not None else "; to start without a model and take one "
                  "later, serve a directory of bundles with --model-dir instead")
        return 2
    log.info("worker %d listening on %s:%d (%s)", worker, settings.host, rs.port,
             "ready: " + rs.model.current().version if rs.model.ready else "no model yet")
    done = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("signal %d: draining for %.1fs", signum, settings.grace_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Wait with a timeout: a signal may land on one of gRPC's threads, which would not wake an untimed
    # wait in the main thread; Python runs the handler at the next wake-up.
    while not done.wait(0.2):
        pass
    if settings.drain_delay_s:
        rs.drain()
        log.info("NOT_SERVING: still answering for %.1fs while balancers take this process out", settings.drain_delay_s)
        time.sleep(settings.drain_delay_s)
    rs.stop()
    return 0
