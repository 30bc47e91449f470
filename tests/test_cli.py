"""The `feedrank` command on bad input: one line naming what is wrong, exit code 2, nothing destroyed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feedrank.cli import main
from tests.conftest_online import WINDOW_MS, tiny_records  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--trees", "5", "--epochs", "1", "--bits", "18", "--quiet"]


def _fails(capsys, argv) -> str:
    """Run ``feedrank argv`` in-process; it must exit 2 with a one-line reason (argparse's usage aside)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv,says", [
    (["train", "--simulate", "0"], "--simulate: must be at least 1, got 0"),
    (["eval", "--simulate", "-5"], "--simulate: must be at least 1, got -5"),
    (["train", "--simulate", "100", "--downsample", "0"], "--downsample: must be in (0, 1], got 0"),
    (["train", "--simulate", "100", "--bits", "40"], "--bits: must be between 12 and 30, got 40"),
    (["eval", "--simulate", "100", "--label-delay-s", "-100"], "--label-delay-s: must be a finite number, 0 or more"),
    (["train", "--simulate", "100", "--ftrl-alpha", "-1"], "--ftrl-alpha: must be a finite number above 0"),
    (["eval-online", "--simulate", "100", "--bundle-share", "1"], "--bundle-share: must be between 0 and 1"),
    (["serve", "--port", "99999"], "--port: must be a TCP port, 0 to 65535, got 99999"),
    (["serve", "--threads", "0"], "--threads: must be at least 1, got 0"),
    (["demo", "--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    (["bench", "serve", "--concurrency", "1,0"], "--concurrency: expected comma-separated positive integers"),
    (["train", "--simulate", "100", "--slices", "0.5,0.6,0.2"], "slices 0.5,0.6,0.2: three fractions that sum to 1"),
    (["train", "--simulate", "100", "--slices", "0.5,0.5"], "slices 0.5,0.5: three fractions"),
    (["train", "--simulate", "100", "--slices", "a,b,c"], "--slices 'a,b,c': three comma-separated fractions"),
    (["train", "--simulate", "100", "--shared-tasks", "clik,like"], "--shared-tasks: unknown task 'clik'"),
    (["train", "--simulate", "100", "--interactions", "ua,au"], "id crosses ua,au: a cross is listed twice"),
    (["simulate", "--describe", "--out", "x.parquet"], "--describe prints the world's statistics and writes no table"),
])
def test_bad_arguments_are_refused_before_any_work(capsys, argv, says):
    assert says in _fails(capsys, argv)


def test_bad_tables_and_paths_get_one_line(capsys, tmp_path):
    assert "nope.parquet: no such file" in _fails(capsys, ["train", "--data", str(tmp_path / "nope.parquet"),
                                                            "--out", str(tmp_path / "b")])
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    err = _fails(capsys, ["eval", "--data", str(tmp_path / "bad.jsonl")])
    assert err.startswith("feedrank eval: error: ") and "bad.jsonl: not valid JSON Lines" in err and "line 2" in err
    assert "use .parquet or .jsonl" in _fails(capsys, ["simulate", "-n", "100", "--out", str(tmp_path / "x.csv")])
    assert not (tmp_path / "b").exists()
    assert main(["simulate", "-n", "300", "--out", str(tmp_path / "t.parquet"), "--quiet"]) == 0
    assert "--served-by goes with an event-log directory in --data" in _fails(
        capsys, ["train", "--data", str(tmp_path / "t.parquet"), "--served-by", str(tmp_path), "--out",
                 str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
    (tmp_path / "afile").write_text("")
    for argv in (["eval", "--json", str(tmp_path / "afile" / "e.json")], ["eval", "--plots", str(tmp_path / "afile")],
                 ["eval-online", "--plot", str(tmp_path / "afile" / "o.png")]):
        err = _fails(capsys, [*argv, "--simulate", "3000"])     # refused before simulating anything
        assert err.startswith(f"feedrank {argv[0]}: error: {argv[1]} ") and "afile" in err and "simulated" not in err


def test_too_few_rows_to_train_on_are_refused(capsys, tmp_path):
    err = _fails(capsys, ["train", "--simulate", "50", "--out", str(tmp_path / "b"), *TINY])
    assert "rows are too few to train on" in err and "each needs at least 200" in err
    assert not (tmp_path / "b").exists()


def test_simulate_creates_the_directory_of_its_output_and_replaces_a_table_only_when_told(capsys, tmp_path):
    out = tmp_path / "data" / "deeper" / "t.parquet"
    assert main(["simulate", "-n", "300", "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
    first = out.read_bytes()
    assert "exists; give another path, or --force" in _fails(capsys, ["simulate", "-n", "400", "--out", str(out)])
    assert out.read_bytes() == first
    assert main(["simulate", "-n", "400", "--out", str(out), "--quiet", "--force"]) == 0
    assert out.read_bytes() != first


@pytest.fixture(scope="module")
def table_3k(tmp_path_factory):
    from feedsim.simulate import simulate
    return simulate(3000)


def test_a_task_without_both_outcomes_is_left_out_and_odd_tables_are_warned_about(capsys, tmp_path, table_3k):
    from stacker.dataset import write_table
    df = table_3k.copy()
    df["label.share"] = 0        # a backend that never reports shares
    write_table(df, tmp_path / "noshare.parquet")
    assert main(["train", "--data", str(tmp_path / "noshare.parquet"), "--out", str(tmp_path / "s"), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "warning: label.share: no row of the LR's 1,503 training rows is positive, so share is not learned" in err
    assert re.search(r"click +NE \d\.\d{4} \(base rate \d\.\d{4}\)", out), out
    assert "tasks: click, like, comment, hide, dwell (share left out: one outcome only)" in out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert "share" not in manifest["tasks"] and manifest["training"]["tasks_left_out"] == ["share"]
    assert main(["eval", "--data", str(tmp_path / "noshare.parquet"), "--json", str(tmp_path / "e.json"),
                 "--plots", str(tmp_path / "p"), *TINY]) == 0
    assert "share" not in json.loads((tmp_path / "e.json").read_text())["variants"]["stack"]
    assert main(["eval-online", "--data", str(tmp_path / "noshare.parquet"), "--plot", str(tmp_path / "o.png"),
                 *TINY]) == 0
    assert "share" not in capsys.readouterr().out.split("online vs frozen")[-1]
    shares_early = table_3k.copy()      # positives only among the extractors' rows: the LR could not learn it
    shares_early["label.share"] = (shares_early.index < 50).astype(int)
    write_table(shares_early, tmp_path / "early.parquet")
    assert main(["train", "--data", str(tmp_path / "early.parquet"), "--out", str(tmp_path / "e"), *TINY]) == 0
    assert "so share is not learned (a task needs both outcomes; 50 positives among the extractors' 894)" \
        in capsys.readouterr().err
    for task in ("click", "like", "comment", "hide", "dwell"):
        df[f"label.{task}"] = 1
    write_table(df, tmp_path / "none.parquet")
    err = _fails(capsys, ["eval", "--data", str(tmp_path / "none.parquet"), *TINY])
    assert "no task has both outcomes in the LR's 1,503 training rows" in err
    df = table_3k.copy()
    df["label.poke"] = df["label.click"]                        # not an event kind the server takes
    df.loc[df.index[:1000], "f.post.length"] = np.nan            # no value in the extractors' slice
    df = pd.concat([df, df.iloc[-5:]], ignore_index=True)        # five impressions twice
    df["label_like2"] = df["label.like"]                        # a typo: not read
    df["f.user.seen"] = np.arange(len(df)) % 3                  # per candidate, though a user feature
    write_table(df, tmp_path / "odd.parquet")
    assert main(["train", "--data", str(tmp_path / "odd.parquet"), "--out", str(tmp_path / "b"), *TINY]) == 0
    err = capsys.readouterr().err
    assert "warning: label.poke: not an event kind" in err
    assert "warning: f.post.length: no value in the extractors' slice" in err
    assert "warning: 5 rows repeat another row's (request_id, post_id)" in err
    assert "warning: label_like2: not read (features are f.<name>, tasks label.<task>" in err
    varies = re.search(r"warning: f.user.seen: differs between the rows of (\d+) requests, but a Rank request", err)
    requests = df.groupby("request_id")["f.user.seen"].nunique().gt(1).sum()   # the test slice's too
    assert varies and 0.7 * requests < int(varies.group(1)) < requests, (varies, requests)
    assert "warning: label.poke: no EV weight (TrainConfig.ev_weights), so it weighs 0" in err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    few = [w for w in manifest["training"]["warnings"] if "is learned from almost nothing" in w]
    assert len(manifest["training"]["warnings"]) - len(few) == 6
    assert any(w.startswith("label.share: only ") and " positives among the LR's " in w for w in few), few
    for k in range(2):                                           # nine tasks: refused before any training
        df[f"label.extra{k}"] = df["label.click"]
    write_table(df, tmp_path / "nine.parquet")
    err = _fails(capsys, ["train", "--data", str(tmp_path / "nine.parquet"), "--out", str(tmp_path / "9"), *TINY])
    assert "error: 9 tasks (label.click, label.like, " in err and "one stack learns at most 7" in err
    assert "GBDT" not in err
    assert manifest["feature_spec"]["defaults"]["post.length"] == 0.0
    write_table(table_3k.drop(columns=["position"]), tmp_path / "nopos.parquet")   # a backend that logs none
    assert main(["train", "--data", str(tmp_path / "nopos.parquet"), "--out", str(tmp_path / "np"), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "warning: no position column: every impression is taken as shown at the top" in err
    assert [line.split()[0] for line in out.splitlines() if " NE " in line] == \
        ["click", "like", "comment", "share", "hide", "dwell"]                   # the bundle's task order
    # no context columns: trained as a Rank request without context is served ("", not a device of its own)
    from stacker.features import CandidateBatch
    from stacker.ranker import StackedRanker
    bare = table_3k.drop(columns=["ctx.device", "ctx.surface"])
    write_table(bare, tmp_path / "noctx.parquet")
    assert main(["train", "--data", str(tmp_path / "noctx.parquet"), "--out", str(tmp_path / "nc"), *TINY]) == 0
    assert "warning: no ctx.device or ctx.surface column: every impression is taken as without that context" \
        in capsys.readouterr().err
    ranker = StackedRanker.load(tmp_path / "nc")
    batch = CandidateBatch.from_table(bare.tail(50), ranker.spec)
    assert batch.device == batch.surface == ""
    served = CandidateBatch.from_table(bare.tail(50).assign(**{"ctx.device": "", "ctx.surface": ""}), ranker.spec)
    np.testing.assert_array_equal(ranker.predict(batch), ranker.predict(served))


def test_eval_refuses_a_table_too_small_for_its_test_slice_and_writes_strict_json(capsys, tmp_path, table_3k):
    from stacker.dataset import write_table
    write_table(table_3k.head(600), tmp_path / "small.parquet")    # extractors' slice: 180 rows
    assert "rows are too few to train on" in _fails(capsys, ["eval", "--data", str(tmp_path / "small.parquet"),
                                                            *TINY])
    write_table(table_3k.head(700), tmp_path / "small700.parquet")    # test slice: 136 rows
    assert "700 rows are too few to evaluate on: the test slice (the latest 20%) holds 136 rows and needs at " \
        "least 200" in _fails(capsys, ["eval", "--data", str(tmp_path / "small700.parquet"), *TINY])
    df = table_3k.copy()
    df.loc[df.index[-600:], "label.share"] = 0                   # no share in the test slice: AUC undefined
    write_table(df, tmp_path / "t.parquet")
    out = tmp_path / "e.json"
    assert main(["eval", "--data", str(tmp_path / "t.parquet"), "--json", str(out), "--plots", str(tmp_path / "p"),
                 *TINY]) == 0
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert report["variants"]["stack"]["share"]["auc"] is None
    assert (tmp_path / "p" / "calibration.png").is_file()
    assert "stack_online learns no label" not in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "t.parquet"), "--json", str(out), "--plots", str(tmp_path / "p"),
                 "--label-delay-s", str(10 ** 9), *TINY]) == 0
    assert "stack_online learns no label before scoring its rows, so it equals stack" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["variants"]["stack_online"]["click"] == report["variants"]["stack"]["click"]
    # eval-online: its metrics come from the stream's last third; undefined ones are null in its JSON
    assert "700 rows are too few to compare on: the stream (the latest 50%) holds 352 rows, and its last third" \
        in _fails(capsys, ["eval-online", "--data", str(tmp_path / "small700.parquet"), *TINY])
    assert main(["eval-online", "--data", str(tmp_path / "t.parquet"), "--json", str(out), "--plot",
                 str(tmp_path / "o.png"), *TINY]) == 0
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert report["online"]["share"]["auc"] is None and report["frozen"]["click"]["auc"] > 0.5


def test_training_leaves_a_neighbour_named_like_its_staging_directory_alone(tmp_path, table_3k):
    from stacker.train import train_bundle
    mine = tmp_path / "b.partial"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    config = _tiny_config()
    train_bundle(table_3k, tmp_path / "b", config)
    assert (mine / "important.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.partial"]
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o777 & ~_umask()    # as mkdir would make it


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_staging_directories_are_invisible_to_model_dirs_and_cleaned_when_stale(tmp_path, tiny_bundle):
    import time
    from stacker.bundle import STALE_STAGING_S, candidate_bundles, copy_bundle, staging_dir
    models = tmp_path / "models"
    copy_bundle(tiny_bundle, models / "a")
    fresh, stale = staging_dir(models / "b"), staging_dir(models / "b")
    shutil.copytree(tiny_bundle, fresh, dirs_exist_ok=True)    # a writer still at work
    others = [staging_dir(models / "b.2"), staging_dir(models / "b[1]"), models / ".b.mine.partial"]
    others[-1].mkdir()                                         # a sibling's staging, and a user's directory
    old = time.time() - STALE_STAGING_S - 60
    for d in (stale, *others):
        os.utime(d, (old, old))                                # as if left long ago
    assert [p.name for p in candidate_bundles(models)] == ["a"]
    staging_dir(models / "b")
    assert fresh.exists() and not stale.exists() and all(d.exists() for d in others)


def _tiny_config():
    from stacker.dnn import DNNConfig
    from stacker.gbdt import GBDTConfig
    from stacker.train import TrainConfig
    from stacker.vwstack import VWConfig
    return TrainConfig(gbdt=GBDTConfig(trees=5), dnn=DNNConfig(epochs=1), vw=VWConfig(bits=18))


def test_train_from_a_log_that_is_not_there_or_still_open(capsys, tmp_path, tiny_bundle, tiny_records):
    err = _fails(capsys, ["train", "--data", str(tmp_path / "runs" / "eventlog"), "--served-by", str(tiny_bundle),
                          "--out", str(tmp_path / "b"), *TINY])
    assert "eventlog: no such file or directory" in err
    from online.eventlog import EventLog
    with EventLog(tmp_path / "log", fsync=False) as log:
        log.append(tiny_records)
    window = str(10 ** 12)    # every window still open at the end of the log
    err = _fails(capsys, ["train", "--data", str(tmp_path / "log"), "--served-by", str(tiny_bundle),
                          "--window-ms", window, "--out", str(tmp_path / "b"), *TINY])
    assert "still in their attribution window" in err and "--include-open" in err
    assert main(["train", "--data", str(tmp_path / "log"), "--served-by", str(tiny_bundle), "--window-ms", window,
                 "--include-open", "--out", str(tmp_path / "b"), *TINY]) == 0


def test_train_never_writes_over_other_files_and_replaces_a_bundle_only_when_told(capsys, tmp_path, tiny_bundle):
    notes = tmp_path / "data"
    notes.mkdir()
    (notes / "impressions.parquet").write_bytes(b"precious")
    err = _fails(capsys, ["train", "--simulate", "3000", "--out", str(notes), *TINY])
    assert "is a directory of other files, not a bundle" in err
    assert (notes / "impressions.parquet").read_bytes() == b"precious"
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    old_id = (bundle / "manifest.json").read_text()
    assert "holds a bundle already" in _fails(capsys, ["train", "--simulate", "3000", "--out", str(bundle), *TINY])
    assert (bundle / "manifest.json").read_text() == old_id
    assert main(["train", "--simulate", "3000", "--out", str(bundle), "--force", *TINY]) == 0
    assert (bundle / "manifest.json").read_text() != old_id
    from stacker.train import train_bundle
    with pytest.raises(ValueError, match="exists and is not a bundle"):   # the library refuses as well
        train_bundle(None, notes)


def _serve(tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "feedrank.cli", "serve", "--port", "0", "--eventlog-dir", str(tmp_path / "ev"),
           "--learner-state-dir", str(tmp_path / "learner"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_serve_exits_when_the_bundle_it_was_given_is_refused(tmp_path, tiny_bundle):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "gbdt.ubj", "r+b") as f:
        f.truncate(1000)
    done = _serve(tmp_path, "--bundle", str(bad))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gbdt.ubj: truncated or resized" in done.stderr
    assert "not serving: the bundle given with --bundle was refused" in done.stderr


def test_serve_refuses_an_unreachable_bus_and_bad_settings(tmp_path, tiny_bundle):
    done = _serve(tmp_path, "--bundle", str(tiny_bundle), "--bus", "redis://127.0.0.1:1/0")
    assert done.returncode == 2 and "bus redis://127.0.0.1:1/0: not reachable" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (tmp_path / "s.toml").write_text("max_candidates = 0\n")
    done = _serve(tmp_path, "--bundle", str(tiny_bundle), "--config", str(tmp_path / "s.toml"))
    assert done.returncode == 2 and "setting max_candidates: Input should be greater than or equal to 1" \
        in done.stderr, done.stderr[-2000:]
    done = _serve(tmp_path, "--bundle", str(tiny_bundle), "--tls-cert", str(tmp_path / "cert.pem"))
    assert done.returncode == 2 and "tls_cert and tls_key go together" in done.stderr, done.stderr[-2000:]


def test_learn_takes_paths_relative_to_where_it_runs(tmp_path, tiny_bundle, tiny_records):
    """The learner's feeder is a child process: it must resolve --replay and --bundle as the caller does."""
    from online.eventlog import EventLog
    with EventLog(tmp_path / "log", fsync=False) as log:
        log.append(tiny_records)
    shutil.copytree(tiny_bundle, tmp_path / "bundle")

    def learn() -> dict:
        done = subprocess.run([sys.executable, "-m", "feedrank.cli", "learn", "--replay", "log", "--bundle",
                               "bundle", "--state", "state", "--window-ms", str(WINDOW_MS), "--quiet"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    summary = learn()
    assert summary["learned_examples"] > 1000 and summary["records"] == len(tiny_records)
    # Run again on the same state: nothing new to read or learn, and the summary says so (this run's
    # figures; the state's total beside them)
    second = learn()
    assert second["records"] == 0 and second["learned_examples"] == 0
    assert second["total_learned_examples"] == summary["learned_examples"]


def test_learn_refuses_what_is_not_an_event_log_or_a_state_directory(capsys, tmp_path, tiny_bundle):
    base = ["learn", "--bundle", str(tiny_bundle), "--state", str(tmp_path / "state")]
    err = _fails(capsys, [*base, "--replay", str(tmp_path / "runs" / "eventlog")])
    assert err.strip().endswith("eventlog: no such event log")
    err = _fails(capsys, [*base, "--replay", str(tiny_bundle)])
    assert "is a bundle, not an event log" in err
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    err = _fails(capsys, [*base, "--replay", str(tmp_path / "t.parquet")])
    assert "t.parquet: not an event-log segment" in err
    err = _fails(capsys, ["learn", "--bundle", str(tiny_bundle), "--state", str(tiny_bundle), "--log", "x"])
    assert "is a bundle; give the learner a directory of its own" in err
    assert not (tiny_bundle / "checkpoints").exists()


def test_learn_says_so_when_the_log_was_served_by_another_bundle(tmp_path, other_bundle, tiny_records):
    from online.eventlog import EventLog
    with EventLog(tmp_path / "log", fsync=False) as log:
        log.append(tiny_records)
    done = subprocess.run([sys.executable, "-m", "feedrank.cli", "learn", "--replay", "log", "--bundle",
                           str(other_bundle), "--state", "state", "--window-ms", str(WINDOW_MS), "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "learned nothing: all " in done.stderr and "examples were served by other bundles" in done.stderr


def test_sigterm_to_the_learner_s_process_group_stops_it_cleanly(tmp_path, tiny_bundle, tiny_records):
    """`timeout`, systemd and Ctrl-C signal the whole group: the feeder child must leave the shutdown to
    the trainer, which checkpoints and exits 0 (it used to die of FeederDied, exit 1)."""
    import signal
    import time
    from online.eventlog import EventLog
    with EventLog(tmp_path / "log", fsync=False) as log:
        log.append(tiny_records)
    proc = subprocess.Popen([sys.executable, "-m", "feedrank.cli", "learn", "--log", "log", "--bundle",
                             str(tiny_bundle), "--state", "state", "--window-ms", str(WINDOW_MS)],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status = tmp_path / "state" / "status.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(status.read_text()).get("learned_through", -1) >= len(tiny_records) - 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "FeederDied" not in err
    assert json.loads(status.read_text())["learned_through"] == len(tiny_records) - 1


def test_ctrl_c_during_a_replay_keeps_what_was_learned_and_the_same_command_goes_on(tmp_path, tiny_bundle):
    """Ctrl-C (SIGINT to the process group) mid-replay: the learner checkpoints what it learned and exits 130
    saying so, with no traceback from its helper processes; run again, it learns the rest, and in all it
    learns what one uninterrupted replay learns."""
    import signal
    import time

    from feedsim.simulate import simulate
    from online.eventlog import EventLog
    from online.workload import workload
    from stacker.ranker import StackedRanker
    ranker = StackedRanker.load(tiny_bundle)
    records = workload(simulate(60_000, seed=9), ranker.spec, ranker.bundle_id, WINDOW_MS)
    with EventLog(tmp_path / "log", fsync=False) as log:
        log.append(records)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "feedrank.cli", "learn", "--replay", "log", "--bundle", str(tiny_bundle),
            "--window-ms", str(WINDOW_MS), "--quiet", "--checkpoint-every-s", "1000"]
    whole = subprocess.run(argv + ["--state", "whole"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    total = json.loads(whole.stdout.strip().splitlines()[-1])["learned_examples"]
    proc = subprocess.Popen(argv + ["--state", "state"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = tmp_path / "state" / "status.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(status.read_text())["counters"]["learned_examples"] > 0:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; what it learned is checkpointed" in err and "Traceback" not in err
    first = json.loads(out.strip().splitlines()[-1])
    assert 0 < first["learned_examples"] < total
    again = subprocess.run(argv + ["--state", "state"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["total_learned_examples"] == first["learned_examples"] + second["learned_examples"] == total


def test_demo_reuses_its_bundle_only_when_trained_with_the_same_settings(tmp_path, capsys):
    """`feedrank demo` keeps its bundle between runs, but retrains it when the impressions, the trees
    or the training defaults differ from those it was trained with."""
    from feedrank.demo import _bundle
    first = _bundle(tmp_path, 3000, 5, quiet=True)
    manifest = (first / "manifest.json").read_text()
    assert "training a bundle" in capsys.readouterr().out
    assert _bundle(tmp_path, 3000, 5, quiet=True) == first
    assert "using the bundle" in capsys.readouterr().out
    assert (first / "manifest.json").read_text() == manifest
    _bundle(tmp_path, 3000, 6, quiet=True)                        # other trees: retrained
    assert "training a bundle" in capsys.readouterr().out
    assert json.loads((first / "manifest.json").read_text())["gbdt"]["trees"] == 6
    (tmp_path / "bundle.settings").write_text("3000 an-older-version")
    _bundle(tmp_path, 3000, 6, quiet=True)                        # trained by another version: retrained
    assert "training a bundle" in capsys.readouterr().out
