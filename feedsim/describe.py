"""What the simulated world looks like: base rates, the oracle's NE, and where the click logit's
variance comes from."""
from __future__ import annotations

import numpy as np
import pandas as pd

from stacker.schema import MEDIA_TYPES, TASKS, label_column, true_column

from .simulate import get_world, simulate
from .world import COMPONENTS, DEFAULT_WORLD, WorldConfig


def _entropy(b: float) -> float:
    b = min(max(b, 1e-12), 1 - 1e-12)
    return float(-(b * np.log(b) + (1 - b) * np.log(1 - b)))


def normalized_entropy(y: np.ndarray, p: np.ndarray) -> float:
    """Logloss of ``p`` against labels ``y`` divided by the entropy of the base rate."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    return float(ll / _entropy(y.mean()))


def _marginal_click(world, comps: dict, media, position, held, nodes: int = 12) -> np.ndarray:
    """P(click) averaged over the ``held`` components, the others known exactly."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    k = TASKS.index("click")
    grids = np.meshgrid(*[np.arange(nodes)] * len(held), indexing="ij")
    out = np.zeros(len(media))
    for idx in zip(*(g.ravel() for g in grids)):
        c = dict(comps)
        for name, i in zip(held, idx):
            c[name] = np.full(len(media), comps[name].mean() + comps[name].std() * x[i])
        out += np.prod([w[i] for i in idx]) * world.probabilities(c, media, position, tasks=[k])[:, 0]
    return out


def _learned_tie_click(world, comps: dict, media, position, labels: np.ndarray, pairs: np.ndarray,
                       requests: np.ndarray, nodes: int = 31) -> np.ndarray:
    """P(click) of an oracle that knows every component but the tie, and infers each user x author
    tie from that pair's impressions in earlier requests (all tasks' labels; a served model has no
    labels from the request it is scoring): the posterior mean over a Gauss-Hermite grid of the tie's
    normal prior, updated request by request in time order."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    log_prior = np.log(w / w.sum())
    sigma = float(comps["tie"].std())
    base = dict(comps)
    base["tie"] = np.zeros(len(media))
    n, k_click = len(media), TASKS.index("click")
    click_grid = np.empty((n, nodes), np.float64)
    loglik = np.zeros((n, nodes), np.float64)
    for j in range(nodes):
        c = dict(base)
        c["tie"] = np.full(n, sigma * x[j])
        p = np.clip(world.probabilities(c, media, position), 1e-12, 1 - 1e-12)     # [N, T]
        loglik[:, j] = np.where(labels == 1, np.log(p), np.log1p(-p)).sum(axis=1)
        click_grid[:, j] = p[:, k_click]
    order = np.lexsort((np.arange(n), pairs))          # by pair, then time (rows are in time order)
    po, ro = pairs[order], requests[order]
    first = np.r_[True, po[1:] != po[:-1]]                           # a pair's first impression
    first_req = first | np.r_[True, ro[1:] != ro[:-1]]               # ... or a new request of the pair
    before = np.cumsum(loglik[order], axis=0) - loglik[order]        # each row's exclusive history
    # history = everything before the pair's current request, minus what came before the pair
    before = before[np.flatnonzero(first_req)][np.cumsum(first_req) - 1] \
        - before[np.flatnonzero(first)][np.cumsum(first) - 1]
    post = log_prior[None, :] + before
    post = np.exp(post - post.max(axis=1, keepdims=True))
    out = np.empty(n)
    out[order] = (post * click_grid[order]).sum(axis=1) / post.sum(axis=1)
    return out


def describe(config: WorldConfig = DEFAULT_WORLD, n_impressions: int = 200_000, seed: int | None = None) -> dict:
    """Simulate ``n_impressions`` and summarise them.

    Returns a dict with ``base_rate`` and ``oracle_ne`` (per task; the oracle predicts true.<task>),
    ``click_variance_share`` (var(component) / var(click logit given examined), per component of
    ``feedsim.world.COMPONENTS`` plus ``position`` = log examine prob, relative to the same total),
    and the headline shares ``ties_share``, ``nonlinear_share``, ``drift_share``; plus sizes.

    ``oracle_click_ne_without`` is the click NE of oracles that know every component but the named
    ones, over which they average (Gauss-Hermite, each a normal with its observed mean and spread):
    the best any model can do without ties or post quality, which no dense feature shows.
    Its entry ``tie learned from history`` infers each tie Bayes-optimally from the pair's impressions
    in earlier requests instead: the best any model that must learn ties from the stream can reach, even
    knowing everything else exactly. ``user_author_pairs`` says how often pairs recur.
    ``oracle_ne_target_share`` is the share of the full oracle's (1 - NE) each of them keeps, to read
    a "model reaches x% of the oracle" target against.
    """
    df, comps = simulate(n_impressions, config=config, seed=seed, return_components=True)
    total = np.sum([comps[k] for k in COMPONENTS], axis=0)
    var = float(total.var())
    shares = {k: float(comps[k].var() / var) for k in (*COMPONENTS, "position")}
    span_days = float((df["ts"].max() - df["ts"].min()) / 86_400_000)
    world = get_world(config)
    index = {m: i for i, m in enumerate(MEDIA_TYPES)}
    media = np.fromiter((index[m] for m in df["media_type"].to_numpy()), np.int64, len(df))
    click = df[label_column("click")].to_numpy()
    position = df["position"].to_numpy()
    without = {name: normalized_entropy(click, _marginal_click(world, comps, media, position, held))
               for name, held in (("tie", ("tie",)), ("post", ("post",)), ("tie+post", ("tie", "post")))}
    oracle_click = normalized_entropy(click, df[true_column("click")].to_numpy())
    pairs = pd.factorize(df["user_id"].astype(str) + "\x1f" + df["author_id"].astype(str))[0]
    per_pair = np.bincount(pairs)
    labels = np.stack([df[label_column(t)].to_numpy() for t in TASKS], axis=1)
    requests = pd.factorize(df["request_id"])[0]
    learned = _learned_tie_click(world, comps, media, position, labels, pairs, requests)
    without["tie learned from history"] = normalized_entropy(click, learned)
    return {
        "n_impressions": int(len(df)),
        "n_requests": int(df["request_id"].nunique()),
        "n_users": int(df["user_id"].nunique()),
        "n_authors": int(df["author_id"].nunique()),
        "n_posts": int(df["post_id"].nunique()),
        "span_days": span_days,
        "seed": config.seed if seed is None else seed,
        "base_rate": {t: float(df[label_column(t)].mean()) for t in TASKS},
        "oracle_ne": {t: normalized_entropy(df[label_column(t)].to_numpy(), df[true_column(t)].to_numpy())
                      for t in TASKS},
        "click_logit_var": var,
        "click_variance_share": shares,
        "ties_share": shares["tie"],
        "nonlinear_share": shares["nonlinear"],
        "drift_share": shares["drift"],
        "oracle_click_ne_without": without,
        "oracle_ne_target_share": {k: float((1 - v) / (1 - oracle_click)) for k, v in without.items()},
        "user_author_pairs": {"pairs": int(len(per_pair)), "mean_impressions": float(per_pair.mean()),
                              "median_impressions": float(np.median(per_pair)),
                              "impression_weighted_mean": float((per_pair ** 2).sum() / per_pair.sum())},
    }


def format_description(d: dict) -> str:
    lines = [
        f"feedsim world: {d['n_impressions']:,} impressions, {d['n_requests']:,} requests, "
        f"{d['n_users']:,} users, {d['n_authors']:,} authors, {d['n_posts']:,} posts, "
        f"{d['span_days']:.1f} days (seed {d['seed']})",
        "",
        f"{'task':<10}{'base rate':>12}{'oracle NE':>12}",
    ]
    for t in d["base_rate"]:
        lines.append(f"{t:<10}{d['base_rate'][t]:>12.4%}{d['oracle_ne'][t]:>12.4f}")
    lines += ["", f"click logit (given examined) variance {d['click_logit_var']:.3f}; share by component:"]
    for k, v in d["click_variance_share"].items():
        lines.append(f"  {k:<12}{v:>8.1%}")
    lines.append(f"headline: ties {d['ties_share']:.1%}, non-linear {d['nonlinear_share']:.1%}, "
                 f"drift {d['drift_share']:.1%}")
    lines.append("")
    lines.append("oracle click NE without what no dense feature shows (averaged over it):")
    for k, v in d["oracle_click_ne_without"].items():
        label = ("with " if "learned" in k else "without ") + k
        lines.append(f"  {label:<32}{v:>8.4f}   keeps "
                     f"{d['oracle_ne_target_share'][k]:.1%} of the oracle's 1 - NE")
    pp = d["user_author_pairs"]
    lines.append(f"user x author pairs: {pp['pairs']:,}, impressions per pair mean {pp['mean_impressions']:.1f}, "
                 f"median {pp['median_impressions']:.0f}, {pp['impression_weighted_mean']:.1f} for the pair of an "
                 f"average impression")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(format_description(describe(n_impressions=n)))
