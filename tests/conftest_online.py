"""Shared fixtures of the online-learner tests (import with ``from tests.conftest_online import *``);
``tiny_bundle`` comes from ``tests/conftest.py``."""
from __future__ import annotations

import pytest

from online.bench import redis_server
from online.eventlog import EventLog

WINDOW_MS = 5_000


@pytest.fixture(scope="session")
def tiny_records(tiny_bundle):
    """Served records + events of 3,000 fresh simulated impressions, in log order."""
    from feedsim.simulate import simulate
    from online.workload import workload
    from stacker.ranker import StackedRanker
    r = StackedRanker.load(tiny_bundle)
    return workload(simulate(3_000, seed=5), r.spec, r.bundle_id, WINDOW_MS)


@pytest.fixture
def event_log(tmp_path, tiny_records):
    path = tmp_path / "log"
    with EventLog(path, fsync=False) as log:
        log.append(tiny_records)
    return path


@pytest.fixture
def redis_url(tmp_path):
    with redis_server(tmp_path) as url:
        yield url
