"""``feedrank serve`` and ``feedrank bench serve|swap|flood`` (registered into feedrank's CLI)."""
from __future__ import annotations

import argparse
import logging
import sys


def _settings(args):
    from .settings import load_settings

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "workers", "threads", "bundle",
                                                      "model_dir", "metrics_port", "admin_token",
                                                      "eventlog_dir", "tls_cert", "tls_key", "learner",
                                                      "learner_state_dir", "attribution_window_ms",
                                                      "returned_is_viewed", "downsample_rate", "bus_url")}
    return load_settings(args.config, **overrides)


def cmd_serve(args) -> int:
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    if settings.bundle is None and settings.model_dir is None:
        print("feedrank serve: no model given. Make a bundle first:\n"
              "  feedrank train --simulate 200000 --out bundles/default\n"
              "then: feedrank serve --bundle bundles/default   (or --model-dir bundles)", file=sys.stderr)
        return 2
    from .learner_process import LearnerSupervisor, wants_learner
    if settings.workers > 1:
        wants_learner(settings)  # says why there is no embedded learner
        from .workers import serve_workers
        return serve_workers(settings)
    learner = LearnerSupervisor(settings) if wants_learner(settings) else None
    if learner is not None:
        learner.start()
    try:
        from .server import serve
        return serve(settings, learner=learner)
    finally:
        if learner is not None:
            learner.stop()


def cmd_pin(args) -> int:
    """Show, set or remove a model directory's pin (stacker.bundle.pinned_bundle)."""
    from pathlib import Path

    from feedrank.cli import UsageError
    from stacker.bundle import PIN_FILE, pinned_bundle, verify, write_pin
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: not a directory of bundles")
    if args.clear and args.bundle:
        raise UsageError("give a bundle to pin, or --clear, not both")
    if args.clear:
        was = (model_dir / PIN_FILE).is_file()
        write_pin(model_dir, None)
        print(f"{model_dir} is no longer pinned: servers watching it serve its newest bundle within their poll "
              f"interval" if was else f"{model_dir} was not pinned")
        return 0
    if not args.bundle:
        pin = pinned_bundle(model_dir)
        print(f"{model_dir} is pinned to {pin.name}" if pin else f"{model_dir} is not pinned: servers watching it "
              "serve its newest bundle")
        return 0
    bundle = Path(args.bundle)
    if not (bundle.is_dir() and bundle.resolve().parent == model_dir.resolve()):
        bundle = model_dir / args.bundle
    if not bundle.is_dir() or bundle.resolve().parent != model_dir.resolve():
        raise UsageError(f"{args.bundle}: not a bundle directory in {model_dir} (servers only load bundles there)")
    manifest = verify(bundle)          # a pin to a bundle that does not load would be ignored
    write_pin(model_dir, bundle)
    print(f"{model_dir} pinned to {bundle.name} (bundle {manifest['bundle_id']}): servers watching it serve it "
          f"within their poll interval, and after a restart, in place of its newest bundle; "
          f"`feedrank pin {model_dir} --clear` removes the pin")
    return 0


def cmd_bench(args) -> int:
    from . import bench, freshness
    logging.basicConfig(level=logging.WARNING)
    return {"serve": bench.bench_serve, "swap": bench.bench_swap, "flood": bench.bench_flood,
            "freshness": freshness.bench_freshness}[args.what](args)


class _SettingsDefaults(argparse.HelpFormatter):
    """``serve --help`` gives the default of each flag in ``SHOWN`` from the settings themselves (the flags
    default to None so a settings file and the environment can apply); pydantic is imported only when help
    is shown, not on every command's start-up."""

    SHOWN = ("host", "port", "workers", "threads", "metrics_port", "eventlog_dir", "learner_state_dir",
             "attribution_window_ms", "downsample_rate")

    def _get_help_string(self, action):
        if action.dest not in self.SHOWN:
            return action.help
        from .settings import ServingSettings
        d = ServingSettings.model_fields[action.dest].default
        return f"{action.help} (default {'off' if d is None else d})"


def register(sub) -> None:
    from feedrank import argtypes as T
    p = sub.add_parser("serve", help="run the gRPC ranking server", formatter_class=_SettingsDefaults)
    p.add_argument("--config", help="settings file (.toml, .json or .yaml); env FEEDRANK_* and flags override it")
    p.add_argument("--bundle", help="bundle directory to serve")
    p.add_argument("--model-dir", help="serve the newest valid bundle here and hot-swap newer ones")
    p.add_argument("--host", help="address to listen on ('[::]' for all interfaces)")
    p.add_argument("--port", type=T.port, help="gRPC port (0 = pick a free one)")
    p.add_argument("--workers", type=T.positive_int, help="server processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--threads", type=T.positive_int, help="gRPC handler threads per process")
    p.add_argument("--metrics-port", type=T.port, help="Prometheus HTTP port")
    p.add_argument("--admin-token", help="bearer token for Reload/Snapshot (prefer FEEDRANK_ADMIN_TOKEN; "
                                         "default: admin calls refused)")
    p.add_argument("--eventlog-dir", help="local event log directory (off: serve without one, nor a learner)")
    p.add_argument("--tls-cert", help="server certificate (PEM), with --tls-key (default: plaintext)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--learner", action=argparse.BooleanOptionalAction, default=None,
                   help="run the online learner in its own process beside the server (default: on)")
    p.add_argument("--learner-state-dir", help="the learner's checkpoints, status and published updates")
    p.add_argument("--attribution-window-ms", type=T.positive_int, help="attribution window in ms of event time")
    p.add_argument("--returned-is-viewed", action="store_true", default=None,
                   help="treat every returned post as viewed")
    p.add_argument("--downsample-rate", type=T.rate, help="online negative downsampling rate (1 = off)")
    p.add_argument("--bus", dest="bus_url", help="Redis URL of the event bus (scale-out: replicas publish, one learner consumes)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pin", help="serve one bundle of a model directory in place of the newest, on every "
                                   "server watching it and across restarts (a rollback), or show or remove the pin")
    p.add_argument("model_dir", help="the directory of bundles servers watch (--model-dir)")
    p.add_argument("bundle", nargs="?", help="a bundle directory in it (its path or its name)")
    p.add_argument("--clear", action="store_true", help="remove the pin: the newest bundle serves again")
    p.set_defaults(func=cmd_pin)

    from online.bench import BENCH_CACHE_DIR
    bench = _bench_subparsers(sub)
    for name, help_ in (("serve", "Rank latency (server/client p50, p99) and req/s at several concurrencies"),
                        ("swap", "ten+ hot swaps (Reload) under load at concurrency 4; counts failed requests"),
                        ("flood", "malformed-request flood: server stays SERVING, RSS growth"),
                        ("freshness", "engagement acknowledged → Rank response including it, under load")):
        p = bench.add_parser(name, help=help_)
        p.add_argument("--bundle", help="bundle to serve (default: train one into --cache-dir if missing)")
        p.add_argument("--cache-dir", default=BENCH_CACHE_DIR, help="where the benchmark bundle is kept")
        p.add_argument("--candidates", type=T.positive_int, default=500, help="candidates per Rank request")
        p.add_argument("--workers", type=T.positive_int, default=1, help="server processes (SO_REUSEPORT)")
        p.add_argument("--threads", type=T.positive_int, default=4, help="gRPC threads per server process")
        p.add_argument("--xgb-threads", type=T.positive_int, default=1, help="XGBoost threads per prediction")
        if name == "serve":
            p.add_argument("--requests", type=T.positive_int, default=400, help="Rank requests per concurrency level")
            p.add_argument("--concurrency", default="1,4,16", type=_levels, help="comma-separated concurrency levels")
            p.add_argument("--setup", default="both", choices=["alone", "with_learner", "both"],
                           help="alone: the server only; with_learner: its online learner learning "
                                "--events-per-s events; both (default)")
            p.add_argument("--events-per-s", type=float, default=5000.0,
                           help="with_learner: LogEvents rate for served posts")
            p.add_argument("--max-queue-ms", type=float, default=0.0,
                           help="the server's max_queue_ms: Rank calls queued longer are shed and counted apart "
                                "from errors (default 0: none shed, every call measured)")
            p.add_argument("--json", help="write results as JSON and a latency histogram PNG beside it")
        if name == "swap":
            p.add_argument("--swaps", type=T.positive_int, default=10, help="hot swaps")
            p.add_argument("--steady-s", type=float, default=8.0, help="steady-state load before the swaps")
            p.add_argument("--json", help="write the figures as JSON")
        if name == "freshness":
            p.add_argument("--mode", default="both", choices=["embedded", "redis", "both"])
            p.add_argument("--samples", type=T.positive_int, default=200, help="freshness samples per mode")
            p.add_argument("--window-ms", type=int, default=300_000,
                           help="attribution window (default: the production 5 minutes)")
            p.add_argument("--rank-per-s", type=float, default=100.0, help="background Rank requests/s")
            p.add_argument("--events-per-s", type=float, default=5000.0, help="background events/s")
            p.add_argument("--warmup-s", type=float, default=5.0)
            p.add_argument("--timeout-s", type=float, default=10.0, help="give a sample up after this")
            p.add_argument("--json", help="write [{mode, p50_s, p99_s, samples}] and a histogram PNG")
        if name == "flood":
            p.add_argument("--flood", type=T.positive_int, default=100_000, help="malformed requests")
        p.set_defaults(func=cmd_bench, what=name)


def _levels(text: str) -> str:
    try:
        ok = all(int(c) >= 1 for c in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return text


def _bench_subparsers(sub):
    """The ``bench`` command's sub-commands, shared with other packages' benchmarks."""
    import argparse as _argparse

    bench = sub.choices.get("bench")
    if bench is None:
        bench = sub.add_parser("bench", help="benchmarks")
        return bench.add_subparsers(dest="bench_command", required=True)
    for action in bench._actions:
        if isinstance(action, _argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="bench_command", required=True)
