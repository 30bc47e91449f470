"""What the simulated world looks like: base rates, the oracle's NE, and where the click logit's
variance comes from."""
from __future__ import annotations

import numpy as np
import pandas as pd

from stacker.metrics import normalized_entropy
from stacker.progress import Progress
from stacker.schema import MEDIA_TYPES, TASKS, label_column, true_column

from .simulate import get_world, simulate
from .world import COMPONENTS, DEFAULT_WORLD, WorldConfig

TOPIC_AS_SEEN = "post topic seen via features"
# Gauss-Hermite nodes per component: averaged over (blind oracles), learned alone, learned jointly.
MARGINAL_NODES, LEARNED_NODES, JOINT_NODES = 12, 31, 11


def _marginal_click(world, comps: dict, media, position, held, nodes: int = MARGINAL_NODES, tick=None,
                    topics: "TopicAsSeen | None" = None) -> np.ndarray:
    """P(click) averaged over the ``held`` components, the others known exactly (with ``topics``,
    each post's topic as its features show it)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    k = TASKS.index("click")
    grids = np.meshgrid(*[np.arange(nodes)] * len(held), indexing="ij")
    out = np.zeros(len(media))
    for idx in zip(*(g.ravel() for g in grids)):
        c = dict(comps)
        for name, i in zip(held, idx):
            c[name] = np.full(len(media), comps[name].mean() + comps[name].std() * x[i])
        for drawn, weight in _topic_draws(topics):
            out += np.prod([w[i] for i in idx]) * weight * world.probabilities({**c, **drawn}, media, position,
                                                                              tasks=[k])[:, 0]
        if tick:
            tick()
    return out


def _history(loglik: np.ndarray, groups: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """Per row, the sum of ``loglik`` [N, G] over its group's rows in earlier requests (rows are in
    time order; a served model has no labels from the request it is scoring)."""
    n = len(groups)
    order = np.lexsort((np.arange(n), groups))         # by group, then time
    go, ro = groups[order], requests[order]
    first = np.r_[True, go[1:] != go[:-1]]                           # a group's first impression
    first_req = first | np.r_[True, ro[1:] != ro[:-1]]               # ... or a new request of the group
    before = np.cumsum(loglik[order], axis=0, dtype=np.float64) - loglik[order]   # exclusive history
    # history = everything before the group's current request, minus what came before the group
    before = before[np.flatnonzero(first_req)][np.cumsum(first_req) - 1] \
        - before[np.flatnonzero(first)][np.cumsum(first) - 1]
    out = np.empty_like(before)
    out[order] = before
    return out


def _posterior(log_prior: np.ndarray, loglik: np.ndarray, groups, requests) -> np.ndarray:
    """Per row, the posterior [N, G] over a grid given its group's earlier requests."""
    post = log_prior[None, :] + _history(loglik, groups, requests)
    post = np.exp(post - post.max(axis=1, keepdims=True))
    return post / post.sum(axis=1, keepdims=True)


class TopicAsSeen:
    """Each post's topic as its features show it: the posterior given the author's topic mix (the
    post's Dirichlet prior) and the noisy content embedding, as ``samples`` draws from the prior
    weighted by the embedding's likelihood (importance sampling). ``comps[s]`` holds the click-logit
    components that depend on the topic (interest, drift, the non-linear threshold) for draw ``s``,
    per row; ``weights[:, s]`` is that draw's posterior weight for the row's post."""

    def __init__(self, world, df: pd.DataFrame, samples: int = 32, seed: int = 7):
        c = world.config
        u = df["user_id"].str[1:].astype(np.int64).to_numpy()
        p = df["post_id"].str[1:].astype(np.int64).to_numpy()
        ts = df["ts"].to_numpy()
        posts, row_post = np.unique(p, return_inverse=True)
        P = world.posts
        alpha = world.author_mix[P["author"][posts]] * c.post_topic_concentration + 0.05
        emb = P["emb"][posts].astype(np.float64)
        rng = np.random.default_rng(seed)
        now, stale = world.interest_at(u, ts), world.batch_interest(u, ts)
        hour_media = world.hour_media[P["media"][p], ((ts // 3_600_000) % 24).astype(np.int64)]
        log_w = np.empty((len(posts), samples))
        self.comps = []
        for s in range(samples):
            g = rng.gamma(alpha)
            topic = g / g.sum(axis=1, keepdims=True)
            log_w[:, s] = -0.5 * ((emb - c.emb_scale * topic @ world.emb_proj) ** 2).sum(axis=1) / c.emb_noise ** 2
            m_stale = np.einsum("nk,nk->n", stale, topic[row_post])
            m_now = np.einsum("nk,nk->n", now, topic[row_post])
            self.comps.append({"interest": c.interest_weight * m_stale,
                               "drift": c.interest_weight * (m_now - m_stale),
                               "nonlinear": hour_media + c.threshold_gain * np.maximum(m_now - c.threshold, 0.0)})
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        self.weights = w[row_post]
        self.effective_samples = float(np.median(1.0 / (w ** 2).sum(axis=1)))


def _grid_loglik(world, comps: dict, media, position, labels: np.ndarray, values: dict,
                 topics: TopicAsSeen | None = None):
    """Log-likelihood of every row's labels (all tasks) and its P(click), with the components named
    in ``values`` set to the given constants; with ``topics``, averaged over each post's topic as
    its features show it."""
    c = dict(comps)
    for name, v in values.items():
        c[name] = np.full(len(media), v)
    k = TASKS.index("click")
    # log sum_s w_s exp(loglik_s), accumulated as (running max, sum scaled by it): exact for one draw
    top, scaled, click = np.full(len(media), -np.inf), np.zeros(len(media)), np.zeros(len(media))
    for drawn, weight in _topic_draws(topics):
        p = np.clip(world.probabilities({**c, **drawn}, media, position), 1e-12, 1 - 1e-12)   # [N, T]
        loglik = np.where(labels == 1, np.log(p), np.log1p(-p)).sum(axis=1)
        new_top = np.maximum(top, loglik)
        scaled = scaled * np.exp(top - new_top) + weight * np.exp(loglik - new_top)
        top = new_top
        click += weight * p[:, k]
    return top + np.log(scaled), click


def _topic_draws(topics: TopicAsSeen | None):
    """``(components, weight per row)`` of each draw of the posts' topics: one draw of nothing, weight 1,
    when the topics are known (the world's own components stand)."""
    if topics is None:
        return [({}, 1.0)]
    return [(drawn, topics.weights[:, s]) for s, drawn in enumerate(topics.comps)]


def _learned_click(world, comps: dict, media, position, labels: np.ndarray, groups: np.ndarray,
                   requests: np.ndarray, name: str, nodes: int = LEARNED_NODES, tick=None) -> np.ndarray:
    """P(click) of an oracle that knows every component but ``name``, and infers it per group (a
    user x author pair for ``tie``, a post for ``post``) from that group's impressions in earlier
    requests (all tasks' labels): the posterior mean over a Gauss-Hermite grid of the component's
    normal prior, updated request by request in time order."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    mean, sigma = float(comps[name].mean()), float(comps[name].std())
    loglik, click = np.empty((len(media), nodes)), np.empty((len(media), nodes))
    for j in range(nodes):
        loglik[:, j], click[:, j] = _grid_loglik(world, comps, media, position, labels, {name: mean + sigma * x[j]})
        if tick:
            tick()
    return (_posterior(np.log(w / w.sum()), loglik, groups, requests) * click).sum(axis=1)


def _learned_tie_post_click(world, comps: dict, media, position, labels: np.ndarray, pairs, posts,
                            requests, nodes: int = JOINT_NODES, tick=None,
                            topics: TopicAsSeen | None = None) -> np.ndarray:
    """P(click) of an oracle that knows every component but the tie and post quality, and learns both
    from history: each post's quality from its impressions in earlier requests (with the ties averaged
    over their prior), then each pair's tie from the pair's earlier impressions, each of them weighed
    by what was known of its post at the time (assumed-density filtering on a grid; 11 nodes per
    component give the same NE as 21 to 1e-4)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    log_prior = np.log(w / w.sum()).astype(np.float32)
    grid = {k: float(comps[k].mean()) + float(comps[k].std()) * x for k in ("tie", "post")}
    n = len(media)
    loglik = np.empty((n, nodes, nodes), np.float32)          # [row, post node, tie node]
    click = np.empty((n, nodes, nodes), np.float32)
    for i in range(nodes):
        for j in range(nodes):
            loglik[:, i, j], click[:, i, j] = _grid_loglik(world, comps, media, position, labels,
                                                           {"post": grid["post"][i], "tie": grid["tie"][j]},
                                                           topics)
            if tick:
                tick()

    def logsumexp(a, axis):
        m = a.max(axis=axis, keepdims=True)
        return (np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)

    post_q = _posterior(log_prior, logsumexp(loglik + log_prior[None, None, :], 2), posts, requests)
    tie_row = logsumexp(loglik + np.log(np.maximum(post_q, 1e-300))[:, :, None].astype(np.float32), 1)
    post_t = _posterior(log_prior, tie_row, pairs, requests)
    return np.einsum("ni,nj,nij->n", post_q, post_t, click)


def describe(config: WorldConfig = DEFAULT_WORLD, n_impressions: int = 200_000, seed: int | None = None,
             progress: Progress | None = None, topic_samples: int = 0) -> dict:
    """Simulate ``n_impressions`` and summarise them.

    Returns a dict with ``base_rate`` and ``oracle_ne`` (per task; the oracle predicts true.<task>),
    ``click_variance_share`` (var(component) / var(click logit given examined), per component of
    ``feedsim.world.COMPONENTS`` plus ``position`` = log examine prob, relative to the same total),
    and the headline shares ``ties_share``, ``nonlinear_share``, ``drift_share``; plus sizes.

    ``oracle_click_ne_without`` is the click NE of oracles that know every component but the named
    ones, over which they average (Gauss-Hermite, each a normal with its observed mean and spread):
    the best any model can do without ties or post quality, which no dense feature shows.
    The entries ``... learned from history`` infer the tie (per user x author pair) or the post's quality
    (per post) Bayes-optimally from impressions in earlier requests instead, or both (approximately:
    assumed-density filtering, see :func:`_learned_tie_post_click`): a reference for a model that must
    learn them from the stream, though one that knows everything else exactly (user and author effects,
    true interests) and has every earlier request's labels at once (the served learner waits out an
    attribution window). ``user_author_pairs`` says how often pairs recur.
    With ``topic_samples`` > 0 three more oracles see each post's topic only as its features show it
    (the author's topic mix and the noisy content embedding; :class:`TopicAsSeen`, ``topic_samples``
    draws per post), everything else as above: knowing the rest exactly, blind to ties too, and
    learning ties and post quality from history. The last costs ``topic_samples`` times the joint
    oracle's time (about half an hour at 32 on 1M impressions).
    ``oracle_ne_target_share`` is the share of the full oracle's (1 - NE) each of them keeps, to read
    a "model reaches x% of the oracle" target against. ``latest_slice`` holds the same figures over
    the test slice of `feedrank eval` (the last of its default time slices; NE over the entropy of the
    earlier rows' base rate, as `eval` computes it).
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
    pairs = pd.factorize(df["user_id"].astype(str) + "\x1f" + df["author_id"].astype(str))[0]
    per_pair = np.bincount(pairs)
    labels = np.stack([df[label_column(t)].to_numpy() for t in TASKS], axis=1)
    requests = pd.factorize(df["request_id"])[0]
    posts = pd.factorize(df["post_id"])[0]
    progress = progress or Progress()
    points = 2 * MARGINAL_NODES + MARGINAL_NODES ** 2 + 2 * LEARNED_NODES + JOINT_NODES ** 2
    if topic_samples:
        points += 1 + MARGINAL_NODES + JOINT_NODES ** 2
    with progress.task("oracles (grid points)", points) as bar:
        preds = {name: _marginal_click(world, comps, media, position, held, tick=bar.update)
                 for name, held in (("tie", ("tie",)), ("post", ("post",)), ("tie+post", ("tie", "post")))}
        for name, groups in (("tie", pairs), ("post", posts)):
            preds[f"{name} learned from history"] = _learned_click(world, comps, media, position, labels, groups,
                                                                   requests, name, tick=bar.update)
        preds["tie+post learned from history"] = _learned_tie_post_click(
            world, comps, media, position, labels, pairs, posts, requests, tick=bar.update)
        if topic_samples:
            topics = TopicAsSeen(world, df, topic_samples)
            preds[TOPIC_AS_SEEN] = _grid_loglik(world, comps, media, position, labels, {}, topics)[1]
            bar.update()
            preds[f"tie, {TOPIC_AS_SEEN}"] = _marginal_click(world, comps, media, position, ("tie",),
                                                            tick=bar.update, topics=topics)
            preds[f"tie+post learned from history, {TOPIC_AS_SEEN}"] = _learned_tie_post_click(
                world, comps, media, position, labels, pairs, posts, requests, tick=bar.update, topics=topics)
    true_click = df[true_column("click")].to_numpy()
    from stacker.train import TrainConfig, time_slices   # (the training stack, only for its slices)
    *before, latest = time_slices(df["ts"].to_numpy(), TrainConfig().slices)
    earlier = np.concatenate(before)

    def kept(rows, base_rate):
        oracle = normalized_entropy(click[rows], true_click[rows], base_rate)
        ne = {k: normalized_entropy(click[rows], v[rows], base_rate) for k, v in preds.items()}
        return oracle, ne, {k: float((1 - v) / (1 - oracle)) for k, v in ne.items()}

    _, without, target = kept(slice(None), float(click.mean()))
    # NE over the entropy of the earlier rows' base rate, as `feedrank eval` scores its test slice
    latest_oracle, latest_without, latest_target = kept(latest, float(click[earlier].mean()))
    return {
        "n_impressions": int(len(df)),
        "n_requests": int(df["request_id"].nunique()),
        "n_users": int(df["user_id"].nunique()),
        "n_authors": int(df["author_id"].nunique()),
        "n_posts": int(df["post_id"].nunique()),
        "span_days": span_days,
        "seed": config.seed if seed is None else seed,
        "base_rate": {t: float(df[label_column(t)].mean()) for t in TASKS},
        "oracle_ne": {t: normalized_entropy(labels[:, k], df[true_column(t)].to_numpy(), float(labels[:, k].mean()))
                      for k, t in enumerate(TASKS)},
        "click_logit_var": var,
        "click_variance_share": shares,
        "ties_share": shares["tie"],
        "nonlinear_share": shares["nonlinear"],
        "drift_share": shares["drift"],
        "oracle_click_ne_without": without,
        "oracle_ne_target_share": target,
        "latest_slice": {"rows": int(len(latest)), "oracle_click_ne": latest_oracle,
                         "oracle_click_ne_without": latest_without, "oracle_ne_target_share": latest_target},
        **({"topic_effective_samples": topics.effective_samples} if topic_samples else {}),
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
    latest = d["latest_slice"]
    lines.append("oracle click NE without what no dense feature shows (averaged over it, or learned from")
    lines.append(f"history), and the share of the full oracle's 1 - NE it keeps; over all rows, and over the "
                 f"latest {latest['rows']:,}")
    lines.append(f"(the test slice of `feedrank eval`, full oracle click NE {latest['oracle_click_ne']:.4f}):")
    labels = {k: ("with " if "learned" in k or k.startswith(TOPIC_AS_SEEN) else "without ") + k
              for k in d["oracle_click_ne_without"]}
    width = max(34, *map(len, labels.values()))
    for k, v in d["oracle_click_ne_without"].items():
        label = labels[k]
        lines.append(f"  {label:<{width}}{v:>8.4f} {d['oracle_ne_target_share'][k]:>7.1%}    latest "
                     f"{latest['oracle_click_ne_without'][k]:.4f} {latest['oracle_ne_target_share'][k]:>7.1%}")
    if "topic_effective_samples" in d:
        lines.append(f"(a post's topic seen via features: its author's topic mix and its noisy content embedding; "
                     f"median effective draws per post {d['topic_effective_samples']:.1f})")
    pp = d["user_author_pairs"]
    lines.append(f"user x author pairs: {pp['pairs']:,}, impressions per pair mean {pp['mean_impressions']:.1f}, "
                 f"median {pp['median_impressions']:.0f}, {pp['impression_weighted_mean']:.1f} for the pair of an "
                 f"average impression")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(format_description(describe(n_impressions=n)))
