"""Reading and writing the offline-training table (stacker/schema.py) as Parquet or JSON Lines."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import (CONTEXT_COLUMNS, FEATURE_PREFIX, KEY_COLUMNS, LABEL_PREFIX, MEDIA_TYPES, SCHEMA_VERSION,
                     TRUE_PREFIX, tasks_in)

META_KEY = b"feedrank.schema_version"



def _suffix(path) -> str:
    s = Path(path).suffix.lower()
    if s not in (".parquet", ".jsonl"):
        raise ValueError(f"{path}: unknown table format {s!r} (use .parquet or .jsonl)")
    return s


# Timestamps are int64 milliseconds since the epoch, UTC: anything outside 1990..2100 is another unit.
PLAUSIBLE_MS = (631_152_000_000, 4_102_444_800_000)
_ID_COLUMNS = ("request_id", "user_id", "post_id", "author_id")
_MAX_POSITION = 2**31 - 1


class TableError(ValueError):
    """A column of an impression table that cannot be read as the schema says (names the column)."""

    def __init__(self, message: str, what: str = "", problem: str = "", count: int = 0, total: int = 0,
                 first: int | None = None, value=None):
        super().__init__(message)
        self.what, self.problem, self.count, self.total, self.first, self.value = \
            what, problem, count, total, first, value


def _fix_dtypes(df: pd.DataFrame, where: str = "", row0: int = 0) -> pd.DataFrame:
    """Check every known column and convert it to the schema's type, or raise :class:`TableError`
    naming the column, how many rows are wrong and the first of them (``row0``: the table's row number
    of ``df``'s first, for a chunk)."""
    try:
        return _fix_columns(df, f"{where}: " if where else "")
    except TableError as e:
        if not row0 or e.first is None:
            raise
        raise TableError(f"{e.what}: {e.problem} in {e.count:,} of the {e.total:,} rows from row {row0:,} "
                         f"(row {row0 + e.first:,}: {e.value!r})", e.what, e.problem) from None


def _fix_columns(df: pd.DataFrame, where: str) -> pd.DataFrame:
    for col in df.columns:
        if col in ("ts", "created_at"):
            df[col] = _timestamps(df[col], where + col, zero_ok=col == "created_at")  # as on the wire
        elif col == "position":
            pos = _numbers(df[col], where + col, integer=True)
            _refuse(where + col, (pos < 0) | (pos > _MAX_POSITION), df[col],
                    "negative or past 2**31 - 1 (0 is the top)")
            df[col] = pos.astype(np.int32)
        elif col in _ID_COLUMNS:
            ids = _strings(df[col], where + col, nulls=False)
            _refuse(where + col, (ids == "").to_numpy(), df[col], "empty (an id is a non-empty string)")
            df[col] = ids
        elif col == "media_type":
            media = _strings(df[col], where + col, nulls=False).str.lower()
            _refuse(where + col, ~media.isin(MEDIA_TYPES).to_numpy(), df[col],
                    f"not one of {', '.join(MEDIA_TYPES)}")
            df[col] = media
        elif col in CONTEXT_COLUMNS:
            df[col] = _strings(df[col], where + col, nulls=True)   # absent context: "", as on the wire
        elif col.startswith(FEATURE_PREFIX) or col.startswith(TRUE_PREFIX):
            with np.errstate(over="ignore"):    # past float32's range: inf, refused just below
                x = _numbers(df[col], where + col).astype(np.float32)
            _refuse(where + col, np.isinf(x), df[col], "infinite or past float32's range (a missing value is NaN "
                    "or absent)")
            df[col] = x
        elif col.startswith(LABEL_PREFIX):
            y = _numbers(df[col], where + col, integer=True)
            _refuse(where + col, (y != 0) & (y != 1), df[col], "not 0 or 1 (or a boolean)")
            df[col] = y.astype(np.int8)
    return df


def _refuse(what: str, bad: np.ndarray, raw: pd.Series, problem: str) -> None:
    bad = np.asarray(bad, bool)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        value = raw.iloc[first]
        value = value.item() if isinstance(value, np.generic) else value
        raise TableError(f"{what}: {problem} in {int(bad.sum()):,} of {len(bad):,} rows (row {first:,}: {value!r})",
                         what, problem, int(bad.sum()), len(bad), first, value)


def _numbers(col: pd.Series, what: str, integer: bool = False) -> np.ndarray:
    """float64 values of a numeric, boolean or numeric-string column (NaN where missing)."""
    if pd.api.types.is_bool_dtype(col):
        col = col.astype("float64")
    if pd.api.types.is_datetime64_any_dtype(col) or isinstance(col.dtype, pd.PeriodDtype):
        raise TableError(f"{what}: dates are not numbers ({col.dtype})")
    if col.dtype == object:   # JSON booleans and mixed cells
        col = col.map(lambda v: float(v) if isinstance(v, bool) else v)
    x = pd.to_numeric(col, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    _refuse(what, np.isnan(x) & col.notna().to_numpy(), col, "not a number")
    if integer:
        _refuse(what, np.isnan(x), col, "missing")
        _refuse(what, x != np.round(x), col, "not a whole number")
    return x


def _timestamps(col: pd.Series, what: str, zero_ok: bool = False) -> np.ndarray:
    """int64 milliseconds since the epoch, UTC, from integers or datetimes; ``zero_ok``: 0 (unknown) too."""
    if pd.api.types.is_datetime64_any_dtype(col):    # timezone-aware in any zone, or naive as UTC
        _refuse(what, col.isna().to_numpy(), col, "missing")
        if getattr(col.dt, "tz", None) is not None:
            col = col.dt.tz_convert("UTC").dt.tz_localize(None)
        x = col.to_numpy("datetime64[ms]").astype(np.int64)
    else:
        x = _numbers(col, what, integer=True)
    bad = implausible_ms(x, zero_ok)
    if bad.any():
        _refuse(what, bad, col, f"outside 1990-2100 as milliseconds since the epoch"
                                f"{unit_hint(float(np.median(x[bad])), plural=True)}")
    return x.astype(np.int64)


def implausible_ms(x, zero_ok: bool = False):
    """Where ``x`` is no time between 1990 and 2100 in milliseconds since the epoch (``zero_ok``: 0,
    unknown, is fine), elementwise."""
    x = np.asarray(x)
    lo, hi = PLAUSIBLE_MS
    bad = (x < lo) | (x >= hi)
    return bad & (x != 0) if zero_ok else bad


def not_a_time(ms: int) -> str:
    """Why a single time ``ms`` is refused: no time between 1990 and 2100 in milliseconds, and what it looks
    like instead (:func:`unit_hint`)."""
    return f"{ms} is not a time between 1990 and 2100 in milliseconds since the epoch{unit_hint(ms)}"


def unit_hint(ms: float, plural: bool = False) -> str:
    """What a time that is not plausible milliseconds since the epoch looks like instead, if anything."""
    it = "they look" if plural else "it looks"
    ms = abs(float(ms))
    return (f" ({it} like seconds: multiply by 1,000)" if 1e8 <= ms < 1e10 else
            f" ({it} like microseconds: divide by 1,000)" if 1e14 <= ms < 1e17 else
            f" ({it} like nanoseconds: divide by 1,000,000)" if ms >= 1e17 else "")


def _strings(col: pd.Series, what: str, nulls: bool) -> pd.Series:
    """Strings; whole-number floats (integer ids read with a gap) without their ".0"."""
    missing = col.isna().to_numpy()
    if missing.any() and not nulls:
        _refuse(what, missing, col, "missing")
    kind = pd.api.types.infer_dtype(col, skipna=True)
    if kind == "string" and not missing.any():
        return col if pd.api.types.is_string_dtype(col.dtype) and col.dtype != object else col.astype(str)
    if kind not in ("string", "integer", "empty", "boolean"):
        # Integer ids read through a float column (a gap made it float) lose their ".0", value by value;
        # any other float is no id. Lists, dicts and the like are not strings.
        def odd(v):
            if isinstance(v, (float, np.floating)):
                return not (v != v or (float(v).is_integer() and abs(v) < 2**53))
            return isinstance(v, (list, dict, tuple, set, np.ndarray))
        _refuse(what, col.map(odd).to_numpy(bool), col, "not a string or a whole number below 2**53")
        col = col.map(lambda v: str(int(v)) if isinstance(v, (float, np.floating)) and v == v else v)
    out = col.astype(object).where(~missing, "").astype(str)
    return out


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
                         f"(an impression table has {', '.join(c for c in KEY_COLUMNS if c != 'position')}, "
                         "position where it was logged, f.* features and label.* tasks)")
    if not tasks_in(df.columns):
        raise ValueError(f"{path}: no label.<task> column, so nothing to learn")
    return df


def write_table(df: pd.DataFrame, path) -> None:
    """Write an impression table: Parquet (schema version in the key-value metadata) or JSON Lines
    (a ``schema_version`` field in every row), chosen by the suffix."""
    writer = TableWriter(path)
    try:
        writer.write(df)
        writer.commit()
    finally:
        writer.close()


class TableWriter:
    """Write an impression table chunk by chunk (:func:`write_table` is one chunk), so a long export
    never holds the whole table. Every chunk must have the first chunk's columns. The chunks go to a
    hidden ``.NAME.partial`` file beside ``path``, which :meth:`commit` renames into place: a reader
    never sees half a table, and a table already at ``path`` stays whole until then. :meth:`close`
    without :meth:`commit` discards what was written."""

    def __init__(self, path, name: str | None = None):
        """``name``: what error messages call the table (default ``path``)."""
        self.path = Path(path)
        self.name = name or str(self.path)
        self.suffix = _suffix(self.path)
        self._partial = self.path.with_name(f".{self.path.stem}.partial{self.suffix}")
        self.rows = 0
        self._parquet = None
        self._schema = None
        self._jsonl = None

    def write(self, df: pd.DataFrame) -> None:
        if "schema_version" in df.columns:   # a table read back as plain JSON Lines (pandas.read_json)
            found = set(df["schema_version"].astype(str).unique())
            if found - {str(SCHEMA_VERSION)}:
                raise ValueError(f"{self.name}: the table's schema_version column holds "
                                 f"{', '.join(sorted(found - {str(SCHEMA_VERSION)})[:3])}, but this feedrank "
                                 f"writes version {SCHEMA_VERSION}; convert the table, or drop the column")
            df = df.drop(columns=["schema_version"])
        if self.rows == 0 and self._schema is None and self._jsonl is None:
            _check_columns(self.name, df)    # refused now, not when the table is read back
        df = _fix_dtypes(df.copy(), self.name, self.rows)
        if self.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._parquet is None:
                meta = dict(table.schema.metadata or {})
                meta[META_KEY] = str(SCHEMA_VERSION).encode()
                self._schema = table.schema.with_metadata(meta)
                self._parquet = self._opened(lambda: pq.ParquetWriter(self._partial, self._schema))
            elif table.schema.names != self._schema.names:
                raise ValueError(f"{self.name}: a chunk's columns differ from the first chunk's")
            self._parquet.write_table(table.cast(self._schema))
        else:
            if self._jsonl is None:
                self._jsonl = self._opened(lambda: open(self._partial, "w"))
                self._columns = list(df.columns)
            elif list(df.columns) != self._columns:
                raise ValueError(f"{self.name}: a chunk's columns differ from the first chunk's")
            if len(df):
                df.insert(0, "schema_version", SCHEMA_VERSION)
                text = df.to_json(orient="records", lines=True, double_precision=15)
                self._jsonl.write(text if text.endswith("\n") else text + "\n")
        self.rows += len(df)

    def _opened(self, make):
        """``make()``, the file beside ``path`` the chunks go to; a failure names ``path``, not that file."""
        try:
            return make()
        except OSError as e:
            raise OSError(e.errno, f"cannot write a table there ({e.strerror or e})", str(self.path)) from e

    def commit(self) -> None:
        """Finish the table and put it at ``path`` (after at least one :meth:`write`)."""
        self._close_file()
        os.replace(self._partial, self.path)

    def close(self) -> None:
        """Discard what was written unless :meth:`commit` put it in place (call it in any case)."""
        self._close_file()
        self._partial.unlink(missing_ok=True)

    def _close_file(self) -> None:
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
            names = pq.read_schema(path).names
            twice = sorted({n for n in names if names.count(n) > 1})
            table = None if twice else pq.read_table(path)
        except Exception as e:  # pyarrow's own errors: not Parquet, truncated, ...
            raise ValueError(f"{path}: not a readable Parquet file ({_first_line(e)}){_sniff(path)}") from None
        if twice:
            raise ValueError(f"{path}: {'columns' if len(twice) > 1 else 'column'} {', '.join(twice)} "
                             f"appear{'' if len(twice) > 1 else 's'} more than once")
        meta = table.schema.metadata or {}
        found = meta.get(META_KEY)
        if found is None:
            raise _version_error(path, None)
        if found.decode() != str(SCHEMA_VERSION):
            raise _version_error(path, found.decode())
        return _check_columns(path, _fix_dtypes(table.to_pandas(), str(path)))
    sniffed = _sniff(path)
    if sniffed:
        raise ValueError(f"{path}: not JSON Lines{sniffed}")
    try:
        df = pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON Lines ({e}){_bad_line(path)}") from None
    if df.empty:
        raise ValueError(f"{path}: no rows")
    if "schema_version" not in df.columns:
        bad_line = _bad_line(path)
        raise ValueError(f"{path}: not an impression table{bad_line}") if bad_line else _version_error(path, None)
    versions = df["schema_version"]
    if versions.isna().any():
        first = int(np.flatnonzero(versions.isna().to_numpy())[0])
        raise ValueError(f"{path}: {int(versions.isna().sum()):,} rows have no schema_version field (the first: "
                         f"row {first:,}, line {_line_of_row(path, first):,}); write the table with "
                         "stacker.dataset.write_table")
    bad = versions[versions.astype(str) != str(SCHEMA_VERSION)]
    if len(bad):
        raise _version_error(path, bad.iloc[0])
    try:
        return _check_columns(path, _fix_dtypes(df.drop(columns=["schema_version"]), str(path)))
    except TableError as e:
        if e.first is None:
            raise
        raise TableError(f"{e} (line {_line_of_row(path, e.first):,} of the file)", e.what, e.problem, e.count,
                         e.total, e.first, e.value) from None


def _line_of_row(path: Path, row: int) -> int:
    """The 1-based line of a JSON Lines file holding its ``row``-th record (rows count from 0; blank lines
    hold none)."""
    seen = -1
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return number
    return row + 1


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


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _sniff(path) -> str:
    """A hint when a file's first bytes say it is another format than its suffix."""
    with open(path, "rb") as f:
        head = f.read(4)
    suffix = Path(path).suffix.lower()
    if head[:2] == b"\x1f\x8b":
        return "; it is gzip-compressed: decompress it first"
    if head == b"PAR1" and suffix != ".parquet":
        return "; it is a Parquet file: name it .parquet"
    if head[:1] in (b"{", b"[") and suffix != ".jsonl":
        return "; it looks like JSON: name it .jsonl"
    return ""
