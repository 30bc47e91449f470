"""Build Rank requests (from simulated feed requests) and talk to a server; used by bench and tests."""
from __future__ import annotations

import numpy as np

from feedrank.v1 import ranking_pb2 as pb

MEDIA = {"text": pb.MEDIA_TYPE_TEXT, "photo": pb.MEDIA_TYPE_PHOTO, "video": pb.MEDIA_TYPE_VIDEO,
         "link": pb.MEDIA_TYPE_LINK}


def rank_request(feed, limit: int = 50, request_id: str | None = None, explain: bool = False,
                 n: int | None = None) -> pb.RankRequest:
    """A RankRequest from a ``feedsim.closed_loop.FeedRequest`` (first ``n`` candidates)."""
    n = len(feed) if n is None else min(n, len(feed))
    return pb.RankRequest(
        request_id=feed.request_id if request_id is None else request_id,
        user=pb.User(id=feed.user_id, feature_names=list(feed.user_features),
                     feature_values=list(feed.user_features.values())),
        candidates=pb.Candidates(
            post_ids=list(feed.post_ids[:n]), author_ids=list(feed.author_ids[:n]),
            created_at_ms=feed.created_at[:n].tolist(), media_types=[MEDIA[m] for m in feed.media_types[:n]],
            feature_names=list(feed.feature_names),
            features=np.ascontiguousarray(feed.features[:n], dtype="<f4").tobytes()),
        context=pb.Context(time_ms=feed.ts, device=feed.device, surface=feed.surface),
        limit=limit, explain=explain)


def feed_requests(count: int, seed: int = 1, start_ms: int | None = None, step_ms: int = 20_000,
                  min_candidates: int = 500, max_candidates: int = 500):
    """``count`` simulated feed requests from the default world, spaced ``step_ms`` apart."""
    from feedsim.closed_loop import FeedUsers
    from feedsim.simulate import get_world

    world = get_world()
    users = FeedUsers(world, seed=seed, min_candidates=min_candidates, max_candidates=max_candidates)
    t = start_ms if start_ms is not None else int(world.config.start_ms) + 3 * 86_400_000
    return [users.next_request(t + i * step_ms) for i in range(count)]
