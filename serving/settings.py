"""The one settings object of the server: env prefix ``FEEDRANK_``, optional TOML/JSON/YAML file.

Precedence (highest first): explicit keyword arguments (the CLI's flags), ``FEEDRANK_*`` environment
variables, the settings file, the defaults below. Nothing else in the server reads the environment.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ServingSettings(BaseSettings):
    """Everything ``feedrank serve`` can be told; one line per field."""

    model_config = SettingsConfigDict(env_prefix="FEEDRANK_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on ('[::]' for all interfaces)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    workers: int = Field(1, ge=1, description="server processes sharing the port via SO_REUSEPORT")
    # More handler threads only add GIL contention: on 2 cores, 4 served ~190 Rank/s at concurrency 16,
    # 8 served ~146.
    threads: int = Field(4, ge=1, description="gRPC handler threads per process")
    # A Rank that waited longer than this for a handler thread is refused (RESOURCE_EXHAUSTED) before it is ranked,
    # so an overloaded process sheds Rank calls in well under a feed's deadline while LogEvents, health checks
    # and admin calls still get through (they are never shed).
    max_queue_ms: float = Field(100.0, ge=0, description="longest a Rank call may wait for a handler thread before it is refused with RESOURCE_EXHAUSTED (0 = no limit)")
    max_concurrent_rpcs: int = Field(1000, ge=0, description="last-resort cap: calls in flight (running and queued) per process past which gRPC refuses every call, health checks and LogEvents included (0 = unbounded)")
    xgb_threads: int = Field(1, ge=1, description="XGBoost threads per leaf prediction")
    bundle: Path | None = Field(None, description="bundle directory to serve")
    model_dir: Path | None = Field(None, description="directory of bundles: serve the newest valid one, poll for new")
    poll_interval_s: float = Field(5.0, ge=0, description="how often model_dir is polled for a new bundle (0 = never)")
    update_poll_s: float = Field(0.05, ge=0, description="how often <updates_dir>/updates/<bundle_id>/ is polled for online weight updates (0 = never)")
    updates_dir: Path | None = Field(None, description="where the online learner publishes weight updates (default: model_dir, else learner_state_dir/published)")
    bus_url: str | None = Field(None, description="Redis URL: also publish served records and events to its stream (scale-out); the embedded learner then reads the stream")
    learner: bool = Field(True, description="run the online learner in its own process beside the server (needs eventlog_dir; one worker)")
    learner_state_dir: Path = Field(Path("runs/learner"), description="the learner's checkpoints, status and published updates")
    attribution_window_ms: int = Field(300_000, ge=1, description="how long after serving a post its engagements count (event time)")
    returned_is_viewed: bool = Field(False, description="treat every returned post as viewed (backends that cannot report views)")
    downsample_rate: float = Field(1.0, gt=0, le=1, description="online negative downsampling rate w for all-negative examples (1 = off)")
    max_candidates: int = Field(1000, ge=1, description="more candidates than this → RESOURCE_EXHAUSTED")
    max_string_len: int = Field(256, ge=1, description="longest id / name / device string accepted")
    max_seen: int = Field(10_000, ge=0, description="most seen_post_ids accepted")
    default_limit: int = Field(50, ge=1, description="posts returned when the request's limit is 0")
    # The learner runs on event time: a record from further ahead than its allowed lateness (5 s) moves its
    # clock forward and closes other impressions' attribution windows early.
    max_future_ms: int = Field(5_000, ge=0, description="context.time_ms and event ts_ms may be at most this far ahead of the server's clock")
    max_events: int = Field(10_000, ge=1, description="more events than this in one LogEvents call → RESOURCE_EXHAUSTED")
    unknown_features: Literal["ignore", "reject"] = Field(
        "ignore", description="feature names the bundle does not know: ignore (and list them) or reject")
    author_penalty_mult: float = Field(0.8, description="score factor for a post by the same author as the one above")
    author_penalty_add: float = Field(0.0, description="score subtracted for a post by the same author as the one above")
    media_penalty_mult: float = Field(0.95, description="score factor for a post of the same media type as the one above")
    media_penalty_add: float = Field(0.0, description="score subtracted for the same media type as the post above")
    freshness_boost: float = Field(0.0, description="added score × 2^(-age / half-life) (0 = off)")
    freshness_half_life_h: float = Field(6.0, gt=0, description="half-life in hours of the freshness boost")
    explain_top_k: int = Field(10, ge=0, description="contributions returned per post when explain is set")
    idempotency_cache: int = Field(2048, ge=0, description="recent responses kept by request id (LRU)")
    eventlog_dir: Path | None = Field(Path("runs/eventlog"), description="local event log (served records + events); off (None) = none")
    eventlog_fsync: bool = Field(True, description="fsync every event-log batch")
    eventlog_retention_h: float = Field(168.0, ge=0, description="delete event-log segments last written longer ago than this, never one the embedded learner still has to read (0 = keep everything)")
    served_batch: int = Field(1024, ge=1, description="served records per event-log append")
    served_flush_ms: float = Field(50.0, ge=0, description="longest a served record waits before being appended")
    served_queue: int = Field(200_000, ge=1, description="served records buffered before new ones are dropped (counted)")
    dedup_window: int = Field(1_000_000, ge=0, description="recent event ids remembered to answer DUPLICATE")
    admin_token: SecretStr | None = Field(None, description="bearer token for Reload/Snapshot (unset = admin disabled)")
    online_metrics_file: Path | None = Field(None, description="JSON the online learner writes; Info returns it as online_metrics")
    snapshot_dir: Path = Field(Path("runs/snapshots"), description="where Snapshot writes bundles")
    tls_cert: Path | None = Field(None, description="PEM certificate chain (with tls_key: serve TLS)")
    tls_key: Path | None = Field(None, description="PEM private key")
    metrics_port: int | None = Field(None, description="Prometheus HTTP port (worker i uses port + i); None = off")
    control_dir: Path | None = Field(None, description="set by `--workers N`: where a Reload is broadcast to sibling workers")
    drain_delay_s: float = Field(0.0, ge=0, description="on SIGTERM, seconds to keep serving while health says NOT_SERVING, so balancers stop sending first (then grace_s)")
    grace_s: float = Field(5.0, ge=0, description="seconds in-flight RPCs get to finish on SIGTERM")
    log_level: str = Field("INFO", description="Python logging level")

    @field_validator("eventlog_dir", mode="before")
    @classmethod
    def _eventlog_off(cls, value):
        """``off`` (or ``none``, ``null``) turns the event log off; an empty path is refused rather than
        taken for the working directory."""
        if value is False:                    # YAML reads a bare off as false
            return None
        if isinstance(value, str):
            if value.strip().lower() in ("off", "none", "null"):
                return None
            if not value.strip():
                raise ValueError("empty: give a directory, or off to serve without an event log (and learner)")
        return value

    @model_validator(mode="after")
    def _derived_paths(self) -> "ServingSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both to serve TLS, or neither")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535 - self.workers + 1:
            raise ValueError(f"metrics_port {self.metrics_port}: worker i uses metrics_port + i, which must be a TCP port")
        learning = self.learner and self.eventlog_dir is not None
        if self.updates_dir is None:
            default = self.model_dir or (self.learner_state_dir / "published" if learning else None)
            object.__setattr__(self, "updates_dir", default)
        if self.online_metrics_file is None and learning:
            object.__setattr__(self, "online_metrics_file", self.learner_state_dir / "status.json")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, *_FILE_SOURCES


_FILE_SOURCES: list[PydanticBaseSettingsSource] = []


def load_settings(config_file: str | Path | None = None, **overrides) -> ServingSettings:
    """Settings from defaults ← file ← ``FEEDRANK_*`` env ← ``overrides`` (None values skipped)."""
    from pydantic_settings import JsonConfigSettingsSource, TomlConfigSettingsSource, YamlConfigSettingsSource

    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_environment(overrides)
    _FILE_SOURCES.clear()
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"settings file {path} does not exist")
        source = {".toml": TomlConfigSettingsSource, ".json": JsonConfigSettingsSource,
                  ".yaml": YamlConfigSettingsSource, ".yml": YamlConfigSettingsSource}.get(path.suffix)
        if source is None:
            raise ValueError(f"settings file {path}: use .toml, .json or .yaml")
        _FILE_SOURCES.append(source(ServingSettings, path))
    try:
        return ServingSettings(**overrides)
    finally:
        _FILE_SOURCES.clear()


# FEEDRANK_* variables that are not settings: the CLI's traceback switch, the tests' own, and the service
# links Kubernetes puts in every pod of a namespace with a Service named feedrank.
_OTHER_VARIABLES = re.compile(r"FEEDRANK_(DEBUG|TEST_.*|SERVICE_HOST|SERVICE_PORT(_.*)?|PORT_\d+_(TCP|UDP|SCTP)(_.*)?)")


def _check_environment(overrides: dict) -> None:
    """A misspelt ``FEEDRANK_*`` variable is refused, as a misspelt key in the settings file is, rather
    than silently leaving the default in force."""
    import difflib
    import os

    known = {f"FEEDRANK_{name.upper()}" for name in ServingSettings.model_fields}
    for var in sorted(os.environ):
        name = var.upper()
        if not name.startswith("FEEDRANK_") or _OTHER_VARIABLES.fullmatch(name):
            continue
        if name == "FEEDRANK_PORT" and "://" in os.environ[var] and "port" not in overrides:
            raise ValueError(f"environment variable {var}={os.environ[var]} is not a port: it is the service link "
                             f"Kubernetes sets for a Service named feedrank. Give the port with --port, or set "
                             f"enableServiceLinks: false in the pod spec")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise ValueError(f"environment variable {var} is not a setting"
                             + (f" (did you mean {close[0]}?)" if close else "")
                             + "; the settings are the fields of serving.settings.ServingSettings, as FEEDRANK_<FIELD>")
