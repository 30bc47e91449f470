"""Thin gRPC servicers: protobuf → plain objects → handler; ServingError → status code, in one place."""
from __future__ import annotations

import functools
import hmac
import json
import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from feedrank.v1 import ranking_pb2 as pb
from feedrank.v1 import ranking_pb2_grpc as pb_grpc

from . import convert
from .errors import InvalidInput, NotConfigured, Overloaded, PermissionDenied, ServingError, TooLarge, Unauthenticated
from .events import EventIngest
from .handler import RankingHandler
from .metrics import ServingMetrics
from .model import LiveModel

log = logging.getLogger(__name__)


class Malformed:
    """What the lenient deserializer returns for bytes that are not the expected message."""

    def __init__(self, message_type: str, error: Exception):
        self.message_type, self.error = message_type, error
        self.request_id = ""


def lenient(message_cls):
    """A request deserializer that never raises: gRPC answers INTERNAL (and leaked ~15 KB per call
    in the flood benchmark) when a deserializer raises, so parse errors reach ``mapped`` instead."""
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # DecodeError, or anything protobuf raises on garbage
            return Malformed(message_cls.DESCRIPTOR.full_name, e)
    return parse


def add_to_server(servicer, service_name: str, server: grpc.Server) -> None:
    """Register a servicer like the generated ``add_*_to_server``, with lenient deserializers."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name), request_deserializer=lenient(request_cls),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class TimedPool(futures.ThreadPoolExecutor):
    """The server's handler threads, noting how long each task waited for a thread: gRPC submits a call
    as its headers arrive, so this is the call's time in the queue, not the time its request took to
    arrive (the thread reads the request after taking the call up)."""

    _local = threading.local()

    def submit(self, fn, /, *args, **kwargs):
        submitted = time.monotonic()

        def timed(*a, **k):
            TimedPool._local.waited = time.monotonic() - submitted
            return fn(*a, **k)
        return super().submit(timed, *args, **kwargs)

    @classmethod
    def waited(cls) -> float:
        """Seconds the task running on this thread waited for it (0 outside a pool task)."""
        return getattr(cls._local, "waited", 0.0)


def mapped(method: str):
    """The one place exceptions become status codes (and error metrics)."""
    def wrap(fn):
        @functools.wraps(fn)
        def rpc(self, request, context: grpc.ServicerContext):
            t0 = time.perf_counter()
            try:
                if isinstance(request, Malformed):
                    raise InvalidInput("request", f"not a valid {request.message_type} ({request.error})")
                return fn(self, request, context)
            except ServingError as e:
                self.metrics.errors.labels(method, e.code.name).inc()
                context.abort(e.code, str(e))
            except Exception:
                rid = getattr(request, "request_id", "") or "-"
                log.exception("%s failed (request_id=%s)", method, rid)
                self.metrics.errors.labels(method, "INTERNAL").inc()
                context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id={rid}); see server log")
            finally:
                self.metrics.latency.labels(method).observe(time.perf_counter() - t0)
        return rpc
    return wrap


class RankerServicer(pb_grpc.RankerServicer):
    def __init__(self, handler: RankingHandler, ingest: EventIngest | None, metrics: ServingMetrics,
                 online_metrics_file: Path | None = None, max_events: int = 10_000, max_queue_s: float = 0.0):
        self.handler, self.ingest, self.metrics = handler, ingest, metrics
        self.max_queue_s = max_queue_s     # a Rank that waited longer for a thread is refused (0: never)
        self.max_events = max_events
        self.online_metrics_file = online_metrics_file

    def _online_metrics(self) -> dict | None:
        """The online learner's latest metrics (a JSON object it publishes), if any."""
        if self.online_metrics_file is None:
            return None
        try:
            data = json.loads(Path(self.online_metrics_file).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @mapped("Rank")
    def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        waited = TimedPool.waited()
        if self.max_queue_s and waited > self.max_queue_s:
            raise Overloaded(f"overloaded: this call waited {waited * 1000:.0f} ms for a handler thread, limit "
                             f"{self.max_queue_s * 1000:.0f} ms (max_queue_ms); nothing was ranked: retry with "
                             f"backoff or on another replica")
        t0 = time.perf_counter()
        self.metrics.candidates.observe(len(request.candidates.post_ids))
        plain = convert.rank_input(request)
        t1 = time.perf_counter()
        result = self.handler.rank(plain, context.time_remaining, context.is_active)
        for name, n in result.out_of_range.items():
            self.metrics.out_of_range.labels(name).inc(n)
        for name in result.defaulted_feature_names:
            self.metrics.defaulted.labels(name).inc()
        t2 = time.perf_counter()
        response = convert.rank_response(result)
        t3 = time.perf_counter()
        stages = {"decode": t1 - t0, **result.timings, "encode": t3 - t2}
        for k, v in stages.items():
            response.stage_ms[k] = v * 1000.0
        response.server_ms = (t3 - t0) * 1000.0
        context.set_trailing_metadata((("server-ms", f"{response.server_ms:.3f}"),))
        return response

    @mapped("Info")
    def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        ranker = self.handler.model.current()
        m = ranker.manifest
        window = m.get("training", {}).get("time_range_ms", [0, 0])
        return pb.InfoResponse(
            model_version=convert.version_of(ranker),
            bundle_path=str(ranker.path or ""), training_start_ms=window[0], training_end_ms=window[1],
            tasks=list(ranker.tasks), ev_weights=ranker.ev_weights,
            user_feature_names=list(ranker.spec.user_features),
            candidate_feature_names=list(ranker.spec.post_features), trees=ranker.extractor.trees,
            offline_metrics=convert.struct(m.get("offline_metrics")),
            online_metrics=convert.struct(self._online_metrics()),
            loaded_at_ms=self.handler.model.loaded_at_ms)

    @mapped("LogEvents")
    def LogEvents(self, request: pb.LogEventsRequest, context) -> pb.LogEventsResponse:
        if self.ingest is None:
            raise NotConfigured("LogEvents: this server runs without an event log (eventlog_dir off), so it takes "
                                "no events; send them to a server with one")
        if len(request.events) > self.max_events:
            raise TooLarge("events", f"{len(request.events)} events, limit {self.max_events} per call")
        results = self.ingest.log_events(convert.event_dicts(request))
        for r in results:
            self.metrics.events.labels(r.status).inc()
        return convert.events_response(results)


class AdminServicer(pb_grpc.AdminServicer):
    """Reload and Snapshot, behind ``authorization: Bearer <token>``."""

    def __init__(self, model: LiveModel, token: str | None, metrics: ServingMetrics, snapshot, reload_hook=None):
        self.model, self.token, self.metrics = model, token, metrics
        self.snapshot, self.reload_hook = snapshot, reload_hook

    def _authorize(self, context) -> None:
        headers = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if len(headers) > 1:
            raise Unauthenticated(f"authorization: {len(headers)} 'authorization' metadata entries, expected one")
        header = headers[0] if headers else None
        if not header:
            raise Unauthenticated("authorization: missing metadata 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        if self.token is None:
            raise PermissionDenied("authorization: admin RPCs are disabled (no admin_token configured)")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise PermissionDenied("authorization: token not accepted")

    @mapped("Reload")
    def Reload(self, request: pb.ReloadRequest, context) -> pb.ReloadResponse:
        self._authorize(context)
        if not request.bundle_path:
            raise InvalidInput("bundle_path", "missing")
        ranker = self.model.reload(request.bundle_path)  # loads on this RPC's thread, Rank keeps going
        previous = self.model.reload_previous
        if self.reload_hook:
            self.reload_hook(request.bundle_path)
        return pb.ReloadResponse(model_version=convert.version_of(ranker),
                                 previous_version=convert.version_of(previous) if previous else None)

    @mapped("Snapshot")
    def Snapshot(self, request: pb.SnapshotRequest, context) -> pb.SnapshotResponse:
        self._authorize(context)
        ranker = self.model.current()
        path = self.snapshot(ranker)
        return pb.SnapshotResponse(path=str(path), model_version=convert.version_of(ranker))
