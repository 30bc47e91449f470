"""MovieLens-100K loader (schema format, time-safe history features) and the river FM baseline."""
from __future__ import annotations

import importlib.metadata
import shutil

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("river")
try:
    importlib.metadata.distribution("recbole")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("recbole not installed (pip install --no-deps recbole==1.2.1)", allow_module_level=True)

from stacker import movielens, schema  # noqa: E402
from stacker.movielens import load_movielens_100k, movielens_path, river_fm_predict  # noqa: E402

LIKE = schema.label_column("like")


@pytest.fixture(scope="module")
def ml() -> pd.DataFrame:
    return load_movielens_100k()


def test_path_and_missing_recbole(monkeypatch):
    assert (movielens_path() / "ml-100k.inter").is_file()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(movielens.importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps recbole==1\.2\.1"):
        movielens_path()


def test_counts_and_label(ml):
    assert len(ml) == 100_000
    assert ml["user_id"].nunique() == 943
    assert ml["post_id"].nunique() == 1682
    assert ml["user_id"].str.fullmatch(r"u\d+").all() and ml["post_id"].str.fullmatch(r"m\d+").all()
    assert not ml.duplicated(["user_id", "post_id"]).any()
    assert 0.50 < ml[LIKE].mean() < 0.60  # 55,375 ratings of 4 or 5
    assert int(ml[LIKE].sum()) == 55_375


def test_schema_columns_and_dtypes(ml):
    cols = list(ml.columns)
    n_keys = len(schema.KEY_COLUMNS) + len(schema.CONTEXT_COLUMNS)
    assert cols[:n_keys] == list(schema.KEY_COLUMNS) + list(schema.CONTEXT_COLUMNS)
    assert all(c.startswith((schema.FEATURE_PREFIX, schema.LABEL_PREFIX)) for c in cols[n_keys:])
    assert schema.tasks_in(cols) == ["like"]
    assert not any(c.startswith(schema.TRUE_PREFIX) for c in cols)
    assert ml["ts"].dtype == np.int64 and ml["created_at"].dtype == np.int64
    assert ml["position"].dtype == np.int32
    assert ml[LIKE].dtype == np.int8 and set(ml[LIKE].unique()) == {0, 1}
    for c in ("request_id", "user_id", "post_id", "author_id", "media_type", "ctx.device", "ctx.surface"):
        assert pd.api.types.is_string_dtype(ml[c]), c
    feats = schema.feature_columns(cols)
    assert all(ml[c].dtype == np.float32 for c in feats)
    assert not ml[feats].isna().any().any()
    user = [c for c in feats if c.startswith("f.user.")]
    item = [c for c in feats if c.startswith("f.item.")]
    assert len(user) + len(item) == len(feats)
    assert {"f.user.age", "f.user.gender_f", "f.user.prior_count", "f.user.prior_like_rate"} <= set(user)
    assert len([c for c in item if c.startswith("f.item.genre.")]) == 19
    assert {"f.item.release_year", "f.item.prior_count", "f.item.prior_like_rate"} <= set(item)
    assert set(ml["f.user.gender_f"].unique()) == {0.0, 1.0}
    assert set(ml["media_type"]) == {"text"} and set(ml["ctx.device"]) == {"web"}
    assert set(ml["ctx.surface"]) == {"home"}


def test_time_order_requests_and_items(ml):
    ts = ml["ts"].to_numpy()
    assert (np.diff(ts) >= 0).all()
    assert (ts % 1000 == 0).all() and ts.min() > 8.7e11  # seconds -> ms, 1997-98
    # one request = one user within one second; positions 0..n-1 within it
    user_num = ml["user_id"].str[1:]
    assert (ml["request_id"] == "ml-" + user_num + "-" + ml["ts"].astype(str)).all()
    g = ml.groupby("request_id", sort=False)
    assert (g["user_id"].nunique() == 1).all() and (g["ts"].nunique() == 1).all()
    assert (ml["position"].to_numpy() == g.cumcount().to_numpy()).all()
    # author = primary genre; created_at (release) never after the rating
    assert ml["author_id"].str.startswith("g:").all() and ml["author_id"].nunique() <= 19
    assert (ml["created_at"] <= ml["ts"]).all()
    toy = ml[ml["post_id"] == "m1"].iloc[0]  # Toy Story (1995): Animation Children's Comedy
    assert toy["author_id"] == "g:animation" and toy["f.item.release_year"] == 1995
    assert toy["created_at"] == pd.Timestamp("1995-01-01", tz="UTC").value // 1_000_000
    assert toy["f.item.genre.childrens"] == 1 and toy["f.item.genre.drama"] == 0


def _by_hand(rows: pd.DataFrame) -> tuple[list, list]:
    """Prior count and like rate per row from rows with a strictly smaller ts, the slow way."""
    counts, rates = [], []
    ts, like = rows["ts"].tolist(), rows[LIKE].tolist()
    for i in range(len(rows)):
        prior = [like[j] for j in range(len(rows)) if ts[j] < ts[i]]
        counts.append(len(prior))
        rates.append(sum(prior) / len(prior) if prior else movielens.DEFAULT_LIKE_RATE)
    return counts, rates


def test_history_features_are_time_safe(ml):
    first = ml.groupby("user_id", sort=False).head(1)
    assert len(first) == 943
    assert (first["f.user.prior_count"] == 0).all()
    assert (first["f.user.prior_like_rate"] == movielens.DEFAULT_LIKE_RATE).all()
    first_item = ml.groupby("post_id", sort=False).head(1)
    assert (first_item["f.item.prior_count"] == 0).all()

    # a user with many multi-rating requests (ties in ts must not see each other's labels)
    sizes = ml.groupby("request_id").size()
    busy = ml[ml["request_id"].isin(sizes[sizes >= 3].index)]["user_id"].value_counts().index[0]
    rows = ml[ml["user_id"] == busy]
    counts, rates = _by_hand(rows)
    assert rows["f.user.prior_count"].tolist() == counts
    np.testing.assert_allclose(rows["f.user.prior_like_rate"].to_numpy(), rates, rtol=1e-6)

    rows = ml[ml["post_id"] == "m50"]  # Star Wars: 583 ratings
    counts, rates = _by_hand(rows)
    assert rows["f.item.prior_count"].tolist() == counts
    np.testing.assert_allclose(rows["f.item.prior_like_rate"].to_numpy(), rates, rtol=1e-6)


def test_history_features_ignore_own_and_later_labels(tmp_path):
    """Loading with every label flipped after a cut-off leaves the features before it unchanged."""
    path = movielens_path()
    base = load_movielens_100k(path)
    cut = int(base["ts"].iloc[60_000])
    inter = pd.read_csv(path / "ml-100k.inter", sep="\t")
    late = inter["timestamp:float"] * 1000 >= cut
    inter.loc[late, "rating:float"] = 6 - inter.loc[late, "rating:float"]
    for name in ("ml-100k.user", "ml-100k.item"):
        shutil.copy(path / name, tmp_path / name)
    inter.to_csv(tmp_path / "ml-100k.inter", sep="\t", index=False)
    flipped = load_movielens_100k(tmp_path)
    assert (flipped.loc[base["ts"] >= cut, LIKE] != base.loc[base["ts"] >= cut, LIKE]).mean() > 0.5
    feats = schema.feature_columns(base.columns)
    keep = base["ts"] <= cut  # rows AT the cut may see only strictly earlier rows: still unchanged
    pd.testing.assert_frame_equal(base.loc[keep, feats], flipped.loc[keep, feats])


def test_feature_spec_from_table(ml):
    from stacker.features import FeatureSpec

    spec = FeatureSpec.from_table(ml.head(1000))
    assert all(n.startswith("user.") for n in spec.user_features)
    assert all(n.startswith("item.") for n in spec.post_features)
    assert len(spec.user_features) + len(spec.post_features) == len(schema.feature_columns(ml.columns))


def test_river_fm_beats_base_rate(ml):
    from sklearn.metrics import log_loss, roc_auc_score

    sub = ml.iloc[:20_000]
    train, test = sub.iloc[:16_000], sub.iloc[16_000:]
    calls = []
    p = river_fm_predict(train, test, seed=0, progress=lambda i, n: calls.append((i, n)))
    assert p.shape == (len(test),) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    assert calls and calls[-1] == (20_000, 20_000)
    y = test[LIKE].to_numpy()
    base = log_loss(y, np.full(len(y), train[LIKE].mean()))
    assert log_loss(y, p) < base - 0.01
    assert roc_auc_score(y, p) > 0.65


def test_river_fm_predict_only_and_deterministic(ml):
    """Scores depend on neither the order of test rows nor the rows scored before (no learning on test,
    no random state consumed by unseen ids); a seed gives the same model."""
    train, test = ml.iloc[:4_000], ml.iloc[4_000:5_000]
    assert not set(test["user_id"]) <= set(train["user_id"])  # some cold users
    p = river_fm_predict(train, test, seed=0)
    perm = np.random.default_rng(0).permutation(len(test))
    p2 = river_fm_predict(train, test.iloc[perm], seed=0)
    np.testing.assert_allclose(p2, p[perm], rtol=1e-12)
