"""Protobuf ↔ plain objects. Only this module and the servicer know the generated types."""
from __future__ import annotations

import hashlib

import numpy as np
from google.protobuf import json_format, struct_pb2

from feedrank.v1 import ranking_pb2 as pb
from stacker.metrics import json_safe

from .errors import InvalidInput
from .events import ACCEPTED, DUPLICATE, REJECTED, EventResult
from .handler import RankInput, RankResult

_MEDIA = {v: ("" if v == 0 else name.removeprefix("MEDIA_TYPE_").lower())
          for name, v in pb.MediaType.items()}
_KINDS = {v: name.removeprefix("EVENT_KIND_").lower() for name, v in pb.EventKind.items() if v}
_STATUS = {ACCEPTED: pb.EventResult.STATUS_ACCEPTED, DUPLICATE: pb.EventResult.STATUS_DUPLICATE,
           REJECTED: pb.EventResult.STATUS_REJECTED}


def rank_input(req: pb.RankRequest) -> RankInput:
    c = req.candidates
    n, names = len(c.post_ids), list(c.feature_names)
    f = len(names)
    features_error = None
    if len(c.features) != 4 * n * f:  # reported by the handler after the candidate-count checks
        features_error = (f"{len(c.features)} bytes, expected 4 × {n} candidates × {f} feature_names = "
                          f"{4 * n * f} (float32 little-endian)")
        features = np.zeros((0, f), np.float32)  # never sized by the request: n may be past every limit
    else:
        features = np.frombuffer(c.features, dtype="<f4").reshape(n, f) if f else np.zeros((n, 0), np.float32)
    try:
        media = [_MEDIA[m] for m in c.media_types]
    except KeyError as e:
        raise InvalidInput("candidates.media_types", f"unknown value {e.args[0]}") from None
    return RankInput(
        request_id=req.request_id, user_id=req.user.id, user_feature_names=list(req.user.feature_names),
        user_features=np.asarray(req.user.feature_values, np.float32),
        post_ids=list(c.post_ids), author_ids=list(c.author_ids),
        created_at=np.asarray(c.created_at_ms, np.int64), media=media,
        candidate_feature_names=names, candidate_features=features,
        time_ms=req.context.time_ms, device=req.context.device, surface=req.context.surface,
        seen_post_ids=list(req.seen_post_ids), limit=req.limit, task_weights=dict(req.task_weights),
        explain=req.explain, features_error=features_error,
        fingerprint=fingerprint(req) if req.request_id else b"")


def fingerprint(req: pb.RankRequest) -> bytes:
    """What a retry under the same request_id must repeat: everything but the context's time (a client
    may stamp each attempt anew)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (req.user.SerializeToString(deterministic=True),
                 req.candidates.SerializeToString(deterministic=True),
                 req.context.device.encode(), req.context.surface.encode(),
                 "\x00".join(req.seen_post_ids).encode(), str(req.limit).encode(),
                 repr(sorted(req.task_weights.items())).encode(), b"1" if req.explain else b"0"):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def version_of(ranker) -> pb.ModelVersion:
    """The version a live ranker serves now: its bundle, update sequence and the log offset covered."""
    return model_version(ranker.bundle_id, ranker.update_seq, ranker.covered_offset)


def model_version(bundle_id: str, update_seq: int, covered_offset: int = -1) -> pb.ModelVersion:
    return pb.ModelVersion(bundle_id=bundle_id, update_seq=update_seq, version=f"{bundle_id}+{update_seq}",
                           covered_offset=covered_offset)


def rank_response(r: RankResult) -> pb.RankResponse:
    probs = r.probabilities.astype(np.float32).tolist()
    scores, evs = r.scores.tolist(), r.evs.tolist()
    posts = [pb.RankedPost(post_id=pid, score=scores[k], ev=evs[k], probabilities=probs[k])
             for k, pid in enumerate(r.post_ids)]
    if r.contributions is not None:
        for post, contribs in zip(posts, r.contributions):
            post.contributions.extend(pb.Contribution(name=n, value=v) for n, v in contribs)
    return pb.RankResponse(request_id=r.request_id, model_version=model_version(r.bundle_id, r.update_seq, r.covered_offset),
                           tasks=list(r.tasks), posts=posts, ignored_feature_names=r.ignored_feature_names,
                           defaulted_feature_names=r.defaulted_feature_names,
                           dropped_seen=r.dropped_seen)


def event_dicts(req: pb.LogEventsRequest) -> list[dict]:
    out = []
    for e in req.events:
        d = {"event_id": e.event_id, "request_id": e.request_id, "post_id": e.post_id,
             "kind": _KINDS.get(e.kind) or (pb.EventKind.Name(0) if e.kind == 0 else str(e.kind)),
             "ts": e.ts_ms}
        if e.dwell_ms or e.kind == pb.EVENT_KIND_DWELL:
            d["dwell_ms"] = e.dwell_ms
        out.append(d)
    return out


def events_response(results: list[EventResult]) -> pb.LogEventsResponse:
    return pb.LogEventsResponse(results=[pb.EventResult(event_id=r.event_id, status=_STATUS[r.status],
                                                        reason=r.reason, log_offset=r.log_offset) for r in results])


def struct(d: dict | None) -> struct_pb2.Struct | None:
    if not d:
        return None
    s = struct_pb2.Struct()
    json_format.ParseDict(json_safe(d), s)   # NaN (a metric not defined yet) as null
    return s
