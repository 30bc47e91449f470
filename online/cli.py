"""``feedrank learn`` and ``feedrank bench learn``."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path


def _learner_kwargs(args) -> dict:
    return dict(tasks=tuple(args.tasks.split(",")) if args.tasks else None,
                attribution_window_ms=args.window_ms, downsample_rate=args.downsample,
                returned_is_viewed=args.returned_is_viewed, checkpoint_every_s=args.checkpoint_every_s,
                checkpoint_every_examples=args.checkpoint_every_examples,
                publish_every_s=args.publish_every_s, pretouch=args.pretouch, model_dir=args.model_dir,
                allowed_lateness_ms=args.lateness_ms, audit=args.audit)


def _new_learner(args, bundle, **extra):
    """The learner ``args`` ask for on ``bundle``: featurizing in a child process (default), or in this one."""
    if args.single_process:
        from online.learner import OnlineLearner
        return OnlineLearner(bundle, args.state, **_learner_kwargs(args), **extra)
    # Two processes: this one trains/publishes/checkpoints, a child reads, joins and featurizes.
    from online.pipeline import PipelinedLearner
    return PipelinedLearner(bundle, args.state, **_learner_kwargs(args), **extra)


def _follow(args, learner, should_stop) -> bool:
    """Follow ``--redis`` or ``--log`` until ``should_stop()``; True when the followed log was replaced or
    reopened (a new learner attaches to it)."""
    from online import replay
    if args.redis and args.single_process:
        from online.bus import RedisBus
        bus = RedisBus(args.redis, stream=args.stream, group=args.group, consumer=args.consumer)
        replay.follow_redis(learner, bus, should_stop=should_stop)
        return False
    if args.redis:
        learner.follow_redis(args.redis, stream=args.stream, group=args.group, consumer=args.consumer,
                             should_stop=should_stop)
        return False
    if args.single_process:
        return replay.follow_log(learner, args.log, should_stop=should_stop)
    return learner.follow(args.log, should_stop=should_stop)


SUMMED = ("learned_examples", "updates", "checkpoints", "other_bundle_examples", "bad_records", "future_records")


def _summary(out: dict, learner, before: dict) -> int:
    """One JSON line after a replay: what this run read, learned, skipped, published and checkpointed (a
    resumed learner's counters hold its earlier runs too: ``total_learned_examples``); exit code 2 when
    nothing was learned because every example was served by another bundle."""
    run = {k: out.get(k, 0) - before.get(k, 0) for k in SUMMED}
    print(json.dumps({"records": out["source_records"]} | run
                     | {"total_learned_examples": out["learned_examples"], "seconds": round(out["seconds"], 2),
                        "update_seq": learner.update_seq}))
    if out.get("interrupted"):
        print("feedrank learn: interrupted; what it learned is checkpointed: the same command goes on from there",
              file=sys.stderr)
        return 130
    if not run["learned_examples"] and run["other_bundle_examples"]:
        print(f"feedrank learn: learned nothing: all {run['other_bundle_examples']:,} examples were served by "
              f"other bundles than {learner.bundle_id} (give the bundle that served the log)", file=sys.stderr)
        return 2
    return 0


def cmd_learn(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True
    from feedrank.cli import UsageError
    from online.eventlog import check_log_path
    if (Path(args.state) / "manifest.json").is_file():
        raise UsageError(f"--state {args.state}: is a bundle; give the learner a directory of its own")
    if args.replay:
        try:
            check_log_path(args.replay, "--replay")
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif args.log and (Path(args.log) / "manifest.json").is_file():
        raise UsageError(f"--log {args.log}: is a bundle, not an event log (give the server's --eventlog-dir)")
    if args.bundle is None:
        if args.replay or not args.model_dir:
            raise UsageError("--bundle: the bundle the records were served with (only with --model-dir and --log "
                             "or --redis may it be left out, to learn the bundle the servers on --model-dir serve)")
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return _follow_model_dir(args, lambda: stop["now"], args.poll_s)
    while True:   # once more when the followed log is replaced or reopened: a new learner attaches to it
        code = _learn_once(args, stop, on_signal)
        if code is not True:
            return code
        if stop["now"]:
            return 0


def _learn_once(args, stop: dict, on_signal) -> int | bool:
    """One learner on ``--bundle``: an exit code, or True when the log it followed was replaced or reopened."""
    from online import replay
    learner = _new_learner(args, args.bundle)
    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if args.replay:
            before = dict(learner.counters)
            run = learner.replay if not args.single_process else (lambda path, **kw: replay.replay(learner, path, **kw))
            return _summary(run(args.replay, progress=not args.quiet, finish=not args.keep_open,
                                stop_after=args.stop_after, should_stop=lambda: stop["now"]), learner, before)
        return _follow(args, learner, lambda: stop["now"]) or 0
    finally:
        learner.close()


def _follow_model_dir(args, stopping, check_s: float = 1.0) -> int:
    """``feedrank learn --log|--redis --model-dir DIR`` without ``--bundle``: learn the bundle the servers on
    DIR serve (its pin, else its newest bundle that checks out: :func:`stacker.bundle.served_bundle`), and
    when that changes, checkpoint and go on with the new one. Its checkpoints are archived under
    ``STATE/archive/``, and moved back if the servers return to it (a rollback), as the embedded learner
    does."""
    import time

    from stacker.bundle import served_bundle
    log = logging.getLogger("feedrank.learn")
    checked: dict = {}
    waiting = False
    while not stopping():
        bundle = served_bundle(args.model_dir, checked)
        if bundle is None:
            if not waiting:
                log.info("no bundle to learn in %s yet: waiting for one", args.model_dir)
                waiting = True
            time.sleep(min(check_s, 1.0))
            continue
        waiting = False
        due = [time.monotonic() + check_s]

        def should_stop() -> bool:
            if stopping():
                return True
            if time.monotonic() < due[0]:
                return False
            due[0] = time.monotonic() + check_s
            now = served_bundle(args.model_dir, checked)
            if now is not None and now != bundle:
                log.info("the servers on %s moved to %s: checkpointing and learning it", args.model_dir, now.name)
                return True
            return False
        learner = _new_learner(args, bundle, archive_foreign=True)
        log.info("learning bundle %s (%s), the one the servers on %s serve", learner.bundle_id, bundle,
                 args.model_dir)
        try:
            _follow(args, learner, should_stop)   # a log replaced or reopened: the next turn attaches to it
        finally:
            learner.close()
    return 0


def cmd_export(args) -> int:
    from online.export import EXPORT_ERRORS, export_table
    if Path(args.out).exists() and not args.force:
        print(f"feedrank export: --out {args.out} exists; give another path, or --force to replace it",
              file=sys.stderr)
        return 2
    try:
        out = export_table(args.log, args.bundle, args.out, window_ms=args.window_ms, lateness_ms=args.lateness_ms,
                           returned_is_viewed=args.returned_is_viewed, include_open=args.include_open,
                           progress=not args.quiet)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    except EXPORT_ERRORS as e:
        print(f"feedrank export: {e}", file=sys.stderr)
        return 2
    positives = ", ".join(f"{t} {n:,}" for t, n in out["positives"].items())
    print(f"wrote {out['rows']:,} impressions to {out['out']} ({out['records']:,} log records in "
          f"{out['seconds']:.1f}s; bundles {', '.join(out['bundles']) or 'none'})")
    print(f"  positives: {positives}")
    left = "included" if args.include_open else "left out (labels not final; --include-open keeps them)"
    print(f"  not exported: {out['never_viewed']:,} never viewed; {out['open_at_end']:,} still in their "
          f"attribution window at the end of the log, {left}")
    print(f"  events: {out['duplicate_events']:,} duplicates, {out['late_events']:,} late, "
          f"{out['unmatched_events']:,} unmatched; {out['duplicate_served']:,} duplicate served records")
    if out.get("malformed_records"):
        print(f"  skipped: {out['malformed_records']:,} log records holding no well-formed record (damaged, or not "
              "a served record or event)")
    return 0


def add_join_options(p, when: str = "") -> None:
    """The joiner's options (``--window-ms``, ``--lateness-ms``, ``--returned-is-viewed``), shared by every
    command that joins served records with events; ``when`` prefixes their help."""
    from feedrank import argtypes as T
    p.add_argument("--window-ms", type=T.positive_int, default=300_000, help=f"{when}attribution window (default 300000)")
    p.add_argument("--lateness-ms", type=T.non_negative_int, default=5_000, help=f"{when}allowed event lateness (default 5000)")
    p.add_argument("--returned-is-viewed", action="store_true", help=f"{when}treat every returned post as viewed")


def cmd_bench_learn(args) -> int:
    from online.bench import bench_learn
    limits = (("-n", args.n, 1_000), ("--repeat", args.repeat, 1), ("--batch-size", args.batch_size, 1))
    for name, value, least in limits:
        if value < least:
            print(f"feedrank bench learn: {name} must be at least {least:,}, got {value}", file=sys.stderr)
            return 2
    results = bench_learn(n=args.n, cache_dir=Path(args.cache_dir), bundle=args.bundle,
                          progress=not args.quiet, redis=not args.no_redis, single=not args.no_single,
                          batch_size=args.batch_size, repeat=args.repeat)
    for r in results:
        ratio = f", {r['vs_bare']:.2f}x bare" if "vs_bare" in r else ""
        rates = r["runs_events_per_s"]
        spread = f"median of {len(rates)}, {min(rates):,.0f}-{max(rates):,.0f}; " if len(rates) > 1 else ""
        print(f"{r['source']:<12} {r['events_per_s']:>10,.0f} joined examples/s  ({spread}{r['tasks']} tasks, "
              f"{r.get('examples', 0):,} examples in {r.get('seconds', 0):.1f}s{ratio})")
    if args.json:  # the documented sources; the single-process figure is printed above
        listed = [r for r in results if r["source"] in ("log", "redis", "bare_vw")]
        Path(args.json).write_text(json.dumps(listed, indent=2))
        print(f"wrote {args.json}")
    return 0


def _add_bench_learn(sub) -> None:
    """``bench learn``: a sub-command of ``bench`` (created here, or serving's, whichever registers first)."""
    from online.bench import BENCH_CACHE_DIR
    bench = sub.choices.get("bench")
    if bench is None:
        bench = sub.add_parser("bench", help="benchmarks")
        bench.add_subparsers(dest="bench_command", required=True)
    subs = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    b = subs.add_parser("learn", help="joined examples/s through joiner + learner vs bare pylibvw")
    b.add_argument("--bundle", help="use this bundle instead of the cached bench bundle")
    b.add_argument("--cache-dir", default=BENCH_CACHE_DIR, help="where the bench bundle is trained and kept "
                   "(the one every benchmark shares)")
    b.add_argument("--json", help="write [{source, events_per_s, tasks}] here")
    b.add_argument("-n", type=int, default=100_000, help="learn: simulated impressions (default 100,000)")
    b.add_argument("--no-redis", action="store_true", help="learn: skip the Redis run")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--no-single", action="store_true", help="learn: skip the single-process log run")
    b.add_argument("--batch-size", type=int, default=1024, help="learn: examples per pipeline batch (1024)")
    b.add_argument("--repeat", type=int, default=3, help="learn: rounds of every measurement; figures are "
                   "medians (default 3)")
    b.set_defaults(func=cmd_bench_learn)


def register(sub) -> None:
    p = sub.add_parser("learn", help="online learner: join served records with events, learn, publish")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--replay", metavar="FILE_OR_LOGDIR", help="learn from a recorded log, then stop")
    src.add_argument("--log", metavar="DIR", help="follow a live event log (read-only) forever")
    src.add_argument("--redis", metavar="URL", help="consume a Redis stream (consumer group) forever")
    p.add_argument("--bundle", help="bundle directory the records were served with (with --log or --redis and "
                                    "--model-dir, leave it out to learn the bundle the servers on MODEL_DIR serve, "
                                    "moving to each one they move to)")
    p.add_argument("--state", required=True, help="learner state: checkpoints, audit, status.json")
    p.add_argument("--model-dir", help="publish weight updates under MODEL_DIR/updates/<bundle_id>/")
    p.add_argument("--poll-s", type=float, default=1.0,
                   help="without --bundle: how often to look for the bundle the servers on MODEL_DIR serve "
                        "(default 1)")
    p.add_argument("--tasks", help="comma-separated tasks to learn (default: all of the bundle's)")
    add_join_options(p)
    p.add_argument("--downsample", type=float, default=1.0, help="negative downsampling rate (default 1 = off)")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0,
                   help="checkpoint (VW models and log offsets) at least this often (default 30)")
    p.add_argument("--checkpoint-every-examples", type=int, default=None,
                   help="also checkpoint after this many learned examples (default: by time only)")
    p.add_argument("--publish-every-s", type=float, default=0.2,
                   help="with --model-dir: publish weight updates this often, or 10 times a publish's own "
                        "time if longer (default 0.2)")
    p.add_argument("--pretouch", action="store_true", help="touch every weight page at start-up")
    p.add_argument("--audit", action="store_true", help="write what each checkpoint learned to STATE/audit/")
    p.add_argument("--keep-open", action="store_true", help="with --replay: do not close open windows at the end")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stream", default="feedrank:records", help="with --redis: the stream (default feedrank:records)")
    p.add_argument("--group", default="learner", help="with --redis: the consumer group (default learner)")
    p.add_argument("--consumer", default="learner-0", help="with --redis: this consumer's name (default learner-0)")
    p.add_argument("--single-process", action="store_true",
                   help="featurize and learn in one process (default: a two-process pipeline)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("export", help="served records joined with their events, as an impression table")
    p.add_argument("--log", required=True, metavar="DIR", help="event-log directory (or one segment file)")
    p.add_argument("--bundle", required=True, action="append", metavar="DIR",
                   help="a bundle the records were served with, or a directory of bundles (repeatable)")
    p.add_argument("--out", required=True, help="impression table to write (.parquet or .jsonl)")
    add_join_options(p)
    p.add_argument("--include-open", action="store_true",
                   help="also export impressions still in their attribution window at the end of the log")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    _add_bench_learn(sub)

if __name__ == "__main__":  # pragma: no cover
    from feedrank.cli import main
    sys.exit(main())
