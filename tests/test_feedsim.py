"""Tests for the simulator (feedsim/)."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from feedsim.closed_loop import FeedRequest, FeedUsers
from feedsim.describe import describe, format_description
from stacker.dataset import read_table, write_table
from stacker.metrics import normalized_entropy
from feedsim.simulate import get_world, simulate
from feedsim.world import DEFAULT_WORLD, USER_FEATURES, World, WorldConfig
from stacker.schema import (CONTEXT_COLUMNS, KEY_COLUMNS, MEDIA_TYPES, SCHEMA_VERSION, TASKS,
                            feature_columns, label_column, true_column)


@pytest.fixture(scope="module")
def small():
    return simulate(20_000, seed=11)


@pytest.fixture(scope="module")
def described():
    return describe(DEFAULT_WORLD, n_impressions=200_000)


def test_deterministic_for_a_seed(small):
    again = simulate(20_000, seed=11)
    pd.testing.assert_frame_equal(small, again)
    other = simulate(20_000, seed=12)
    assert not other["post_id"].equals(small["post_id"])


def test_world_deterministic():
    cfg = WorldConfig(n_users=300, n_authors=60)
    a, b = World(cfg), World(cfg)
    assert np.array_equal(a.follow_authors, b.follow_authors)
    assert np.array_equal(a.posts["created_at"], b.posts["created_at"])


def test_schema_columns_and_dtypes(small):
    df = small
    assert len(df) == 20_000
    cols = list(df.columns)
    assert cols[:len(KEY_COLUMNS) + len(CONTEXT_COLUMNS)] == [*KEY_COLUMNS, *CONTEXT_COLUMNS]
    for t in TASKS:
        assert df[label_column(t)].dtype == np.int8
        assert df[true_column(t)].dtype == np.float32
        assert df[true_column(t)].between(0, 1).all()
    feats = feature_columns(cols)
    assert 30 <= len(feats) <= 40
    assert all(df[f].dtype == np.float32 for f in feats)
    assert all(np.isfinite(df[f]).all() for f in feats)
    assert {"f." + n for n in USER_FEATURES} <= set(feats)
    assert df["ts"].dtype == np.int64 and df["created_at"].dtype == np.int64
    assert df["position"].dtype == np.int32
    assert df["ts"].is_monotonic_increasing
    assert (df["created_at"] <= df["ts"]).all()
    assert set(df["media_type"]) <= set(MEDIA_TYPES)
    assert set(df["ctx.device"]) <= {"ios", "android", "web"}
    assert set(df["ctx.surface"]) <= {"home", "explore"}
    assert df["user_id"].str.match(r"^u\d+$").all() and df["post_id"].str.match(r"^p\d+$").all()
    assert df["author_id"].str.match(r"^a\d+$").all()
    # positions are the ranks within each request
    g = df.groupby("request_id", sort=False)["position"]
    assert (g.min() == 0).all()
    assert ((g.max() + 1) == g.size()).iloc[:-1].all()     # the last request may be cut
    assert g.size().median() >= 10
    assert df["ts"].iloc[0] >= DEFAULT_WORLD.start_ms


def test_describe_bounds(described):
    d = described
    assert 0.03 <= d["base_rate"]["click"] <= 0.08
    assert 0.015 <= d["base_rate"]["like"] <= 0.04
    for t in ("comment", "share", "hide"):
        assert d["base_rate"][t] < 0.01
    assert 0.05 <= d["base_rate"]["dwell"] <= 0.11
    assert d["oracle_ne"]["click"] <= 0.85
    assert all(ne < 1.0 for ne in d["oracle_ne"].values())
    assert d["ties_share"] >= 0.15
    assert d["nonlinear_share"] >= 0.10
    assert d["drift_share"] > 0.0
    # Oracles blind to ties / post quality sit between the full oracle and the base rate, and the
    # blinder one is worse.
    w = d["oracle_click_ne_without"]
    assert d["oracle_ne"]["click"] < w["post"] < w["tie+post"] < 1.0
    assert d["oracle_ne"]["click"] < w["tie"] < w["tie+post"]
    assert 0 < d["oracle_ne_target_share"]["tie+post"] < d["oracle_ne_target_share"]["tie"] < 1
    # Ties, post quality or both inferred from history: better than blind to them, worse than knowing
    # them; learning both is worse than learning either.
    assert d["oracle_ne"]["click"] < w["tie learned from history"] < w["tie"]
    assert d["oracle_ne"]["click"] < w["post learned from history"] < w["post"]
    assert max(w["tie learned from history"], w["post learned from history"]) \
        < w["tie+post learned from history"] < w["tie+post"]
    # The same figures over the latest fifth (eval's test slice), scored against the earlier base rate.
    latest = d["latest_slice"]
    assert abs(latest["rows"] - 40_000) < 50        # the latest fifth, cut between requests
    assert set(latest["oracle_click_ne_without"]) == set(w)
    lw = latest["oracle_click_ne_without"]
    assert latest["oracle_click_ne"] < lw["tie+post learned from history"] < lw["tie+post"] < 1.0
    for k, v in lw.items():
        assert latest["oracle_ne_target_share"][k] == pytest.approx((1 - v) / (1 - latest["oracle_click_ne"]))
    pairs = d["user_author_pairs"]
    assert pairs["pairs"] > 0 and pairs["median_impressions"] >= 1
    assert pairs["impression_weighted_mean"] > pairs["mean_impressions"]
    text = format_description(d)
    assert "click" in text and "tie" in text and "without tie+post" in text
    assert "with tie learned from history" in text and "user x author pairs" in text
    assert "with tie+post learned from history" in text and f"latest {latest['rows']:,}" in text


def test_describe_latest_slice_is_evals_test_slice(described):
    """The latest-slice oracle figures are over eval's test slice, against the earlier rows' base rate."""
    from stacker.metrics import normalized_entropy as eval_ne
    from stacker.train import time_slices
    df = simulate(200_000)
    rows = time_slices(df["ts"].to_numpy(), (0.2, 0.6, 0.2))
    earlier = np.concatenate(rows[:2])
    y = df["label.click"].to_numpy()
    base = y[earlier].mean()
    assert described["latest_slice"]["oracle_click_ne"] == pytest.approx(
        eval_ne(y[rows[2]], df["true.click"].to_numpy()[rows[2]], base), rel=1e-6)
    assert described["latest_slice"]["rows"] == len(rows[2])


def test_history_sums_only_the_groups_earlier_requests():
    """Each row's history is the sum over its group's rows in earlier requests: never its own request's
    rows (a served model has no labels from the request it scores), nor another group's."""
    from feedsim.describe import _history
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 5, 300)
    requests = np.repeat(np.arange(len(sizes)), sizes)          # rows in time order, request by request
    groups = rng.integers(0, 12, len(requests))                  # a group may recur within a request
    loglik = rng.normal(size=(len(requests), 3))
    got = _history(loglik, groups, requests)
    want = np.stack([loglik[(groups == groups[i]) & (requests < requests[i])].sum(axis=0)
                     for i in range(len(requests))])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert any((groups == g).sum() > 1 for g in range(12))


def test_a_posts_topic_seen_via_features_is_nearer_the_truth_than_its_authors_mix():
    from feedsim.describe import TopicAsSeen
    df, comps = simulate(20_000, return_components=True)
    topics = TopicAsSeen(get_world(DEFAULT_WORLD), df, samples=64)
    assert topics.weights.shape == (len(df), 64) and np.allclose(topics.weights.sum(axis=1), 1)
    for name in ("interest", "nonlinear"):
        drawn = np.stack([c[name] for c in topics.comps], axis=1)
        posterior = np.mean(((drawn * topics.weights).sum(axis=1) - comps[name]) ** 2)
        prior = np.mean((drawn.mean(axis=1) - comps[name]) ** 2)        # the author's mix alone
        assert posterior < 0.85 * prior < 0.25 * comps[name].var(), (name, posterior, prior)


def test_describe_scores_the_oracles_that_see_topics_via_features():
    d = describe(DEFAULT_WORLD, n_impressions=20_000, topic_samples=8)
    ne = d["oracle_click_ne_without"]
    oracle = normalized_entropy(*_click_and_truth(20_000))
    seen = "post topic seen via features"
    assert oracle < ne[seen] < ne[f"tie, {seen}"]
    assert ne["tie"] < ne[f"tie, {seen}"]
    assert f"tie+post learned from history, {seen}" in ne
    text = format_description(d)
    assert f"with tie+post learned from history, {seen}" in text and "median effective draws per post" in text


def _click_and_truth(n):
    df = simulate(n)
    click = df[label_column("click")].to_numpy()
    return click, df[true_column("click")].to_numpy(), float(click.mean())


def test_hide_anticorrelated_with_interest(small):
    c = np.corrcoef(small["true.click"], small["true.hide"])[0, 1]
    assert c < 0


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip(small, tmp_path, suffix):
    df = small.head(2000).reset_index(drop=True)
    path = tmp_path / ("t" + suffix)
    write_table(df, path)
    back = read_table(path)
    assert list(back.columns) == list(df.columns)
    assert (back.dtypes == df.dtypes).all()
    for col in df.columns:
        if df[col].dtype == np.float32:
            np.testing.assert_allclose(back[col], df[col], rtol=1e-6, atol=1e-12)
        else:
            assert back[col].equals(df[col]), col


def test_wrong_schema_version_refused(small, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    df = small.head(100)
    bad = SCHEMA_VERSION + 41
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"feedrank.schema_version": str(bad).encode()}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=str(bad)):
        read_table(tmp_path / "bad.parquet")
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="schema version"):
        read_table(tmp_path / "none.parquet")
    path = tmp_path / "bad.jsonl"
    write_table(df, path)
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row["schema_version"] = bad
    lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=str(bad)):
        read_table(path)
    # a JSON Lines table read back as plain JSON keeps its schema_version column: written again, it is
    # taken out (or refused when it holds another version), never written as a data column
    write_table(df, path)
    plain = pd.read_json(path, lines=True)
    for suffix in (".jsonl", ".parquet"):
        write_table(plain, tmp_path / f"again{suffix}")
        again = read_table(tmp_path / f"again{suffix}")
        assert "schema_version" not in again.columns and list(again.columns) == list(read_table(path).columns)
    plain["schema_version"] = bad
    with pytest.raises(ValueError, match=rf"again.jsonl: the table's schema_version column holds {bad}, but "
                                         rf"this feedrank writes version {SCHEMA_VERSION}"):
        write_table(plain, tmp_path / "again.jsonl")


def test_unreadable_tables_are_refused_with_the_file_and_the_fault(small, tmp_path):
    df = small.head(50)
    with pytest.raises(FileNotFoundError, match="nope.parquet: no such file"):
        read_table(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="unknown table format '.csv'"):
        read_table(tmp_path / "t.csv")
    no_labels = df[[c for c in df.columns if not c.startswith("label.")]]
    for bad, name, fault in ((df.drop(columns=["user_id", "ts"]), "cols", "missing columns ts, user_id"),
                             (no_labels, "nolabel", "no label.<task> column")):
        with pytest.raises(ValueError, match=f"{name}.parquet: {fault}"):     # refused when written
            write_table(bad, tmp_path / f"{name}.parquet")
        assert not list(tmp_path.glob(f"*{name}*"))                          # and nothing left behind
        bad.assign(schema_version=SCHEMA_VERSION).to_json(tmp_path / f"{name}.jsonl", orient="records", lines=True)
        with pytest.raises(ValueError, match=f"{name}.jsonl: {fault}"):       # or when read, made elsewhere
            read_table(tmp_path / f"{name}.jsonl")
    path = tmp_path / "torn.jsonl"
    write_table(df, path)
    lines = path.read_text().splitlines()
    lines[7] = lines[7][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"torn.jsonl: not valid JSON Lines .*; line 8: "):
        read_table(path)
    write_table(df, path)                                              # a bad value, after a blank line
    lines = path.read_text().splitlines()
    lines[10] = re.sub(r'"label\.click":\d', '"label.click":2', lines[10])
    lines.insert(3, "")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"label.click: not 0 or 1 .* \(row 10: 2\) \(line 12 of the file\)"):
        read_table(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet file"):
        read_table(tmp_path / "junk.parquet")
    df.to_parquet(tmp_path / "mine.parquet")
    with pytest.raises(ValueError, match=r"version None, .*write it with stacker.dataset.write_table"):
        read_table(tmp_path / "mine.parquet")


def test_closed_loop_shapes():
    world = get_world(DEFAULT_WORLD)
    users = FeedUsers(world, seed=3)
    now = DEFAULT_WORLD.start_ms + 2 * 86_400_000
    oracle = random = 0.0
    for i in range(30):
        req = users.next_request(now + i * 60_000)
        assert isinstance(req, FeedRequest)
        assert 150 <= len(req) <= 500
        assert req.features.shape == (len(req), len(req.feature_names))
        assert req.features.dtype == np.float32
        assert set(req.user_features) == set(USER_FEATURES)
        assert len(set(req.post_ids)) == len(req)
        assert (req.created_at <= req.ts).all()
        p = users.true_probabilities(req)[:, 0]
        out = users.engage(req, req.post_ids[np.argsort(-p)])
        assert out["n_shown"] == req.n_show
        assert set(out["labels"]) == set(TASKS)
        for t in TASKS:
            assert out["labels"][t].shape == (req.n_show,)
            assert out["realised"][t] == int(out["labels"][t].sum())
        assert len(out["shown"]) == req.n_show
        oracle += out["expected"]["click"]
        random += users.engage(req, np.random.default_rng(i).permutation(req.post_ids))["expected"]["click"]
    assert oracle > 1.5 * random
    with pytest.raises(ValueError):
        users.engage(req, ["p-not-there"])


def test_recovery_finds_what_a_model_misses():
    """A model blind to the ties recovers none of them and all of everything else; a model that
    sees half of the post-quality effect recovers half of it; the gap's variance is the ties'; noise
    added to a model's logit is counted as its noise."""
    from feedsim.attribution import recovery
    df, comps = simulate(60_000, return_components=True)
    world = get_world()
    media = df["media_type"].map({m: i for i, m in enumerate(MEDIA_TYPES)}).to_numpy()
    position = df["position"].to_numpy()
    click = TASKS.index("click")
    truth = world.probabilities(comps, media, position)[:, click]
    assert np.allclose(truth, df[true_column("click")].to_numpy())

    blind = world.probabilities({**comps, "tie": np.zeros(len(df))}, media, position)[:, click]
    r = recovery(truth, blind, comps)
    assert abs(r["recovered"]["tie"]) < 0.05
    for part in ("user", "author", "post", "interest", "recency", "context", "position"):
        assert r["recovered"][part] == pytest.approx(1.0, abs=0.05), part
    tie_var = comps["tie"].var() * 0.9 ** 2     # the link's curvature flattens the logit's slopes a little
    assert r["missed_variance"]["tie"] == pytest.approx(tie_var, rel=0.15)
    assert r["missed_variance"]["tie"] > 0.8 * r["gap_variance"]
    assert r["noise"] < 0.01                    # its logit is a function of the components alone

    # Noise of its own, independent of the world, shows up as noise and nowhere else.
    logit = np.log(blind) - np.log1p(-blind) + np.random.default_rng(0).normal(0.0, 0.5, len(df))
    noisy = recovery(truth, 1.0 / (1.0 + np.exp(-logit)), comps)
    assert noisy["noise"] == pytest.approx(0.25, abs=0.02)
    assert noisy["missed_variance"]["tie"] == pytest.approx(r["missed_variance"]["tie"], rel=0.02)
    assert noisy["recovered"]["user"] == pytest.approx(1.0, abs=0.05)

    half = world.probabilities({**comps, "post": 0.5 * comps["post"]}, media, position)[:, click]
    assert recovery(truth, half, comps)["recovered"]["post"] == pytest.approx(0.5, abs=0.05)

    with pytest.raises(ValueError, match="components missing: tie"):
        recovery(truth, blind, {k: v for k, v in comps.items() if k != "tie"})


def _set(col, values):
    def change(df):
        df[col] = values(df) if callable(values) else values
        return df
    return change


def _every(k, col, value):
    def change(df):
        df[col] = pd.Series([value if i % k == 0 else v for i, v in enumerate(df[col])], dtype=object)
        return df
    return change


@pytest.mark.parametrize("change,says", [
    (_set("label.click", lambda d: d["label.click"] * 2 - 1), r"label.click: not 0 or 1 .* in 1,9\d\d of 2,000 rows "
                                                              r"\(row 0: -1\)"),
    (_set("label.like", lambda d: d["label.like"] * 0.7), r"label.like: not a whole number"),
    (_every(7, "label.click", None), r"label.click: missing in 286 of 2,000 rows \(row 0"),
    (_every(7, "label.click", "no"), r"label.click: not a number in 286 of 2,000 rows \(row 0: 'no'\)"),
    (_every(5, "user_id", None), r"user_id: missing in 400 of 2,000 rows \(row 0"),
    (_every(5, "post_id", ["p1"]), r"post_id: not a string or a whole number below 2\*\*53 in 400 of 2,000 rows"),
    (_set("ts", lambda d: d["ts"] // 1000), r"ts: outside 1990-2100 as milliseconds .*look like seconds"),
    (_set("created_at", lambda d: d["created_at"] * 1000), r"created_at: outside .*look like microseconds"),
    (_every(3, "ts", "2026-01-05 10:00"), r"ts: not a number in 667 of 2,000 rows \(row 0: '2026-01-05 10:00'\)"),
    (_every(50, "f.author.log_followers", np.inf), r"f.author.log_followers: infinite .* in 40 of 2,000 rows"),
    (_every(50, "f.author.log_followers", 1e300), r"f.author.log_followers: infinite or past float32's range"),
    (_every(4, "f.author.log_followers", "n/a"), r"f.author.log_followers: not a number in 500 of 2,000 rows"),
    (_set("ts", lambda d: pd.to_datetime(d["ts"] // 1000, unit="ms")),     # seconds read as ms: 1970
     r"ts: outside 1990-2100 as milliseconds .*look like seconds"),
    (_every(3, "user_id", 0.5), r"user_id: not a string or a whole number below 2\*\*53 in 667 of 2,000 rows "
                                r"\(row 0: 0.5\)"),
    (_every(3, "user_id", 2.0 ** 60), r"user_id: not a string or a whole number below 2\*\*53"),
    (_every(4, "request_id", ""), r"request_id: empty \(an id is a non-empty string\) in 500 of 2,000 rows "
                                  r"\(row 0: ''\)"),
    (_every(4, "media_type", "reel"), r"media_type: not one of text, photo, video, link in 500 of 2,000 rows "
                                      r"\(row 0: 'reel'\)"),
    (_set("position", -1), r"position: negative or past 2\*\*31 - 1"),
    (_set("position", 3_000_000_000), r"position: negative or past 2\*\*31 - 1"),
])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_bad_values_are_refused_naming_the_column_the_rows_and_the_first(small, tmp_path, change, says, suffix):
    df = change(small.head(2000).reset_index(drop=True).copy())
    with pytest.raises(ValueError, match=rf"t{suffix}: {says}"):
        write_table(df, tmp_path / f"t{suffix}")
    if suffix == ".parquet" and all(df[c].dtype != object for c in df):
        # a table written by other means is refused the same way when read
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pandas(df, preserve_index=False)
        pq.write_table(table.replace_schema_metadata({b"feedrank.schema_version": str(SCHEMA_VERSION).encode()}),
                       tmp_path / "other.parquet")
        with pytest.raises(ValueError, match=rf"other.parquet: {says}"):
            read_table(tmp_path / "other.parquet")


def test_readable_variants_are_read_as_the_schema_says(small, tmp_path):
    df = small.head(2000).reset_index(drop=True).copy()
    want = df.copy()
    df["ts"] = pd.to_datetime(df["ts"], unit="ms", utc=True).dt.tz_convert("Europe/Paris")  # any zone, any unit
    df["created_at"] = pd.to_datetime(df["created_at"], unit="ms").astype("datetime64[ns]")
    for task in TASKS:
        df[f"label.{task}"] = df[f"label.{task}"].astype(bool)
    df["user_id"] = df["user_id"].str[1:].astype(float)        # integer ids through a float column
    want["user_id"] = want["user_id"].str[1:]
    df["media_type"] = df["media_type"].str.capitalize()
    df["ctx.device"] = df["ctx.device"].astype(object)
    df.loc[df.index[::10], "ctx.device"] = None                  # absent context, as on the wire
    want.loc[want.index[::10], "ctx.device"] = ""
    write_table(df, tmp_path / "t.parquet")
    back = read_table(tmp_path / "t.parquet")
    for col in ("ts", "created_at", "user_id", "media_type", "ctx.device", *[f"label.{t}" for t in TASKS]):
        assert back[col].tolist() == want[col].tolist(), col
    write_table(want, tmp_path / "t.jsonl")
    text = (tmp_path / "t.jsonl").read_bytes()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    assert read_table(tmp_path / "bom.jsonl")["user_id"].tolist() == want["user_id"].tolist()


def test_files_in_another_format_than_their_name_say_so(small, tmp_path):
    import gzip
    df = small.head(100)
    write_table(df, tmp_path / "t.jsonl")
    write_table(df, tmp_path / "t.parquet")
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress((tmp_path / "t.jsonl").read_bytes()))
    with pytest.raises(ValueError, match="gz.jsonl: not JSON Lines; it is gzip-compressed"):
        read_table(tmp_path / "gz.jsonl")
    (tmp_path / "p.jsonl").write_bytes((tmp_path / "t.parquet").read_bytes())
    with pytest.raises(ValueError, match="p.jsonl: not JSON Lines; it is a Parquet file: name it .parquet"):
        read_table(tmp_path / "p.jsonl")
    (tmp_path / "j.parquet").write_bytes((tmp_path / "t.jsonl").read_bytes())
    with pytest.raises(ValueError, match=r"j.parquet: not a readable Parquet file .*name it .jsonl"):
        read_table(tmp_path / "j.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        read_table(tmp_path / "empty.jsonl")
    (tmp_path / "array.jsonl").write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="array.jsonl: not an impression table; line 1 is not a JSON object"):
        read_table(tmp_path / "array.jsonl")


def test_chunked_writes_number_rows_in_the_whole_table_and_keep_ids_alike(small, tmp_path):
    from stacker.dataset import TableWriter
    df = small.head(3000).reset_index(drop=True).copy()
    df["user_id"] = df["user_id"].str[1:].astype(float)          # integer ids through float columns
    df["created_at"] = df["created_at"].where(df.index % 7 != 0, 0)   # 0: unknown, as on the wire
    writer = TableWriter(tmp_path / "t.parquet", name="served.parquet")
    writer.write(df.iloc[:1000])
    writer.write(df.iloc[1000:2000])
    bad = df.iloc[2000:].copy()
    bad.loc[2013, "label.click"] = 3
    with pytest.raises(ValueError, match=r"^served.parquet: label.click: not 0 or 1 .* in 1 of the 1,000 rows from "
                                         r"row 2,000 \(row 2,013: 3\)"):
        writer.write(bad)
    writer.write(df.iloc[2000:])
    writer.commit()
    back = read_table(tmp_path / "t.parquet")
    assert back["user_id"].tolist() == [str(int(u)) for u in df["user_id"]]
    assert back["created_at"].tolist() == df["created_at"].tolist()
