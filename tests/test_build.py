"""logitcache build end to end on a real tiny teacher: targets, batches and CPU streams, settings,
workers, resume and the checks that stop a build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import processes
import pytest
import torch
from conftest import SEQ_LEN, all_targets, build_cache, edited_teacher, run_cli
from transformers import AutoModelForCausalLM

from logitcache.build.pipeline import TOKENIZER_THREAD
from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import read_shard
from logitcache.cache.manifest import read_manifest
from logitcache.cache.validate import validate_cache
from logitcache.errors import LogitcacheError


def teacher_logprobs(teacher_dir: Path, input_ids: np.ndarray) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.from_numpy(input_ids.astype(np.int64))).logits.float(), -1)


def test_topk_targets_match_the_teacher(teacher_dir, topk_cache):
    t = all_targets(topk_cache)
    assert validate_cache(topk_cache) == []
    ref = teacher_logprobs(teacher_dir, t.input_ids[:3])[:, :-1]  # [3, n-1, V]
    top_lp, top_ids = torch.topk(ref, 8, dim=-1)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-7))
    by_id = top_ids.argsort(-1)  # a topk shard holds each position's ids ascending
    top_lp, top_ids = top_lp.gather(-1, by_id), top_ids.gather(-1, by_id)
    ids = torch.from_numpy(t.target_ids.astype(np.int64)).view(-1, SEQ_LEN - 1, 8)[:3]
    lps = torch.from_numpy(t.target_logprobs.astype(np.float32)).view(-1, SEQ_LEN - 1, 8)[:3]
    torch.testing.assert_close(lps, top_lp, atol=2e-2, rtol=2e-3)
    agree = (ids == top_ids).float().mean()
    assert agree > 0.98  # ties within the stored precision may swap an id at the k-th place
    gold = ref.gather(-1, torch.from_numpy(t.input_ids[:3, 1:].astype(np.int64))[..., None])[..., 0]
    torch.testing.assert_close(torch.from_numpy(t.gold_logprob[:3].astype(np.float32)), gold, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(t.tail_logprob[:3].astype(np.float32)), tail, atol=2e-2, rtol=2e-3)
    assert np.all(t.target_lengths == 8)


def test_sample_targets_are_consistent(teacher_dir, sample_cache):
    t = all_targets(sample_cache)
    assert validate_cache(sample_cache) == []
    offsets = np.concatenate([[0], np.cumsum(t.target_lengths.reshape(-1), dtype=np.int64)])
    sums = np.add.reduceat(t.target_counts.astype(np.int64), offsets[:-1])
    assert np.all(sums == 20)
    ref = teacher_logprobs(teacher_dir, t.input_ids[:1])[0, :-1]
    for p in range(0, SEQ_LEN - 1, 5):
        ids = t.target_ids[offsets[p] : offsets[p + 1]].astype(np.int64)
        stored = torch.from_numpy(t.target_logprobs[offsets[p] : offsets[p + 1]].astype(np.float32))
        torch.testing.assert_close(stored, ref[p, ids], atol=2e-2, rtol=2e-3)
        assert np.all(np.diff(stored.numpy()) <= 1e-3)


def test_sample_logprobs_keep_logprob_bits(teacher_dir, corpus_file, sample_cache, tmp_path):
    """A sample build rounds stored log-probabilities to 7 mantissa bits by default, once, to nearest from the
    teacher's float32 value; 10 keeps float16's precision, and gold always does."""
    from logitcache.cache.format import round_mantissa, shard_metadata

    rounded = all_targets(sample_cache)
    assert read_manifest(sample_cache)["params"]["logprob_bits"] == 7
    assert np.all(rounded.target_logprobs.view(np.uint32) & ((1 << 16) - 1) == 0)
    build_cache(teacher_dir, corpus_file, tmp_path / "full", method="sample", samples=20, logprob_bits=10)
    full = all_targets(tmp_path / "full")
    assert shard_metadata(tmp_path / "full" / "shard-00000.parquet")["logprob_mantissa_bits"]["target_logprobs"] == 10
    assert np.array_equal(full.target_ids, rounded.target_ids)  # rounding touches nothing but the log-probabilities
    assert np.any(full.target_logprobs.view(np.uint32) & ((1 << 15) - 1))
    assert np.array_equal(full.gold_logprob, rounded.gold_logprob)  # gold keeps 10 bits
    # Both are the same float32 value rounded once: to 10 bits (within 2^-11) and to 7 (within 2^-8). So the
    # 7-bit value is a 7-bit neighbour of the 10-bit one, and mostly the nearest (ties may go either way).
    a, b = full.target_logprobs.astype(np.float64), rounded.target_logprobs.astype(np.float64)
    assert np.all(np.abs(a - b) <= np.abs(a) * (2.0**-8 + 2.0**-11) * (1 + 2.0**-10))
    assert np.mean(round_mantissa(full.target_logprobs, 7) == rounded.target_logprobs) > 0.8  # ~15/16: 1/8 are ties


def test_a_sample_cache_without_logprobs_holds_the_same_draws(sample_cache, ids_only_cache):
    """--logprob-bits 0 (format v4) leaves out target_logprobs and nothing else: the same draws, counts, gold and
    tokens as the default build, a sound cache, and fewer bytes."""
    import pyarrow.parquet as pq

    from logitcache.cache.format import FORMAT_VERSION, shard_metadata
    from logitcache.cache.summary import summarize
    from logitcache.cache.validate import validate_cache

    manifest = read_manifest(ids_only_cache)
    assert manifest["format_version"] == FORMAT_VERSION == 4 and manifest["params"]["logprob_bits"] == 0
    assert validate_cache(ids_only_cache) == []
    shard = ids_only_cache / manifest["shards"][0]["file"]
    assert "target_logprobs" not in pq.read_schema(shard).names
    assert "target_logprobs" not in shard_metadata(shard)["logprob_mantissa_bits"]
    full, ids_only = all_targets(sample_cache), all_targets(ids_only_cache)
    assert ids_only.target_logprobs is None and full.target_logprobs is not None
    for name in ("sequence_ids", "input_ids", "target_lengths", "target_ids", "target_counts", "gold_logprob"):
        assert np.array_equal(getattr(ids_only, name), getattr(full, name)), name
    smaller, larger = summarize(ids_only_cache), summarize(sample_cache)
    assert smaller["bytes_per_entry"] < larger["bytes_per_entry"]
    assert smaller["teacher_perplexity"] == larger["teacher_perplexity"]


def test_sampling_does_not_depend_on_batch_size(teacher_dir, corpus_file, sample_cache, tmp_path):
    build_cache(teacher_dir, corpus_file, tmp_path / "b1", method="sample", samples=20, batch_size=1, shard_size=16)
    a, b = all_targets(sample_cache), all_targets(tmp_path / "b1")
    assert np.array_equal(a.target_ids, b.target_ids)
    assert np.array_equal(a.target_counts, b.target_counts)


def test_cpu_streams_do_not_change_the_shards(teacher_dir, corpus_file, topk_cache, sample_cache, tmp_path):
    """Teacher batches computed one at a time on all threads, or three at once on one thread each: same bytes."""
    for cache, extra in ((topk_cache, dict(method="topk", k=8)), (sample_cache, dict(method="sample", samples=20))):
        reference = read_manifest(cache)
        for streams in (1, 3):
            out = tmp_path / f"{extra['method']}-{streams}"
            manifest = build_cache(teacher_dir, corpus_file, out, cpu_streams=streams, **extra)
            assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]


def cli_build(teacher: Path, corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("build", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
                   "--seq-len", str(SEQ_LEN), *extra)


def test_out_holding_a_different_build_is_refused(teacher_dir, corpus_file, topk_cache, tmp_path):
    out = tmp_path / "copy"
    build_cache(teacher_dir, corpus_file, out, method="topk", k=8)
    result = cli_build(teacher_dir, corpus_file, out, "--method", "topk", "--k", "4", "--shard-size", "16")
    assert result.returncode == 1 and "different build" in result.stderr
    assert read_manifest(out)["params"] == {"k": 8}
    result = cli_build(teacher_dir, corpus_file, out, "--method", "topk", "--k", "4", "--shard-size", "16", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert read_manifest(out)["params"] == {"k": 4}
    assert validate_cache(out) == []


def test_rerunning_a_finished_build_changes_nothing(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "again"
    build_cache(teacher_dir, corpus_file, out, method="sample", samples=8)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    build_cache(teacher_dir, corpus_file, out, method="sample", samples=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_killed_build_resumes_byte_identical(teacher_dir, documents, tmp_path):
    """A real `logitcache build` process killed mid-build, then re-run, equals an uninterrupted build."""
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents * 2))
    extra = ("--method", "sample", "--samples", "16", "--shard-size", "4", "--batch-size", "2")
    reference = tmp_path / "reference"
    assert cli_build(teacher_dir, corpus, reference, *extra).returncode == 0
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "logitcache", "build", "--teacher", str(teacher_dir), "--corpus", str(corpus),
           "--out", str(out), "--seq-len", str(SEQ_LEN), *extra]
    with processes.tracked(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        deadline = time.monotonic() + 120
        while not (out / "shard-00003.parquet").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "build ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = {p.name for p in out.glob("shard-*.parquet")}
    assert 0 < len(done_before) < len(list(reference.glob("shard-*.parquet")))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in done_before}
    assert cli_build(teacher_dir, corpus, out, *extra).returncode == 0
    assert all((out / name).stat().st_mtime_ns == mtimes[name] for name in done_before), "finished shards were redone"
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_build_that_wrote_no_shard_is_named_when_it_blocks_the_next(teacher_dir, documents, tmp_path):
    # 300 short documents (the tokenizer reads 256 at a time): the bad line is met before a shard completes
    lines = [json.dumps({"text": doc[:40]}) + "\n" for doc in documents[:300]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:290]) + "not json\n" + "".join(lines[290:]))
    with pytest.raises(LogitcacheError, match="bad.jsonl:291: not valid JSON"):
        build_cache(teacher_dir, bad, tmp_path / "out", shard_size=256)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["build.json"]
    bad.write_text("".join(lines))  # fixed: another corpus fingerprint, so another build
    # It cannot tell a failed build from one still running before its first shard: it says how to go on.
    with pytest.raises(LogitcacheError, match=r"has written no shard yet .* delete .*build.json or pass --overwrite"):
        build_cache(teacher_dir, bad, tmp_path / "out", shard_size=256)
    build_cache(teacher_dir, bad, tmp_path / "out", shard_size=256, overwrite=True)
    assert validate_cache(tmp_path / "out") == []


def test_workers_split_shards_and_merge_to_the_single_worker_build(teacher_dir, corpus_file, topk_cache, tmp_path):
    out = tmp_path / "workers"
    # What an earlier 3-worker run of this build and a writer killed mid-shard leave behind:
    build_cache(teacher_dir, corpus_file, out, method="topk", k=8, num_workers=3, worker_index=0)
    (out / "shard-00001.parquet.4242-deadbeef.tmp").write_bytes(b"half a shard")
    for index in (1, 0):
        part = build_cache(teacher_dir, corpus_file, out, method="topk", k=8, num_workers=2, worker_index=index)
    single = read_manifest(topk_cache)
    merged = read_manifest(out)
    assert merged == part
    assert [s["sha256"] for s in merged["shards"]] == [s["sha256"] for s in single["shards"]]
    assert merged["totals"] == single["totals"]
    assert validate_cache(out) == []
    assert sorted(p.name for p in out.glob("manifest.part-*")) == [f"manifest.part-0000{i}-of-00002.json" for i in (0, 1)]
    assert not list(out.glob("*.tmp"))


def test_a_failed_build_stops_its_tokenizer_thread(teacher_dir, corpus_file, tmp_path):
    def poison(model, tokenizer):
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")

    broken = edited_teacher(teacher_dir, tmp_path / "nan-teacher", poison)
    # one window per batch and two per shard: the corpus's windows are far more than the thread's queue holds
    with pytest.raises(LogitcacheError, match="NaN"):
        build_cache(broken, corpus_file, tmp_path / "out", batch_size=1, shard_size=2)
    tokenizers = [t for t in threading.enumerate() if t.name == TOKENIZER_THREAD]
    for thread in tokenizers:
        thread.join(timeout=30)  # a thread blocked on its queue for good would still be alive
    assert not [t for t in tokenizers if t.is_alive()]


def test_nan_targets_are_named_by_sequence(topk_cache):
    from logitcache.build.run import check_finite

    targets = read_shard(topk_cache / "shard-00001.parquet")
    check_finite(targets)  # a sound shard passes
    targets.gold_logprob = targets.gold_logprob.copy()
    targets.gold_logprob[3, 5] = np.nan
    with pytest.raises(LogitcacheError, match=f"NaN gold_logprob \\(first in sequence {targets.sequence_ids[3]}\\)"):
        check_finite(targets)


def test_a_tokenizer_larger_than_the_head_is_refused(teacher_dir, corpus_file, tmp_path):
    grown = edited_teacher(teacher_dir, tmp_path / "grown", lambda model, tokenizer: tokenizer.add_tokens(["zqzqzq"]))
    vocab = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).config.vocab_size
    with pytest.raises(LogitcacheError, match=f"has {vocab + 1} tokens but the teacher's output head only {vocab}"):
        build_cache(grown, corpus_file, tmp_path / "out", method="topk", k=4)


def test_run_build_rejects_bad_settings(teacher_dir, corpus_file, tmp_path):
    with pytest.raises(LogitcacheError, match="worker-index"):
        run_build(BuildSettings(teacher=teacher_dir, corpus=corpus_file, out=tmp_path, num_workers=2, worker_index=2))
