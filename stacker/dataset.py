"""Reading and writing the offline-training table (stacker/schema.py) as Parquet or JSON Lines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .schema import FEATURE_PREFIX, KEY_COLUMNS, LABEL_PREFIX, SCHEMA_VERSION, TRUE_PREFIX, tasks_in

META_KEY = b"feedrank.schema_version"

_DTYPES = {"ts": "int64", "created_at": "int64", "position": "int32"}
_STRINGS = ("request_id", "user_id", "post_id", "author_id", "media_type", "ctx.device", "ctx.surface")


def _suffix(path) -> str:
    s = Path(path).suffix.lower()
    if s not in (".parquet", ".jsonl"):
        raise ValueError(f"{path}: unknown table format {s!r} (use .parquet or .jsonl)")
    return s


def _fix_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    for col in df.columns:
        if col in _DTYPES:
            df[col] = df[col].astype(_DTYPES[col])
        elif col in _STRINGS:
            df[col] = df[col].astype(str)
        elif col.startswith(FEATURE_PREFIX) or col.startswith(TRUE_PREFIX):
            df[col] = df[col].astype(np.float32)
        elif col.startswith(LABEL_PREFIX):
            df[col] = df[col].astype(np.int8)
    return df


def _version_error(path, found) -> ValueError:
    how = ("; a table of your own: write it with stacker.dataset.write_table(df, path), which records the "
           "version (Parquet metadata feedrank.schema_version, or a schema_version field on every JSON line)"
           if found is None else "; regenerate or convert the table")
    if found is not None and not isinstance(found, str):
        found = found.item() if hasattr(found, "item") else found
    return ValueError(f"{path}: table schema version {found!r}, but this feedrank reads "
                      f"feedrank.schema_version {SCHEMA_VERSION}{how}")


def _check_columns(path, df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in KEY_COLUMNS if c not in df.columns and c != "position"]  # position: optional
    if missing:
        raise ValueError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"(an impression table has {', '.join(KEY_COLUMNS)}, f.* features and label.* tasks)")
    if not tasks_in(df.columns):
        raise ValueError(f"{path}: no label.<task> column, so nothing to learn")
    return df


def write_table(df: pd.DataFrame, path) -> None:
    """Write an impression table: Parquet (schema version in the key-value metadata) or JSON Lines
    (a ``schema_version`` field in every row), chosen by the suffix."""
    writer = TableWriter(path)
    try:
        writer.write(df)
    finally:
        writer.close()


class TableWriter:
    """Write an impression table chunk by chunk (:func:`write_table` is one chunk), so a long export
    never holds the whole table. Every chunk must have the first chunk's columns."""

    def __init__(self, path):
        self.path = Path(path)
        self.suffix = _suffix(self.path)
        self.rows = 0
        self._parquet = None
        self._schema = None
        self._jsonl = None

    def write(self, df: pd.DataFrame) -> None:
        df = _fix_dtypes(df.copy())
        if self.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._parquet is None:
                meta = dict(table.schema.metadata or {})
                meta[META_KEY] = str(SCHEMA_VERSION).encode()
                self._schema = table.schema.with_metadata(meta)
                self._parquet = pq.ParquetWriter(self.path, self._schema)
            elif table.schema.names != self._schema.names:
                raise ValueError(f"{self.path}: a chunk's columns differ from the first chunk's")
            self._parquet.write_table(table.cast(self._schema))
        else:
            if self._jsonl is None:
                self._jsonl = open(self.path, "w")
                self._columns = list(df.columns)
            elif list(df.columns) != self._columns:
                raise ValueError(f"{self.path}: a chunk's columns differ from the first chunk's")
            if len(df):
                df.insert(0, "schema_version", SCHEMA_VERSION)
                text = df.to_json(orient="records", lines=True, double_precision=15)
                self._jsonl.write(text if text.endswith("\n") else text + "\n")
        self.rows += len(df)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_table(path) -> pd.DataFrame:
    """Read a table written by :func:`write_table`, refusing any other schema version."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's own errors: not Parquet, truncated, ...
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        meta = table.schema.metadata or {}
        found = meta.get(META_KEY)
        if found is None:
            raise _version_error(path, None)
        if found.decode() != str(SCHEMA_VERSION):
            raise _version_error(path, found.decode())
        return _check_columns(path, _fix_dtypes(table.to_pandas()))
    try:
        df = pd.read_json(path, lines=True, dtype=False)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON Lines ({e}){_bad_line(path)}") from None
    if "schema_version" not in df.columns:
        raise _version_error(path, None)
    bad = df["schema_version"][df["schema_version"] != SCHEMA_VERSION]
    if len(bad):
        raise _version_error(path, bad.iloc[0])
    return _check_columns(path, _fix_dtypes(df.drop(columns=["schema_version"])))


def _bad_line(path) -> str:
    """Where the first line that is not a JSON object is, for the error message."""
    import json
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return f"; line {i} is not a JSON object"
            except ValueError as e:
                return f"; line {i}: {e}"
    return ""
