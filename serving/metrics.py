"""Prometheus metrics on an own registry (latency, candidates, errors by code, model version)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server

_LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.030, 0.050, 0.1, 0.25, 1.0)
_CANDIDATE_BUCKETS = (10, 50, 100, 200, 300, 500, 750, 1000, 2000)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("feedrank_rpc_latency_seconds", "Server-side RPC latency", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.candidates = Histogram("feedrank_rank_candidates", "Candidates per Rank request",
                                    buckets=_CANDIDATE_BUCKETS, registry=self.registry)
        self.errors = Counter("feedrank_rpc_errors_total", "RPC errors by status code", ["method", "code"],
                              registry=self.registry)
        self.out_of_range = Counter(
            "feedrank_rank_inputs_out_of_range_total",
            "Ranked candidates whose dense input lay outside the range the bundle's DNN was trained on "
            "(clipped to it); against feedrank_rank_candidates_sum, the share of traffic the bundle never saw",
            ["feature"], registry=self.registry)
        self.defaulted = Counter(
            "feedrank_rank_features_defaulted_total",
            "Rank requests that did not send this feature of the bundle (its default was used)",
            ["feature"], registry=self.registry)
        self.events = Counter("feedrank_events_total", "LogEvents results", ["status"], registry=self.registry)
        self.model = Info("feedrank_model", "The model version being served", registry=self.registry)
        self.swaps = Counter("feedrank_model_swaps_total", "Bundles made live", registry=self.registry)

    def set_model(self, bundle_id: str, update_seq: int, path: str, swap: bool = True) -> None:
        self.model.info({"bundle_id": bundle_id, "update_seq": str(update_seq),
                         "version": f"{bundle_id}+{update_seq}", "path": path})
        if swap:
            self.swaps.inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


class SinkCollector:
    """The served-record sink's counts (:class:`serving.sink.EventLogSink`), read at scrape time."""

    def __init__(self, sink):
        self.sink = sink

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        served = CounterMetricFamily("feedrank_served_records", "Served records by what became of them: written "
                                     "to the event log, dropped (lost), not_streamed (in the local log only)",
                                     labels=["outcome"])
        for outcome in ("written", "dropped", "not_streamed"):
            served.add_metric([outcome], float(getattr(self.sink, outcome)))
        yield served


class LearnerStatusCollector:
    """Exposes the online learner's status file (lag, events/s, join outcomes, checkpoints, update
    sequence, progressive metrics) as Prometheus metrics, read at scrape time."""

    def __init__(self, path):
        self.path = path

    def collect(self):
        import json
        from pathlib import Path

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        try:
            st = json.loads(Path(self.path).read_text())
        except (OSError, ValueError):
            return
        for name, key, help_ in (("feedrank_learner_lag_records", "lag", "Log records not yet learned"),
                                 ("feedrank_learner_events_per_second", "events_per_s", "Records learned per second"),
                                 ("feedrank_learner_update_seq", "update_seq", "Last published update sequence"),
                                 ("feedrank_learner_open_impressions", "open_impressions", "Impressions waiting in the joiner")):
            if st.get(key) is not None:
                yield GaugeMetricFamily(name, help_, value=float(st[key]))
        join = CounterMetricFamily("feedrank_learner_join", "Joiner outcomes", labels=["outcome"])
        for outcome, n in (st.get("join") or {}).items():
            join.add_metric([outcome], float(n))
        yield join
        counters = st.get("counters") or {}
        if "checkpoints" in counters:
            yield CounterMetricFamily("feedrank_learner_checkpoints", "Checkpoints written",
                                      value=float(counters["checkpoints"]))
        gauges = {m: GaugeMetricFamily(f"feedrank_progressive_{m}", f"Progressive-validation {m}",
                                       labels=["task", "window"]) for m in ("ne", "auc", "calibration")}
        for task, windows in (st.get("progressive") or {}).items():
            for window in ("overall", "recent"):
                for m, g in gauges.items():
                    v = (windows.get(window) or {}).get(m)
                    if isinstance(v, (int, float)) and v == v:
                        g.add_metric([task, window], float(v))
        yield from gauges.values()
