"""Bundles: a versioned directory holding every frozen part of a stack and a manifest describing it.

Layout::

    manifest.json        format version, bundle id, feature spec, tasks, EV weights, VW settings,
                         training window and metrics, the SHA-256 and size of every file below,
                         and the SHA-256 of its own contents (manifest_sha256)
    gbdt.ubj             XGBoost model (leaf extractor)
    dnn.npz              frozen multi-task MLP (scaler + layers)
    lr_weights.npz       numpy copy of every task's non-zero VW weights (the serving path)
    vw/lr.model          the resumable VW model of every task's LR (the online learner continues from it)

Loading verifies sizes and checksums and refuses a tampered, truncated or mismatched bundle with a
message naming the file, and a manifest whose fields the server could not use (a default that is not a
number, tasks listed twice) naming the field.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .metrics import json_safe

# 3: every task's LR in one VW workspace (task tokens, a shared token, rows of 8 slots; see
# stacker.vwstack). Versions 1 and 2 held one VW model per task and are refused.
# 4: dnn.npz also holds each input's training range (lo, hi), which the network clips its inputs to; a
# server that predates it refuses the bundle rather than score it unclipped. Version 3 still loads.
# 5: the manifest holds its own checksum (MANIFEST_SHA256), so an edited manifest (tasks swapped, EV
# weights changed) is refused like a changed model file. Versions 3 and 4 still load unchecked.
FORMAT_VERSION = 5
SUPPORTED_VERSIONS = (3, 4, 5)
VW_MODEL = "vw/lr.model"
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"
log = logging.getLogger(__name__)


class BundleError(Exception):
    """A bundle that cannot be used: missing, tampered, truncated or inconsistent."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_bundle_id(prefix: str = "b") -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{prefix}{stamp}-{os.urandom(3).hex()}"


def save_sparse_weights(path: Path, weights: np.ndarray) -> None:
    rows = np.flatnonzero(np.any(weights != 0, axis=1))
    with open(path, "wb") as f:
        np.savez(f, rows=rows.astype(np.int64), values=weights[rows], size=np.int64(len(weights)))


def load_sparse_weights(path: Path) -> np.ndarray:
    with np.load(path) as z:
        out = np.zeros((int(z["size"]), z["values"].shape[1]), dtype=np.float32)
        out[z["rows"]] = z["values"]
    return out


def finalize(directory: Path, manifest: dict) -> Path:
    """Checksum every file in ``directory`` into the manifest and write it last (atomically)."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    # Checksummed as it will read back (JSON keys are strings), then written with the checksum.
    manifest = json.loads(json.dumps(json_safe(dict(manifest, format_version=FORMAT_VERSION, files=files)),
                                     allow_nan=False))
    manifest[MANIFEST_SHA256] = manifest_digest(manifest)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
    os.replace(tmp, directory / MANIFEST)
    return directory


def read_manifest(directory) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"{directory}: not a bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing manifest")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise BundleError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                          f"one of the supported {SUPPORTED_VERSIONS} (bundles before version 3 hold one "
                          f"VW model per task; retrain them with feedrank train)")
    # Manifests of format 5 on carry their own checksum, and one that carries it is checked whatever
    # format it now claims (a version lowered by hand does not skip the check).
    if manifest["format_version"] >= 5 or MANIFEST_SHA256 in manifest:
        recorded = manifest.get(MANIFEST_SHA256)
        if not isinstance(recorded, str):
            raise BundleError(f"{path}: lists no {MANIFEST_SHA256} (format_version {manifest['format_version']} "
                              "manifests carry their own checksum)")
        try:
            digest = manifest_digest(manifest)
        except (ValueError, TypeError, RecursionError) as e:   # NaN or Infinity: JSON's parser takes them
            raise BundleError(f"{path}: manifest holds a value strict JSON has not ({e})") from None
        if recorded != digest:
            raise BundleError(f"{path}: checksum mismatch (the manifest was edited after the bundle was made; "
                              f"its {MANIFEST_SHA256} no longer matches its contents)")
    problem = manifest_problem(manifest)
    if problem:
        raise BundleError(f"{path}: {problem}")
    return manifest


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _names(x, empty_ok: bool = True) -> bool:
    return isinstance(x, list) and all(isinstance(n, str) and n for n in x) and len(set(x)) == len(x) \
        and (empty_ok or bool(x))


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the fields a server, learner or export reads from a manifest (None when
    nothing is): a manifest another tool wrote, or one of a format before its own checksum, edited by
    hand, is refused when read instead of failing on a request."""
    from .dataset import PLAUSIBLE_MS
    from .vwstack import VWConfig

    def section(name):
        value = manifest.get(name)
        return value if isinstance(value, dict) else None

    if not isinstance(manifest.get("bundle_id"), str) or not manifest["bundle_id"]:
        return f"bundle_id {manifest.get('bundle_id')!r} is not a non-empty string"
    created = manifest.get("created_at", 0)
    if not _integer(created) or created < 0 or (created and not PLAUSIBLE_MS[0] <= created < PLAUSIBLE_MS[1]):
        return f"created_at {created!r} is not milliseconds since the epoch between 1990 and 2100"
    tasks = manifest.get("tasks")
    if not _names(tasks, empty_ok=False):
        return f"tasks {tasks!r} is not a non-empty list of distinct task names"
    ev = section("ev_weights")
    if ev is None or not all(_number(v) for v in ev.values()):
        return f"ev_weights {manifest.get('ev_weights')!r} is not an object of finite numbers"
    spec = section("feature_spec")
    if spec is None:
        return "feature_spec is missing or not an object"
    for key in ("user_features", "post_features", "media_types", "devices", "surfaces"):
        if not _names(spec.get(key), empty_ok=key.endswith("_features")):
            return f"feature_spec.{key} {spec.get(key)!r} is not a list of distinct names"
    defaults = spec.get("defaults")
    if not isinstance(defaults, dict):
        return f"feature_spec.defaults {defaults!r} is not an object"
    for name, value in defaults.items():
        if not _number(value):
            return f"feature_spec.defaults[{name!r}] is {value!r}, not a finite number"
    gbdt = section("gbdt")
    for key in ("depth", "trees"):
        value = None if gbdt is None else gbdt.get(key)
        if not _integer(value) or value < 1:
            return f"gbdt.{key} {value!r} is not a positive integer"
    vw = section("vw")
    if vw is None:
        return "vw is missing or not an object"
    bits = vw.get("bits")
    if not _integer(bits) or not 4 <= bits <= 30:
        return f"vw.bits {bits!r} is not an integer between 4 and 30"
    hashes = vw.get("namespace_hashes")
    if not isinstance(hashes, dict) or not all(map(_integer, hashes.values())):
        return f"vw.namespace_hashes {hashes!r} is not an object of integers"
    try:
        VWConfig.from_dict(vw)
    except KeyError as e:
        return f"vw lacks {e}"
    except (TypeError, ValueError, AttributeError) as e:
        return f"vw settings are not valid ({e})"
    if not isinstance(manifest.get("files"), dict):
        return "files is missing or not an object"
    return None


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's contents but its own checksum, as compact JSON with sorted keys."""
    rest = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode()).hexdigest()


_warned: set = set()


def bundle_age(directory, manifest: dict) -> tuple:
    """What orders bundles from oldest to newest: the manifest's ``created_at``, then the directory's
    modification time."""
    return (int(manifest.get("created_at", 0)), Path(directory).stat().st_mtime)


def candidate_bundles(model_dir, refused: list | None = None) -> list[Path]:
    """Bundle directories under ``model_dir`` (those with a readable manifest), newest first
    (:func:`dated_bundles`)."""
    return [p for _, p in dated_bundles(model_dir, refused)]


def dated_bundles(model_dir, refused: list | None = None) -> list[tuple[tuple, Path]]:
    """Bundle directories under ``model_dir`` (those with a readable manifest) with their
    :func:`bundle_age`, newest first. A directory whose manifest is there but refused is left out, logged
    once per state of the manifest and added to ``refused`` (its error) if given."""
    found = []
    for p in Path(model_dir).iterdir() if Path(model_dir).is_dir() else []:
        if p.is_dir() and not p.name.endswith(".partial"):
            try:
                found.append((bundle_age(p, read_manifest(p)), p))
            except BundleError as e:
                if not (p / MANIFEST).is_file():
                    continue                      # not a bundle: another directory beside them
                if refused is not None:
                    refused.append(e)
                try:
                    state = (str(p), (p / MANIFEST).stat().st_mtime_ns)
                except OSError:
                    continue
                if state not in _warned:
                    _warned.add(state)
                    log.warning("skipping %s: %s", p, e)
    return sorted(found, reverse=True)


def verify(directory) -> dict:
    """Return the manifest once every listed file exists with the recorded size and checksum."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("bytes"), int)
                                              and isinstance(m.get("sha256"), str) for m in files.values()):
        raise BundleError(f"{directory / MANIFEST}: 'files' must map each file to its bytes and sha256")
    for required in ("gbdt.ubj", "dnn.npz", "lr_weights.npz"):
        if required not in files:
            raise BundleError(f"{directory / MANIFEST}: lists no {required}")
    if VW_MODEL not in files:
        raise BundleError(f"{directory / MANIFEST}: lists no {VW_MODEL}")
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{path}: truncated or resized ({size} bytes, manifest says {meta['bytes']})")
        if sha256_file(path) != meta["sha256"]:
            raise BundleError(f"{path}: checksum mismatch (file was modified after the bundle was made)")
    return manifest


PIN_FILE = "PINNED"


def files_state(path: Path) -> tuple:
    """Every file under a bundle directory with its size and mtime (empty if the directory is gone)."""
    try:
        return tuple(sorted((str(p.relative_to(path)), st.st_size, st.st_mtime_ns)
                            for p in Path(path).rglob("*") if (st := p.stat()) and p.is_file()))
    except (OSError, ValueError):   # gone, or not a path the system takes
        return ()


def pinned_bundle(model_dir) -> Path | None:
    """The bundle a model directory is pinned to: the directory in it named by its ``PINNED`` file (written
    by ``feedrank pin``), which every server watching the directory serves, after a restart too, in place
    of the newest; None without a pin. Raises :class:`BundleError` for a pin that names no directory in it."""
    pin = Path(model_dir) / PIN_FILE
    try:
        name = pin.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{pin}: unreadable ({e})") from e
    if not name or "/" in name or name in (".", ".."):
        raise BundleError(f"{pin}: must hold the name of a bundle directory in {model_dir}, got {name!r}")
    target = Path(model_dir) / name
    if not target.is_dir():
        raise BundleError(f"{pin}: names {name!r}, which is not a directory in {model_dir}")
    return target


def write_pin(model_dir, bundle: Path | None) -> None:
    """Pin ``model_dir`` to ``bundle`` (a directory in it), atomically; None removes the pin."""
    pin = Path(model_dir) / PIN_FILE
    if bundle is None:
        pin.unlink(missing_ok=True)
        return
    tmp = pin.with_name(f".{PIN_FILE}.tmp")
    with open(tmp, "w") as f:
        f.write(Path(bundle).name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pin)


def served_bundle(model_dir, checked: dict | None = None) -> Path | None:
    """The bundle servers watching ``model_dir`` serve once settled: its pin (:func:`pinned_bundle`; a bad
    pin, or a pinned bundle that does not check out, counts as none), else its newest bundle whose files
    check out (:func:`verify`; servers refuse the others). ``checked`` caches each bundle's check by the state of its files, for a caller asking often."""
    try:
        pin = pinned_bundle(model_dir)
    except BundleError:
        pin = None
    # A pinned bundle that does not check out is passed over, as a starting server passes it over.
    for p in ([pin] if pin is not None else []) + candidate_bundles(model_dir):
        state = files_state(p)
        ok = checked.get(p) if checked is not None else None
        if ok is None or ok[0] != state:
            try:
                verify(p)
                ok = (state, True)
            except (BundleError, OSError):
                ok = (state, False)
            if checked is not None:
                checked[p] = ok
        if ok[1]:
            return p
    return None


STALE_STAGING_S = 3600.0


def staging_dir(dst) -> Path:
    """A new, empty directory beside ``dst`` to build it in and rename into place: hidden, named
    ``….partial`` (model-directory scans skip it) and unique, so it never takes anyone's files."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    mine = re.compile(rf"\.{re.escape(dst.name)}\.[a-z0-9_]{{8}}\.partial")    # what mkdtemp below makes
    for old in dst.parent.iterdir():      # left by a writer of this bundle killed over an hour ago
        try:
            if mine.fullmatch(old.name) and time.time() - old.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    tmp.chmod(0o777 & ~_umask())    # as mkdir would (mkdtemp makes it 0700)
    return tmp


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def copy_bundle(src, dst) -> Path:
    dst = Path(dst)
    tmp = staging_dir(dst)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
