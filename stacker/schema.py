"""The offline-training format: one row per impression (a post a user was shown).

The same table is written by the simulator, exported from the server's served records joined with
their events (``feedrank export``, :mod:`online.export`) and read by ``feedrank train --data``. Column
groups:

- keys and time: ``ts`` (int64 ms UTC, when the post was served), ``request_id``, ``user_id``,
  ``post_id``, ``author_id`` (strings), ``position`` (int32, 0 = top), ``media_type`` (one of
  :data:`MEDIA_TYPES`), ``created_at`` (int64 ms UTC);
- context: ``ctx.device``, ``ctx.surface`` (strings);
- named dense features: ``f.<name>`` (float32), user-level and post-level alike;
- labels: ``label.<task>`` (int8, 0/1), one per task;
- simulator ground truth: ``true.<task>`` (float32), never read by training.

Parquet files carry ``feedrank.schema_version`` in their key-value metadata; JSON Lines rows carry a
``schema_version`` field.
"""
from __future__ import annotations

SCHEMA_VERSION = 1
TASKS = ("click", "like", "comment", "share", "hide", "dwell")
MEDIA_TYPES = ("text", "photo", "video", "link")
KEY_COLUMNS = ("ts", "request_id", "user_id", "post_id", "author_id", "position", "media_type", "created_at")
CONTEXT_COLUMNS = ("ctx.device", "ctx.surface")
FEATURE_PREFIX = "f."
LABEL_PREFIX = "label."
TRUE_PREFIX = "true."


def feature_columns(columns) -> list[str]:
    return [c for c in columns if c.startswith(FEATURE_PREFIX)]


def label_column(task: str) -> str:
    return LABEL_PREFIX + task


def true_column(task: str) -> str:
    return TRUE_PREFIX + task


def tasks_in(columns) -> list[str]:
    return [c[len(LABEL_PREFIX):] for c in columns if c.startswith(LABEL_PREFIX)]
