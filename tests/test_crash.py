"""kill -9 the learner at random points, restart it, and count: every example learned exactly once.

Each run is ``feedrank learn --replay LOG --audit``: before checkpoint N the learner writes
``audit/ckpt-N.tsv`` (what it learned since checkpoint N-1); a restart removes the files of checkpoints
that were never committed. So the committed audit files list exactly what the committed models learned,
and across all restarts each (impression, task) must appear once and match an uninterrupted join.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from online.eventlog import EventLog
from online.joiner import Joiner
from online.records import Engagement
from online.replay import read_records
from tests.conftest_online import WINDOW_MS, event_log, tiny_records  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def expected(log_dir, tasks) -> Counter:
    j = Joiner(tasks, WINDOW_MS)
    out = []
    for off, r in read_records(log_dir):
        out += j.add_event(r, off) if type(r) is Engagement else j.add_served(r, off)
    out += j.flush()
    return Counter((x.served.request_id, x.served.post_id, t) for x in out for t in x.tasks)


def learned(state: Path) -> Counter:
    c = Counter()
    for p in sorted((state / "audit").glob("ckpt-*.tsv")):
        for line in p.read_text().splitlines():
            _, req, post, tasks, _ = line.split("\t")
            c.update((req, post, t) for t in tasks.split(",") if t)
    return c


def learn_cmd(bundle, log_dir, state) -> list[str]:
    return [sys.executable, "-m", "feedrank.cli", "learn", "--replay", str(log_dir), "--bundle", str(bundle),
            "--state", str(state), "--window-ms", str(WINDOW_MS), "--checkpoint-every-examples", "400",
            "--audit", "--quiet"]


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def latest(state: Path) -> str | None:
    try:
        return (state / "checkpoints" / "LATEST").read_text()
    except OSError:
        return None


def crash_and_recover(bundle, log_dir, state, kills: int, seed: int, victim: str = "trainer",
                      extra: tuple[str, ...] = ()) -> None:
    """``victim``: ``trainer`` (the ``feedrank learn`` process; its feeder child dies with it), ``feeder``
    (the child that reads, joins and featurizes) or ``both`` (alternating)."""
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = 0
    for i in range(kills):
        proc = subprocess.Popen(learn_cmd(bundle, log_dir, state) + list(extra), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        who = victim if victim != "both" else ("trainer", "feeder")[i % 2]
        if who == "trainer" and rng.random() < 0.25:
            time.sleep(rng.uniform(0.3, 1.5))  # during start-up
        else:  # mid-run: once this run has committed a checkpoint (every 400 examples), a little later
            seen, t0 = latest(state), time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < 60:
                if latest(state) != seen and (who != "feeder" or children(proc.pid)):
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            pids = children(proc.pid) if who == "feeder" else [proc.pid]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if victim != "trainer":
            time.sleep(0.2)
        assert not children(proc.pid)
    done = subprocess.run(learn_cmd(bundle, log_dir, state), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert killed >= 1


def check_exactly_once(bundle, log_dir, state) -> None:
    import json
    from stacker.bundle import read_manifest
    tasks = tuple(read_manifest(bundle)["tasks"])
    want, got = expected(log_dir, tasks), learned(state)
    assert max(got.values()) == 1, [k for k, v in got.items() if v > 1][:5]  # none learned twice
    assert got == want  # none lost
    latest = (state / "checkpoints" / "LATEST").read_text().strip()
    ck = json.loads((state / "checkpoints" / latest / "checkpoint.json").read_text())["state"]
    assert sum(ck["task_learned"].values()) == sum(want.values())
    assert ck["counters"]["learned_examples"] == ck["joiner"]["stats"]["examples"]


def test_sigkill_at_random_points_learns_every_example_once(tmp_path, tiny_bundle, event_log):
    crash_and_recover(tiny_bundle, event_log, tmp_path / "state", kills=3, seed=1)
    check_exactly_once(tiny_bundle, event_log, tmp_path / "state")


def test_sigkill_of_the_feeder_process_learns_every_example_once(tmp_path, tiny_bundle, event_log):
    crash_and_recover(tiny_bundle, event_log, tmp_path / "state", kills=3, seed=3, victim="feeder")
    check_exactly_once(tiny_bundle, event_log, tmp_path / "state")


def test_sigkill_single_process_learner_learns_every_example_once(tmp_path, tiny_bundle, event_log):
    crash_and_recover(tiny_bundle, event_log, tmp_path / "state", kills=2, seed=4, extra=("--single-process",))
    check_exactly_once(tiny_bundle, event_log, tmp_path / "state")


@pytest.mark.slow
def test_sigkill_many_times_on_a_longer_log(tmp_path, tiny_bundle, tiny_records):
    from feedsim.simulate import simulate
    from online.workload import workload
    from stacker.ranker import StackedRanker
    r = StackedRanker.load(tiny_bundle)
    log_dir = tmp_path / "log"
    with EventLog(log_dir, fsync=False, segment_bytes=1 << 20) as log:
        log.append(workload(simulate(20_000, seed=9), r.spec, r.bundle_id, WINDOW_MS))
    crash_and_recover(tiny_bundle, log_dir, tmp_path / "state", kills=12, seed=2, victim="both")
    check_exactly_once(tiny_bundle, log_dir, tmp_path / "state")
