"""Shared fixtures. Serving: one tiny bundle per session and real in-process gRPC servers on port 0."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A tiny but complete bundle (20 trees, 2 DNN epochs, -b 18), trained once per session."""
    from feedsim.simulate import simulate
    from stacker.dnn import DNNConfig
    from stacker.gbdt import GBDTConfig
    from stacker.progress import Progress
    from stacker.train import TrainConfig, train_bundle
    from stacker.vwstack import VWConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    config = TrainConfig(gbdt=GBDTConfig(trees=20), dnn=DNNConfig(epochs=2), vw=VWConfig(bits=18))
    return train_bundle(simulate(20_000), out, config, progress=Progress(enabled=False))


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory, tiny_bundle):
    """A second tiny bundle (another world sample, another bundle id), for bundle switches; trained
    after ``tiny_bundle``, so it is the newer of the two."""
    from feedsim.simulate import simulate
    from stacker.dnn import DNNConfig
    from stacker.gbdt import GBDTConfig
    from stacker.progress import Progress
    from stacker.train import TrainConfig, train_bundle
    from stacker.vwstack import VWConfig

    out = tmp_path_factory.mktemp("bundles") / "other"
    config = TrainConfig(gbdt=GBDTConfig(trees=10), dnn=DNNConfig(epochs=1), vw=VWConfig(bits=18))
    return train_bundle(simulate(20_000, seed=3), out, config, progress=Progress(enabled=False))


@pytest.fixture
def serving_server(tmp_path):
    """Factory: ``serving_server(**settings)`` starts a real server on port 0; stopped at teardown."""
    from serving.server import build
    from serving.settings import load_settings

    started = []

    def start(**overrides):
        overrides.setdefault("eventlog_dir", tmp_path / "eventlog")
        overrides.setdefault("snapshot_dir", tmp_path / "snapshots")
        overrides.setdefault("eventlog_fsync", False)
        overrides.setdefault("threads", 4)
        settings = load_settings(port=0, host="127.0.0.1", grace_s=0.5, **overrides)
        rs = build(settings)
        started.append(rs)
        return rs

    yield start
    for rs in started:
        rs.stop(0)
