"""The ``feedrank`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from feedrank import argtypes as T


class UsageError(ValueError):
    """A mistake in what the command was given: one line, exit code 2 (see :func:`main`)."""


def _progress(args):
    from stacker.progress import Progress
    return Progress(enabled=not getattr(args, "quiet", False))


def _train_config(args):
    from stacker.dnn import DNNConfig
    from stacker.gbdt import GBDTConfig
    from stacker.train import TrainConfig
    from stacker.vwstack import UNIT_VALUES, VWConfig
    interactions = tuple(args.interactions.split(",")) if args.interactions else ()
    shared = ({} if args.shared_tasks is None else
              {"shared_tasks": () if args.shared_tasks in ("", "none") else tuple(args.shared_tasks.split(","))})
    from stacker.schema import TASKS
    unknown = [t for t in shared.get("shared_tasks", ()) if t not in TASKS]
    if unknown:
        raise UsageError(f"--shared-tasks: unknown task {unknown[0]!r} (tasks: {', '.join(TASKS)})")
    if args.shared_ids is not None:
        shared["shared_ids"] = args.shared_ids
    if args.optimizer != "ftrl" and args.ftrl_alpha is not None:
        raise UsageError("--ftrl-alpha applies to --optimizer ftrl only")
    try:
        if args.optimizer == "ftrl":
            vw = VWConfig(bits=args.bits, interactions=interactions, **shared,
                          **({} if args.ftrl_alpha is None else {"ftrl_alpha": args.ftrl_alpha}))
        else:   # VW's default adaptive update on unit feature values
            vw = VWConfig(bits=args.bits, interactions=interactions, **shared, optimizer="adaptive",
                          values=UNIT_VALUES)
        return TrainConfig(gbdt=GBDTConfig(trees=args.trees, depth=args.depth),
                           dnn=DNNConfig(epochs=args.epochs), vw=vw,
                           downsample_rate=args.downsample, online_learning_rate=args.online_learning_rate,
                           dense_warmup=not args.no_dense_warmup, refit_biases=not args.no_bias_refit,
                           extractor_slice_pass=not args.no_extractor_slice_pass,
                           slices=_fractions(args.slices))
    except ValueError as e:
        raise UsageError(f"{e}")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--slices {text!r}: three comma-separated fractions, e.g. 0.3,0.5,0.2") from None


def _add_train_options(p):
    from online.cli import add_join_options
    p.add_argument("--trees", type=T.positive_int, default=200, help="GBDT trees (default 200)")
    p.add_argument("--depth", type=T.positive_int, default=6, help="GBDT depth (default 6)")
    p.add_argument("--epochs", type=T.positive_int, default=8, help="DNN epochs (default 8)")
    p.add_argument("--bits", type=T.bits, default=26,
                   help="VW -b hash bits of the one workspace every task shares (default 26: 2**23 rows "
                        "of 8 task slots; 1 GiB of VW state, 256 MiB served)")
    p.add_argument("--interactions", default="ua,up",
                   help="id crosses, as pairs of u (user), p (post), a (author) (default ua,up)")
    p.add_argument("--shared-tasks", default=None,
                   help="tasks whose id-cross (user×author, user×post) weights are also learned jointly, "
                        "from all their labels (default click,like,comment,share,dwell; 'none' to learn "
                        "every task alone)")
    p.add_argument("--shared-ids", default=None,
                   help="ids whose weights the shared tasks also learn jointly, beside the id crosses: letters "
                        "of u (user), p (post), a (author) (default none)")
    p.add_argument("--optimizer", choices=("ftrl", "adaptive"), default="ftrl",
                   help="sparse LR update: FTRL-proximal with per-namespace feature values (default), "
                        "or VW's adaptive update on unit values")
    p.add_argument("--ftrl-alpha", type=T.positive_float, default=None, help="FTRL alpha (default 0.1)")
    p.add_argument("--downsample", type=T.rate, default=0.5,
                   help="negative downsampling rate w (default 0.5; 1 = off); kept negatives weigh 1/w")
    p.add_argument("--online-learning-rate", type=T.positive_float, default=None,
                   help="VW -l for online learning with --optimizer adaptive (default 0.15); FTRL "
                        "models keep their alpha online")
    p.add_argument("--no-dense-warmup", action="store_true",
                   help="learn the LR's own slice in one pass with every namespace, without the pass over the "
                        "dense ones alone (leaves, DNN, context) before it")
    p.add_argument("--no-extractor-slice-pass", action="store_true",
                   help="learn the LR from its own slice only. By default it first makes one pass over the "
                        "extractors' slice (its rows downsampled as the LR's), so the ids, id crosses and "
                        "context learn from both training slices; in eval only the stack makes it")
    p.add_argument("--no-bias-refit", action="store_true",
                   help="keep each task's bias as the LR's passes leave it, without shifting it so the LR's mean "
                        "prediction on every row of its slice equals the slice's label rate")
    p.add_argument("--slices", default="0.3,0.5,0.2",
                   help="time-slice fractions: extractors (GBDT, DNN), LR, evaluation (default 0.3,0.5,0.2)")
    p.add_argument("--served-by", action="append", metavar="DIR",
                   help="with --data EVENT_LOG_DIR: a bundle the log's records were served with, or a directory "
                        "of bundles (repeatable); the log is joined and exported as by `feedrank export`")
    add_join_options(p, when="with --data EVENT_LOG_DIR: ")
    p.add_argument("--include-open", action="store_true",
                   help="with --data EVENT_LOG_DIR: also learn impressions still in their attribution window at "
                        "the end of the log (labels not final)")
    p.add_argument("--seed", type=int, default=None, help="simulator seed (default: the pinned world's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _log_table(args):
    """An event log's served records joined with their events, as an impression table."""
    import tempfile
    from online.export import EXPORT_ERRORS, export_table
    from stacker.dataset import read_table
    if not args.served_by:
        raise UsageError(f"{args.data} is a directory (an event log?): give the bundles its records "
                         "were served with, --served-by DIR (repeatable)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary = export_table(args.data, args.served_by, Path(tmp) / "served.parquet",
                                   window_ms=args.window_ms, lateness_ms=args.lateness_ms,
                                   returned_is_viewed=args.returned_is_viewed,
                                   include_open=getattr(args, "include_open", False), progress=not args.quiet,
                                   name="the impression table")
        except EXPORT_ERRORS as e:
            raise UsageError(f"{e}")
        left = "included" if getattr(args, "include_open", False) else "left out"
        print(f"joined {summary['rows']:,} viewed impressions from {summary['records']:,} log records "
              f"({summary['open_at_end']:,} still in their attribution window, {left})", file=sys.stderr)
        return read_table(Path(tmp) / "served.parquet")


def _load_data(args, components: bool = False):
    """The table to work on and where it came from; with ``components``, also the simulated world's
    logit components per row (None for tables and public datasets)."""
    from feedsim.simulate import simulate
    from stacker.dataset import read_table
    if getattr(args, "data", None) and not Path(args.data).exists():
        raise UsageError(f"--data {args.data}: no such file or directory (a table, or an event-log directory "
                         "with --served-by)")
    if getattr(args, "data", None) and Path(args.data).is_dir():
        out = _log_table(args), f"event log {args.data}", None
    elif getattr(args, "data", None):
        if getattr(args, "served_by", None):
            raise UsageError(f"--served-by goes with an event-log directory in --data, and {args.data} is a "
                             "table (its features are named already): drop --served-by")
        out = read_table(args.data), f"table {args.data}", None
    elif getattr(args, "dataset", None):
        from stacker.movielens import load_movielens_100k
        out = load_movielens_100k(), "movielens-100k", None
    else:
        n = args.simulate
        t0 = time.time()
        result = simulate(n, seed=args.seed, progress=not args.quiet, return_components=components)
        df, comps = result if components else (result, None)
        print(f"simulated {len(df):,} impressions in {time.time() - t0:.1f}s", file=sys.stderr)
        out = df, f"feedsim default world, {n:,} impressions", comps
    return out if components else out[:2]


def cmd_simulate(args):
    from feedsim.describe import describe, format_description
    from feedsim.simulate import simulate
    from stacker.dataset import write_table
    from stacker.metrics import write_json
    if args.describe:
        if args.out:
            raise UsageError("--describe prints the world's statistics and writes no table: drop --out, "
                             "or run simulate --out without --describe")
        _check_writable(args.json, "--json")
        d = describe(n_impressions=args.n, seed=args.seed, progress=_progress(args), topic_samples=args.topic_samples)
        print(format_description(d))
        if args.json:
            write_json(d, args.json)
        return 0
    if not args.out:
        raise UsageError("give --out PATH (.parquet or .jsonl) or --describe")
    if args.json or args.topic_samples:
        raise UsageError(f"{'--json' if args.json else '--topic-samples'} goes with --describe")
    if Path(args.out).suffix.lower() not in (".parquet", ".jsonl"):
        raise UsageError(f"--out {args.out}: use .parquet or .jsonl")
    if Path(args.out).exists() and not args.force:
        raise UsageError(f"--out {args.out} exists; give another path, or --force to replace it")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    df = simulate(args.n, seed=args.seed, progress=not args.quiet)
    write_table(df, args.out)    # in place only once whole
    print(f"wrote {len(df):,} impressions to {args.out} in {time.time() - t0:.1f}s")
    return 0


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write a bundle over anything but an empty directory, or a bundle with --force."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if (out / "manifest.json").is_file():
        if not force:
            raise UsageError(f"--out {out} holds a bundle already; give another directory, or "
                             f"--force to replace it")
    elif any(out.iterdir()):
        raise UsageError(f"--out {out} is a directory of other files, not a bundle; give a new "
                         f"or empty directory")


def _check_writable(path, flag: str, directory: bool = False) -> None:
    """Refuse, before any work, an output path that could not be written: a file that is there must be
    writable, and otherwise the nearest directory that is there on the way to it (the writer makes the
    rest); a file's path must not be a directory. Nothing is made here."""
    if not path:
        return
    path = Path(path)
    if not directory and path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    if path.exists() and not directory:
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: not writable")
        return
    there = path if directory else path.parent
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise UsageError(f"{flag} {path}: {there} is not a directory")
    if not os.access(there, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {there} is not a writable directory")


def cmd_train(args):
    from stacker.train import train_bundle
    _check_out(Path(args.out), args.force)
    config = _train_config(args)
    df, source = _load_data(args)
    out = Path(args.out)
    t0 = time.time()
    path = train_bundle(df, out, config, progress=_progress(args))
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"bundle {manifest['bundle_id']} written to {path} ({time.time() - t0:.1f}s, source: {source})")
    from stacker.schema import TASKS, tasks_in
    absent = [t for t in TASKS if t not in tasks_in(df.columns)]
    left_out = manifest["training"].get("tasks_left_out", [])
    if absent or left_out:
        why = [f"no label column for {', '.join(absent)}"] if absent else []
        why += [f"{', '.join(left_out)} left out: one outcome only"] if left_out else []
        print(f"  tasks: {', '.join(manifest['tasks'])} ({'; '.join(why)})")
    metrics = manifest.get("offline_metrics", {}).get("tasks", {})

    def num(x, digits):   # null in the manifest: not defined (no positive in the test slice)
        return "n/a" if x is None else f"{x:.{digits}f}"
    for task in (t for t in manifest["tasks"] if t in metrics):    # the bundle's task order
        m = metrics[task]
        base = f" (base rate {num(m['base_rate_ne'], 4)})" if "base_rate_ne" in m else ""
        print(f"  {task:<8} NE {num(m['ne'], 4)}{base}  AUC {num(m['auc'], 4)}  "
              f"calibration {num(m['calibration'], 3)}  positives {m['positives']}")
    outside = sorted(((v, k) for k, v in manifest.get("offline_metrics", {}).get("inputs_out_of_range", {}).items()
                      if v >= 0.01), reverse=True)
    if outside:
        print("  test rows with an input outside the DNN's training range (the network clips it): "
              + ", ".join(f"{k} {v:.0%}" for v, k in outside[:6]))
    return 0


def cmd_eval(args):
    from stacker.evaluate import evaluate, format_table, write_outputs
    _check_writable(args.json, "--json")
    _check_writable(args.plots, "--plots", directory=True)
    config = _train_config(args)
    df, source, comps = _load_data(args, components=True)
    peers = {}
    name = "simulated"
    if args.dataset:
        from stacker.movielens import river_fm_predict
        peers["river_fm"] = lambda train, test: river_fm_predict(train, test)
        name = args.dataset
    elif args.data:
        name = str(args.data)
    report = evaluate(df, config, dataset=name, peers=peers, progress=_progress(args), components=comps,
                      label_delay_ms=int(round(args.label_delay_s * 1000)))
    print(format_table(report))
    out_dir = Path(args.plots) if args.plots else None
    for path in write_outputs(report, Path(args.json) if args.json else None, out_dir):
        print(f"wrote {path}")
    return 0


def cmd_eval_online(args):
    from online.compare import compare, format_comparison, plot, write
    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")
    config = _train_config(args)
    df, source = _load_data(args)
    report = compare(df, config, bundle_share=args.bundle_share, progress=_progress(args))
    report["source"] = source
    print(format_comparison(report))
    if args.json:
        write(report, Path(args.json))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(report, Path(args.plot))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feedrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write simulated impressions or describe the default world")
    p.add_argument("-n", type=T.positive_int, default=1_000_000,
                   help="impressions (default 1,000,000); with --describe, the sample its statistics are "
                        "measured on")
    p.add_argument("--out", help="output table (.parquet or .jsonl)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--describe", action="store_true", help="print the default world's statistics")
    p.add_argument("--json", help="with --describe: also write the statistics as JSON")
    p.add_argument("--topic-samples", type=T.non_negative_int, default=0, metavar="S",
                   help="with --describe: also score oracles that see each post's topic only via its features "
                        "(S draws per post; 32 takes about half an hour on 1M impressions)")
    p.add_argument("--seed", type=int, default=None,
                   help="draw another sample of impressions (requests, users, labels) from the same world "
                        "(default: the world's own seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train a bundle from a table or the simulator")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="impression table (.parquet or .jsonl), or an event-log directory "
                                    "(with --served-by)")
    src.add_argument("--simulate", type=T.positive_int, metavar="N", help="train on N simulated impressions")
    p.add_argument("--out", default="bundles/default", help="bundle directory (default bundles/default)")
    p.add_argument("--force", action="store_true", help="replace the bundle already in --out")
    _add_train_options(p)
    p.set_defaults(func=cmd_train, dataset=None)

    p = sub.add_parser("eval", help="train every variant and compare them on the latest time slice")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="impression table (.parquet or .jsonl), or an event-log directory "
                                    "(with --served-by)")
    src.add_argument("--simulate", type=T.positive_int, metavar="N", help="evaluate on N simulated impressions")
    src.add_argument("--dataset", choices=["movielens-100k"], help="a public dataset")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--plots", default="runs/eval", help="directory for PNG plots (default runs/eval)")
    p.add_argument("--label-delay-s", type=T.non_negative_float, default=300.0,
                   help="stack_online learns each test row this long after its time, as the online learner "
                        "learns an impression when its attribution window closes (default 300)")
    _add_train_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-online", help="the same bundle on a later stream: learning online vs frozen")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="impression table (.parquet or .jsonl), or an event-log directory "
                                    "(with --served-by)")
    src.add_argument("--simulate", type=T.positive_int, metavar="N", help="N simulated impressions")
    p.add_argument("--bundle-share", type=T.share, default=0.5,
                   help="share of the (time-ordered) rows the bundle is trained on; the rest is streamed "
                        "(default 0.5)")
    p.add_argument("--plot", default="runs/eval-online.png",
                   help="PNG of NE over time, frozen vs online (default runs/eval-online.png)")
    p.add_argument("--json", help="write the comparison as JSON")
    _add_train_options(p)
    p.set_defaults(func=cmd_eval_online, dataset=None)

    from feedrank import commands
    commands.register(sub)
    return parser


def _message(e: BaseException) -> str:
    """One line for a user's mistake: what was wrong, where."""
    errors = getattr(e, "errors", None)
    if callable(errors) and type(e).__name__ == "ValidationError":  # pydantic: settings
        return "; ".join(f"setting {'.'.join(map(str, err['loc'])) or '?'}: {err['msg']}" for err in e.errors())
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e.strerror or ""):
        return f"{e.filename}: {e.strerror or e}"
    return str(e) or type(e).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from stacker.bundle import BundleError
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"\nfeedrank {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, BundleError) as e:
        if os.environ.get("FEEDRANK_DEBUG"):
            raise
        hint = "" if isinstance(e, UsageError) else "\n(FEEDRANK_DEBUG=1 shows the traceback)"
        print(f"feedrank {args.command}: error: {_message(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
