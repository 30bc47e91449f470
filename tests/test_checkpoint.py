"""Checkpoints: atomic write, LATEST pointer, retention, leftover temp dirs, corruption refused."""
from __future__ import annotations

import json

import pytest

from online.checkpoint import LATEST, MANIFEST, CheckpointError, load_latest, write_checkpoint


def test_empty_root_has_no_checkpoint(tmp_path):
    assert load_latest(tmp_path) is None


def test_round_trip_latest_pointer_and_retention(tmp_path):
    for i in range(5):
        p = write_checkpoint(tmp_path, {"learned_through": i, "oldest_open_offset": None},
                             {"click.vw": bytes([i]) * 10, "like.vw": lambda path, i=i: path.write_text(f"m{i}")},
                             keep=2)
    assert p.name == "ckpt-0000000005"
    assert (tmp_path / LATEST).read_text().strip() == p.name
    state, d = load_latest(tmp_path)
    assert d == p and state == {"learned_through": 4, "oldest_open_offset": None}
    assert (d / "like.vw").read_text() == "m4"
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("ckpt-")) == [
        "ckpt-0000000004", "ckpt-0000000005"]
    assert json.loads((d / MANIFEST).read_text())["format_version"] == 1


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path):
    write_checkpoint(tmp_path, {"seq": 1}, {"a": b"1"})
    crashed = tmp_path / ".tmp-ckpt-dead"
    crashed.mkdir()
    (crashed / "a").write_bytes(b"half")
    assert load_latest(tmp_path)[0] == {"seq": 1}
    write_checkpoint(tmp_path, {"seq": 2}, {"a": b"2"})
    assert not crashed.exists() and load_latest(tmp_path)[0] == {"seq": 2}


def test_missing_pointer_falls_back_to_newest_complete_dir(tmp_path):
    write_checkpoint(tmp_path, {"n": 1}, {})
    write_checkpoint(tmp_path, {"n": 2}, {})
    (tmp_path / LATEST).unlink()
    assert load_latest(tmp_path)[0] == {"n": 2}


def test_corrupted_file_is_refused_naming_it(tmp_path):
    p = write_checkpoint(tmp_path, {}, {"click.vw": b"weights", "like.vw": b"other"})
    (p / "like.vw").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match=r"like\.vw: checksum mismatch"):
        load_latest(tmp_path)
    (p / "like.vw").unlink()
    with pytest.raises(CheckpointError, match=r"like\.vw: missing"):
        load_latest(tmp_path)


def test_wrong_format_version_is_refused(tmp_path):
    p = write_checkpoint(tmp_path, {}, {})
    m = json.loads((p / MANIFEST).read_text())
    m["format_version"] = 99
    (p / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_latest(tmp_path)


def test_doctests():
    import doctest

    import online.checkpoint

    assert doctest.testmod(online.checkpoint).failed == 0
