"""Crash-safe writing (logitcache/files.py): a file or folder appears whole or not at all, and no
temporary outlives its writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from logitcache.files import TMP_SUFFIX, clear_temporaries, replace_folder, sha256_file, write_atomic, write_json_atomic


def names(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, relative to it, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_write_atomic_writes_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    temporaries = []

    def write(tmp: Path) -> None:
        temporaries.append(tmp)
        assert not target.exists()  # nothing at the final name until the content is complete
        tmp.write_bytes(b"first")

    write_atomic(target, write)
    assert target.read_bytes() == b"first"
    assert temporaries[0].parent == tmp_path and temporaries[0].name.startswith("manifest.json.")
    assert temporaries[0].name.endswith(TMP_SUFFIX)
    assert names(tmp_path) == ["manifest.json"]


def test_write_atomic_replaces_a_file_only_once_the_new_one_is_written(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def write(tmp: Path) -> None:
        assert target.read_bytes() == b"old"  # a crash here would leave the old file, whole
        tmp.write_bytes(b"new")

    write_atomic(target, write)
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["manifest.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_a_write_that_raises_leaves_no_target_and_no_temporary(tmp_path, error):
    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"half a shard")
        raise error

    with pytest.raises(type(error)):
        write_atomic(tmp_path / "shard-00000.parquet", half_write)
    assert names(tmp_path) == []
    (tmp_path / "build.json").write_bytes(b"old")
    with pytest.raises(type(error)):
        write_atomic(tmp_path / "build.json", half_write)
    assert names(tmp_path) == ["build.json"] and (tmp_path / "build.json").read_bytes() == b"old"


def test_write_json_atomic_round_trips(tmp_path):
    manifest = {"format": "logitcache", "shards": [{"file": "shard-00000.parquet", "bytes": 1234}],
                "teacher": {"name": "Llama – tiny", "dtype": None}, "seq_len": 32, "mean": 0.125, "ok": True}
    write_json_atomic(tmp_path / "manifest.json", manifest)
    text = (tmp_path / "manifest.json").read_text()
    assert json.loads(text) == manifest
    assert list(json.loads(text)) == list(manifest)  # keys keep the writer's order
    assert text.endswith("\n")
    assert names(tmp_path) == ["manifest.json"]


def test_sha256_file_reads_by_chunks(tmp_path):
    data = bytes(range(256)) * 41
    (tmp_path / "shard").write_bytes(data)
    assert sha256_file(tmp_path / "shard", chunk=1000) == sha256_file(tmp_path / "shard") == hashlib.sha256(data).hexdigest()


def test_replace_folder_swaps_the_folder_whole(tmp_path):
    final = tmp_path / "checkpoint"
    (final / "sub").mkdir(parents=True)
    (final / "old.pt").write_bytes(b"old")
    (final / "sub" / "old.json").write_text("{}")
    (tmp_path / "checkpoint.tmp").mkdir()  # what a writer killed mid-way left behind
    (tmp_path / "checkpoint.tmp" / "junk").write_bytes(b"junk")
    given = []

    def write(tmp: Path) -> None:
        given.append((tmp, names(tmp)))
        assert names(final) == ["old.pt", "sub", "sub/old.json"]  # untouched until the new folder is complete
        (tmp / "sub").mkdir()
        (tmp / "model.pt").write_bytes(b"new")
        (tmp / "sub" / "state.json").write_text('{"step": 2}')

    replace_folder(final, write)
    assert given == [(tmp_path / "checkpoint.tmp", [])]  # an empty folder, whatever an earlier writer left there
    assert names(final) == ["model.pt", "sub", "sub/state.json"]
    assert (final / "model.pt").read_bytes() == b"new"
    assert names(tmp_path) == ["checkpoint", "checkpoint/model.pt", "checkpoint/sub", "checkpoint/sub/state.json"]


def test_replace_folder_makes_a_new_folder_and_keeps_the_old_one_if_the_write_fails(tmp_path):
    final = tmp_path / "deep" / "checkpoint"
    replace_folder(final, lambda tmp: (tmp / "model.pt").write_bytes(b"first"))
    assert names(tmp_path / "deep") == ["checkpoint", "checkpoint/model.pt"]

    def fail(tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(final, fail)
    assert names(final) == ["model.pt"] and (final / "model.pt").read_bytes() == b"first"


def test_clear_temporaries_removes_only_the_prefixs_temporaries(tmp_path):
    files = ["shard-00001.parquet", "manifest.json", "notes.tmp.txt", "tmp"]
    for name in files:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"shard-00002.parquet.1-ab{TMP_SUFFIX}").write_bytes(b"another folder's")
    (tmp_path / f"shard-00001.parquet.4242-deadbeef{TMP_SUFFIX}").write_bytes(b"half a shard")
    (tmp_path / f"manifest.json.7-cafe{TMP_SUFFIX}").write_bytes(b"half a manifest")
    kept = sorted([*files, "sub", f"sub/shard-00002.parquet.1-ab{TMP_SUFFIX}"])

    clear_temporaries(tmp_path, "shard-")
    assert names(tmp_path) == sorted([*kept, f"manifest.json.7-cafe{TMP_SUFFIX}"])
    clear_temporaries(tmp_path)
    assert names(tmp_path) == kept
    assert all((tmp_path / name).read_bytes() == b"keep" for name in files)
