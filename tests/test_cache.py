"""A cache folder (logitcache/cache/): validate names what is wrong, inspect summarises (also a broken
teacher's), a manifest missing what builds write is named, merge refuses damaged parts, v1 caches
are still read, and the rounding of stored log-probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import as_version, build_cache, run_cli

from logitcache.cache.format import FORMAT_VERSION, WindowTargets, read_shard
from logitcache.cache.manifest import read_manifest
from logitcache.cache.summary import summarize
from logitcache.cache.validate import validate_cache
from logitcache.errors import LogitcacheError


def test_validate_names_what_is_wrong(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "v"
    build_cache(teacher_dir, corpus_file, out, method="topk", k=4)
    ok = run_cli("validate", str(out))
    assert ok.returncode == 0 and "sound" in ok.stdout
    shard = out / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "shard-00002.parquet").unlink()
    bad = run_cli("validate", str(out))
    assert bad.returncode == 1
    assert "shard-00001.parquet: sha256 differs" in bad.stderr
    assert "shard-00002.parquet: missing" in bad.stderr


def test_inspect_json_keys(topk_cache, sample_cache):
    for cache, method in ((topk_cache, "topk"), (sample_cache, "sample")):
        result = run_cli("inspect", str(cache), "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        for key in ("sequences", "tokens", "bytes", "bytes_per_token", "mean_ids_per_position", "method",
                    "teacher_perplexity", "mean_covered_mass", "shards"):
            assert key in summary
        assert summary["method"] == method
        manifest = read_manifest(cache)
        assert summary["sequences"] == manifest["totals"]["sequences"]
        assert summary["bytes"] == sum(p.stat().st_size for p in cache.glob("shard-*.parquet"))
    assert summarize(topk_cache)["mean_ids_per_position"] == 8
    assert 0 < summarize(topk_cache)["mean_covered_mass"] < 1
    # Same teacher and corpus: the perplexity from gold log-probs agrees between methods.
    assert summarize(topk_cache)["teacher_perplexity"] == pytest.approx(summarize(sample_cache)["teacher_perplexity"])


def test_teacher_perplexity_past_float64_is_infinite_not_an_error(topk_cache, tmp_path):
    import shutil

    from logitcache.cache.format import shard_metadata, write_shard
    from logitcache.cache.summary import _perplexity

    assert _perplexity(1.0) == pytest.approx(np.e) and _perplexity(5000.0) == float("inf")
    broken = tmp_path / "broken"
    shutil.copytree(topk_cache, broken)
    for shard in broken.glob("shard-*.parquet"):  # gold log-probs of a broken teacher: float16's lowest
        targets, meta = read_shard(shard), shard_metadata(shard)
        targets.gold_logprob = np.full_like(targets.gold_logprob, -65504)
        write_shard(shard, targets, meta)
    result = run_cli("inspect", str(broken), "--json")
    assert result.returncode == 0, result.stderr

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(result.stdout, parse_constant=refuse)["teacher_perplexity"] is None  # strict JSON: null


def test_a_manifest_missing_what_builds_write_is_named(topk_cache, tmp_path):
    import shutil

    from logitcache.cache.merge import merge_parts

    edited = tmp_path / "edited"
    shutil.copytree(topk_cache, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    del manifest["shards"][1]["target_entries"]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    assert validate_cache(edited) == [(f"{edited / 'manifest.json'}: no shards[1].target_entries, which every build "
                                       "writes (edited by hand or damaged?); rebuild the cache, or `logitcache merge` "
                                       "it again from its partial manifests")]
    result = run_cli("inspect", str(edited))
    assert result.returncode == 1 and "no shards[1].target_entries" in result.stderr and "Traceback" not in result.stderr
    (edited / "manifest.json").write_text("[1, 2]")
    with pytest.raises(LogitcacheError, match="not a logitcache manifest"):
        read_manifest(edited)
    part = tmp_path / "parts" / "manifest.part-00000-of-00001.json"
    part.parent.mkdir()
    for damaged in ('{"shards": [', '{"shards": [], "totals": {}}'):
        part.write_text(damaged)
        with pytest.raises(LogitcacheError, match="not a partial manifest a worker wrote"):
            merge_parts(part.parent)


def test_inspect_of_a_cache_missing_a_shard_is_one_error_line(topk_cache, tmp_path):
    (tmp_path / "manifest.json").write_bytes((topk_cache / "manifest.json").read_bytes())
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 1
    assert "shard-00000.parquet: cannot read column" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_finds_nan_and_wrong_counts(topk_cache, tmp_path):
    import shutil

    from logitcache.cache.format import shard_metadata, write_shard
    from logitcache.cache.manifest import write_manifest
    from logitcache.files import sha256_file

    out = tmp_path / "copy"
    shutil.copytree(topk_cache, out)
    shard = out / "shard-00000.parquet"
    targets, meta = read_shard(shard), shard_metadata(shard)
    targets.target_logprobs = targets.target_logprobs.copy()
    targets.target_logprobs[7] = np.nan
    write_shard(shard, targets, meta)
    manifest = read_manifest(out)
    manifest["shards"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    manifest["shards"][1]["target_entries"] += 1
    manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    manifest["totals"]["positions"] -= 1
    write_manifest(out, manifest)
    problems = "\n".join(validate_cache(out))
    assert "shard-00000.parquet: target_logprobs holds NaN" in problems
    entries = manifest["shards"][1]["target_entries"]
    assert f"shard-00001.parquet: {entries - 1} target entries in its metadata, manifest says {entries}" in problems
    assert f"totals.target_entries = {manifest['totals']['target_entries']} but its shards add up to" in problems
    assert f"totals.positions = {manifest['totals']['positions']} but" in problems


def test_round_mantissa_rounds_once_to_nearest():
    """float32 in: within 2^-(bits+1) relative of the value, low bits zero; float16 values with <= bits bits exact."""
    from logitcache.cache.format import round_mantissa

    values = -np.exp(np.random.default_rng(0).uniform(np.log(1e-6), np.log(2e4), 100_000)).astype(np.float32)
    for bits in (4, 8, 10):
        out = round_mantissa(values, bits)
        assert out.dtype == np.float32
        assert np.all(out.view(np.uint32) & ((1 << (23 - bits)) - 1) == 0)
        assert (np.abs(out.astype(np.float64) - values) / np.abs(values)).max() <= 2.0 ** -(bits + 1)
    half = values.astype(np.float16)
    assert np.array_equal(round_mantissa(half, 10), half.astype(np.float32))
    special = round_mantissa(np.array([-np.inf, 0.0, np.nan, -np.finfo(np.float32).max], np.float32), 8)
    assert special[0] == -np.inf and special[1] == 0.0 and np.isnan(special[2]) and special[3] == -np.finfo(np.float32).max


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("cache_name", ["topk_cache", "sample_cache"])
def test_older_caches_are_read_validated_and_inspected(cache_name, version, request, tmp_path):
    """A v1 (v2, v3) copy of a current cache: the same targets (float16 holds every value of its range), sound, the same summary."""
    cache = request.getfixturevalue(cache_name)
    old = as_version(cache, tmp_path / "old", version)
    assert read_manifest(old)["format_version"] == version and validate_cache(old) == []
    for entry in read_manifest(old)["shards"]:
        new, v1 = read_shard(cache / entry["file"]), read_shard(old / entry["file"])
        assert v1.target_logprobs.dtype == np.float32 and np.array_equal(v1.target_ids, new.target_ids)
        assert np.array_equal(v1.target_logprobs, new.target_logprobs)  # v2 keeps at most float16's 10 bits
        assert np.array_equal(v1.gold_logprob, new.gold_logprob)
    assert summarize(old)["teacher_perplexity"] == summarize(cache)["teacher_perplexity"]
    if version == 1:  # float16 columns; v2 and v3 text shards differ from v4's in their metadata alone
        assert summarize(old)["bytes"] != summarize(cache)["bytes"]
    # An older shard slipped into a current cache is named, not decoded as if it were current.
    import shutil

    from logitcache.cache.manifest import write_manifest
    from logitcache.files import sha256_file

    mixed = tmp_path / "mixed"
    shutil.copytree(cache, mixed)
    shutil.copy(old / "shard-00000.parquet", mixed / "shard-00000.parquet")
    manifest = read_manifest(mixed)
    shard = mixed / "shard-00000.parquet"
    manifest["shards"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    write_manifest(mixed, manifest)
    assert validate_cache(mixed) == [f"shard-00000.parquet: shard format v{version} in a v{FORMAT_VERSION} cache"]


def test_v2_shards_use_portable_narrow_types(topk_cache, sample_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitcache.cache.format import FORMAT_VERSION, shard_metadata

    assert FORMAT_VERSION == 4
    for cache in (topk_cache, sample_cache):
        shard = cache / "shard-00000.parquet"
        types = {field.name: field.type for field in pq.read_schema(shard)}
        assert not any(pa.types.is_float16(t.value_type) for t in types.values() if pa.types.is_list(t))
        assert shard_metadata(shard)["format_version"] == FORMAT_VERSION
        chunk = pq.ParquetFile(shard).metadata.row_group(0)
        encodings = {chunk.column(c).path_in_schema.split(".")[0]: chunk.column(c).encodings for c in range(chunk.num_columns)}
        assert "BYTE_STREAM_SPLIT" in encodings["target_logprobs"] and "BYTE_STREAM_SPLIT" in encodings["gold_logprob"]
    assert pq.read_schema(sample_cache / "shard-00000.parquet").field("target_counts").type.value_type == pa.uint8()
    assert shard_metadata(sample_cache / "shard-00000.parquet")["logprob_mantissa_bits"] == {
        "target_logprobs": 7, "gold_logprob": 10}


def test_topk_shards_hold_ids_ascending_and_the_losses_are_those_of_the_logprob_order(topk_cache, sample_cache):
    """A topk shard holds each position's ids ascending (log-probabilities moved with them);
    the same targets ordered by descending log-probability (v1's order) give every loss the same value, up to
    float summation order, but BiLD and RLKD: they pick the teacher's top cached ids by value, and where
    rounded values tie at the k-th place the stored order decides which id is picked (the descending order
    is the unrounded one), so they agree only to within that tie. Sample shards keep the descending order."""
    import torch

    from logitcache.cache.format import ascending_order
    from logitcache.loader.collate import collate
    from logitcache.losses.sparse import LOSSES

    def positions(t: WindowTargets, values: np.ndarray) -> list[np.ndarray]:
        return np.split(values, np.cumsum(t.target_lengths.reshape(-1).astype(np.int64))[:-1])

    shard = topk_cache / "shard-00000.parquet"
    stored = read_shard(shard)
    assert all(np.all(np.diff(ids) > 0) for ids in positions(stored, stored.target_ids))
    sample = read_shard(sample_cache / "shard-00000.parquet")
    assert all(np.all(np.diff(lp) <= 0) for lp in positions(sample, sample.target_logprobs))
    by_logprob = ascending_order(-stored.target_logprobs, stored.target_lengths)
    assert not np.array_equal(by_logprob, np.arange(len(by_logprob)))  # the orders differ: the check below says something
    original = WindowTargets(**{**stored.__dict__, "target_ids": stored.target_ids[by_logprob],
                                "target_logprobs": stored.target_logprobs[by_logprob]})
    manifest = read_manifest(topk_cache)
    batches = [collate([t.select(np.arange(4))], manifest) for t in (stored, original)]
    logits = torch.randn(*batches[0]["labels"].shape, manifest["vocab_size"], generator=torch.Generator().manual_seed(0))
    for name in (name for name in LOSSES if name not in ("rs-kd", "minillm")):  # a sample cache; generated answers
        ascending, descending = (LOSSES[name](logits, batch).total for batch in batches)
        tolerance = 1e-3 if name in ("bild", "rlkd") else 1e-6
        assert torch.allclose(ascending, descending, rtol=tolerance, atol=1e-6), name


@pytest.mark.parametrize("block", [3, 1 << 16])
def test_ascending_order_sorts_each_position_and_keeps_positions_in_place(block):
    """Against a lexsort by (position, id): ragged positions, empty ones, full ones (topk), across blocks."""
    from logitcache.cache.format import ascending_order

    rng = np.random.default_rng(0)
    for lengths in (rng.integers(0, 7, size=200), np.full(200, 5), np.zeros(10, dtype=np.int64)):
        lengths = lengths.astype(np.uint16)
        ids = rng.permutation(10**6)[: int(lengths.sum())].astype(np.int32)
        position = np.repeat(np.arange(len(lengths)), lengths.astype(np.int64))
        assert np.array_equal(ascending_order(ids, lengths, block=block), np.lexsort((ids, position)))


@pytest.mark.parametrize("change, message", [
    ({"format_version": 3}, "caches go without them from v4 on"),
    ({"params": {"samples": 20, "proposal_temperature": 0.5, "logprob_bits": 0}}, "tempered proposal"),
])
def test_a_manifest_without_logprobs_that_cannot_be_is_refused(change, message, ids_only_cache, tmp_path):
    """No target_logprobs is a format v4 sample cache drawn at proposal temperature 1, or nothing: a manifest saying
    otherwise (hand-edited, or from another tool) is refused on reading, by every command that opens it."""
    import shutil

    from logitcache.cache.manifest import write_manifest

    copy = tmp_path / "cache"
    shutil.copytree(ids_only_cache, copy)
    write_manifest(copy, {**read_manifest(copy), **change})
    with pytest.raises(LogitcacheError, match=message):
        read_manifest(copy)
    shown = run_cli("validate", str(copy))
    assert shown.returncode == 1 and message in shown.stderr.replace("\n", " ") and "Traceback" not in shown.stderr
