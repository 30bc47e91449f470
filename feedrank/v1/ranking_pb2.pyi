from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_TYPE_UNSPECIFIED: _ClassVar[MediaType]
    MEDIA_TYPE_TEXT: _ClassVar[MediaType]
    MEDIA_TYPE_PHOTO: _ClassVar[MediaType]
    MEDIA_TYPE_VIDEO: _ClassVar[MediaType]
    MEDIA_TYPE_LINK: _ClassVar[MediaType]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_VIEW: _ClassVar[EventKind]
    EVENT_KIND_CLICK: _ClassVar[EventKind]
    EVENT_KIND_LIKE: _ClassVar[EventKind]
    EVENT_KIND_COMMENT: _ClassVar[EventKind]
    EVENT_KIND_SHARE: _ClassVar[EventKind]
    EVENT_KIND_HIDE: _ClassVar[EventKind]
    EVENT_KIND_DWELL: _ClassVar[EventKind]
MEDIA_TYPE_UNSPECIFIED: MediaType
MEDIA_TYPE_TEXT: MediaType
MEDIA_TYPE_PHOTO: MediaType
MEDIA_TYPE_VIDEO: MediaType
MEDIA_TYPE_LINK: MediaType
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_VIEW: EventKind
EVENT_KIND_CLICK: EventKind
EVENT_KIND_LIKE: EventKind
EVENT_KIND_COMMENT: EventKind
EVENT_KIND_SHARE: EventKind
EVENT_KIND_HIDE: EventKind
EVENT_KIND_DWELL: EventKind

class User(_message.Message):
    __slots__ = ("id", "feature_names", "feature_values")
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VALUES_FIELD_NUMBER: _ClassVar[int]
    id: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    feature_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., feature_values: _Optional[_Iterable[float]] = ...) -> None: ...

class Candidates(_message.Message):
    __slots__ = ("post_ids", "author_ids", "created_at_ms", "media_types", "feature_names", "features")
    POST_IDS_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    post_ids: _containers.RepeatedScalarFieldContainer[str]
    author_ids: _containers.RepeatedScalarFieldContainer[str]
    created_at_ms: _containers.RepeatedScalarFieldContainer[int]
    media_types: _containers.RepeatedScalarFieldContainer[MediaType]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    features: bytes
    def __init__(self, post_ids: _Optional[_Iterable[str]] = ..., author_ids: _Optional[_Iterable[str]] = ..., created_at_ms: _Optional[_Iterable[int]] = ..., media_types: _Optional[_Iterable[_Union[MediaType, str]]] = ..., feature_names: _Optional[_Iterable[str]] = ..., features: _Optional[bytes] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("time_ms", "device", "surface")
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    time_ms: int
    device: str
    surface: str
    def __init__(self, time_ms: _Optional[int] = ..., device: _Optional[str] = ..., surface: _Optional[str] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "user", "candidates", "context", "seen_post_ids", "limit", "task_weights", "explain")
    class TaskWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SEEN_POST_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TASK_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user: User
    candidates: Candidates
    context: Context
    seen_post_ids: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    task_weights: _containers.ScalarMap[str, float]
    explain: bool
    def __init__(self, request_id: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., candidates: _Optional[_Union[Candidates, _Mapping]] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., seen_post_ids: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., task_weights: _Optional[_Mapping[str, float]] = ..., explain: _Optional[bool] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("bundle_id", "update_seq", "version", "covered_offset")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SEQ_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COVERED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    update_seq: int
    version: str
    covered_offset: int
    def __init__(self, bundle_id: _Optional[str] = ..., update_seq: _Optional[int] = ..., version: _Optional[str] = ..., covered_offset: _Optional[int] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class RankedPost(_message.Message):
    __slots__ = ("post_id", "score", "probabilities", "ev", "contributions")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EV_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    post_id: str
    score: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    ev: float
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    def __init__(self, post_id: _Optional[str] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., ev: _Optional[float] = ..., contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "model_version", "tasks", "posts", "ignored_feature_names", "dropped_seen", "server_ms", "stage_ms", "defaulted_feature_names")
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    POSTS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEEN_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTED_FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_version: ModelVersion
    tasks: _containers.RepeatedScalarFieldContainer[str]
    posts: _containers.RepeatedCompositeFieldContainer[RankedPost]
    ignored_feature_names: _containers.RepeatedScalarFieldContainer[str]
    dropped_seen: int
    server_ms: float
    stage_ms: _containers.ScalarMap[str, float]
    defaulted_feature_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., tasks: _Optional[_Iterable[str]] = ..., posts: _Optional[_Iterable[_Union[RankedPost, _Mapping]]] = ..., ignored_feature_names: _Optional[_Iterable[str]] = ..., dropped_seen: _Optional[int] = ..., server_ms: _Optional[float] = ..., stage_ms: _Optional[_Mapping[str, float]] = ..., defaulted_feature_names: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_version", "bundle_path", "training_start_ms", "training_end_ms", "tasks", "ev_weights", "user_feature_names", "candidate_feature_names", "trees", "offline_metrics", "online_metrics", "loaded_at_ms")
    class EvWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    TRAINING_START_MS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_END_MS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EV_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    USER_FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    TREES_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_METRICS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_METRICS_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    bundle_path: str
    training_start_ms: int
    training_end_ms: int
    tasks: _containers.RepeatedScalarFieldContainer[str]
    ev_weights: _containers.ScalarMap[str, float]
    user_feature_names: _containers.RepeatedScalarFieldContainer[str]
    candidate_feature_names: _containers.RepeatedScalarFieldContainer[str]
    trees: int
    offline_metrics: _struct_pb2.Struct
    online_metrics: _struct_pb2.Struct
    loaded_at_ms: int
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., bundle_path: _Optional[str] = ..., training_start_ms: _Optional[int] = ..., training_end_ms: _Optional[int] = ..., tasks: _Optional[_Iterable[str]] = ..., ev_weights: _Optional[_Mapping[str, float]] = ..., user_feature_names: _Optional[_Iterable[str]] = ..., candidate_feature_names: _Optional[_Iterable[str]] = ..., trees: _Optional[int] = ..., offline_metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., online_metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., loaded_at_ms: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "request_id", "post_id", "kind", "ts_ms", "dwell_ms")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    DWELL_MS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    post_id: str
    kind: EventKind
    ts_ms: int
    dwell_ms: int
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., post_id: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., ts_ms: _Optional[int] = ..., dwell_ms: _Optional[int] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("event_id", "status", "reason", "log_offset")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[EventResult.Status]
        STATUS_ACCEPTED: _ClassVar[EventResult.Status]
        STATUS_DUPLICATE: _ClassVar[EventResult.Status]
        STATUS_REJECTED: _ClassVar[EventResult.Status]
    STATUS_UNSPECIFIED: EventResult.Status
    STATUS_ACCEPTED: EventResult.Status
    STATUS_DUPLICATE: EventResult.Status
    STATUS_REJECTED: EventResult.Status
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOG_OFFSET_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    status: EventResult.Status
    reason: str
    log_offset: int
    def __init__(self, event_id: _Optional[str] = ..., status: _Optional[_Union[EventResult.Status, str]] = ..., reason: _Optional[str] = ..., log_offset: _Optional[int] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("model_version", "previous_version")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: ModelVersion
    previous_version: ModelVersion
    def __init__(self, model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., previous_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("path", "model_version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    model_version: ModelVersion
    def __init__(self, path: _Optional[str] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ...) -> None: ...
