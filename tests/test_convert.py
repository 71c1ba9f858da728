"""``logitcache convert``: a v1 cache rewritten as v2 holds exactly the same targets, a conversion stopped
half-way resumes to the same bytes, and bad input is one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import all_targets, as_v1, run_cli

from logitcache.cache.convert import convert_cache
from logitcache.cache.format import FORMAT_VERSION, WindowTargets, shard_metadata
from logitcache.cache.manifest import read_manifest
from logitcache.cache.validate import validate_cache
from logitcache.errors import LogitcacheError


@pytest.fixture(scope="module")
def v1_caches(tmp_path_factory, topk_cache, sample_cache) -> dict:
    root = tmp_path_factory.mktemp("v1")
    return {"topk": as_v1(topk_cache, root / "topk"), "sample": as_v1(sample_cache, root / "sample")}


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_converted_cache_holds_the_v1_targets_exactly(method, v1_caches, tmp_path):
    src, dst = v1_caches[method], tmp_path / "v2"
    manifest = convert_cache(src, dst)
    assert manifest == read_manifest(dst) and manifest["format_version"] == FORMAT_VERSION == 4
    assert manifest["converted_from"] == read_manifest(src)["fingerprint"] != manifest["fingerprint"]
    assert validate_cache(dst) == []
    old, new = all_targets(src), all_targets(dst)
    for name in WindowTargets.__dataclass_fields__:  # float16 -> float32 is exact, and no value has more bits
        assert np.array_equal(getattr(old, name), getattr(new, name)), name
    assert new.target_logprobs.dtype == new.gold_logprob.dtype == old.gold_logprob.dtype == np.float32
    assert sum(s["bytes"] for s in manifest["shards"]) == manifest["totals"]["bytes"]
    # a v1 cache has no layout: it was one stream without BOS, and the converted cache says so, as a v2 build would
    assert "layout" not in read_manifest(src)
    layout = {"format": "text", "packing": "stream", "bos": "never", "bos_token_id": None,
              "eos_token_id": manifest["tokenizer"]["eos_token_id"]}
    assert manifest["layout"] == layout
    first = shard_metadata(dst / manifest["shards"][0]["file"])
    assert first["layout"] == layout and first["tokens"] == manifest["shards"][0]["tokens"]


def test_a_v3_cache_converts_to_v4_with_the_same_targets(sample_cache, tmp_path):
    from conftest import as_version

    src = as_version(sample_cache, tmp_path / "v3", 3)
    manifest = convert_cache(src, tmp_path / "v4")
    assert read_manifest(src)["format_version"] == 3 and manifest["format_version"] == FORMAT_VERSION == 4
    assert validate_cache(tmp_path / "v4") == []
    old, new = all_targets(src), all_targets(tmp_path / "v4")
    for name in WindowTargets.__dataclass_fields__:
        assert np.array_equal(getattr(old, name), getattr(new, name)), name


def test_an_interrupted_conversion_resumes_to_the_same_bytes(v1_caches, tmp_path):
    src = v1_caches["sample"]
    whole = convert_cache(src, tmp_path / "whole")

    def stop_after_first(index: int) -> None:
        if index == 0:
            raise KeyboardInterrupt

    dst = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        convert_cache(src, dst, on_shard=stop_after_first)
    assert not (dst / "manifest.json").exists() and (dst / "build.json").is_file()
    first = (dst / "shard-00000.parquet").stat()
    (dst / "shard-00001.parquet.1-ab.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    done = []
    assert convert_cache(src, dst, on_shard=done.append) == whole
    assert done == list(range(len(whole["shards"])))
    assert (dst / "shard-00000.parquet").stat().st_mtime_ns == first.st_mtime_ns  # kept, not rewritten
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for entry in whole["shards"]:
        assert (dst / entry["file"]).read_bytes() == (tmp_path / "whole" / entry["file"]).read_bytes()


def test_convert_refuses_bad_input(v1_caches, topk_cache, tmp_path):
    src = v1_caches["topk"]
    with pytest.raises(LogitcacheError, match="already format v4"):
        convert_cache(topk_cache, tmp_path / "x")
    with pytest.raises(LogitcacheError, match="DST is SRC"):
        convert_cache(src, src)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(LogitcacheError, match="holds other files"):
        convert_cache(src, tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]  # nothing written
    with pytest.raises(LogitcacheError, match="not found"):
        convert_cache(tmp_path / "nowhere", tmp_path / "y")


def test_convert_refuses_a_corrupt_source_shard(v1_caches, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(v1_caches["topk"], src)
    shard = src / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LogitcacheError, match="shard-00001.parquet: sha256 differs"):
        convert_cache(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "shard-00001.parquet").exists() and not (tmp_path / "dst" / "manifest.json").exists()


def test_convert_command(v1_caches, tmp_path):
    ok = run_cli("convert", str(v1_caches["topk"]), str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "format v4" in ok.stdout and json.loads((tmp_path / "out" / "manifest.json").read_text())["format_version"] == 4
    again = run_cli("convert", str(tmp_path / "out"), str(tmp_path / "again"))
    assert again.returncode == 1 and "already format v4" in again.stderr and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    shown = run_cli("convert", "--help")
    assert shown.returncode == 0 and "interrupted" in shown.stdout and "older shard format" in shown.stdout
