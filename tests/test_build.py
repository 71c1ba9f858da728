"""logitcache build end to end on a real tiny teacher: targets, packing, corpora, errors, resume."""

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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from conftest import SEQ_LEN, build_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.build.pipeline import TOKENIZER_THREAD
from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import read_shard
from logitcache.cache.manifest import read_manifest
from logitcache.cache.summary import summarize
from logitcache.cache.validate import validate_cache
from logitcache.errors import LogitcacheError


def all_targets(cache: Path):
    from logitcache.cache.format import WindowTargets

    manifest = read_manifest(cache)
    return WindowTargets.concat([read_shard(cache / s["file"]) for s in manifest["shards"]])


def teacher_logprobs(teacher_dir: Path, input_ids: np.ndarray) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.from_numpy(input_ids.astype(np.int64))).logits.float(), -1)


def test_topk_targets_match_the_teacher(teacher_dir, topk_cache):
    t = all_targets(topk_cache)
    assert validate_cache(topk_cache) == []
    ref = teacher_logprobs(teacher_dir, t.input_ids[:3])[:, :-1]  # [3, n-1, V]
    top_lp, top_ids = torch.topk(ref, 8, dim=-1)
    ids = torch.from_numpy(t.target_ids.astype(np.int64)).view(-1, SEQ_LEN - 1, 8)[:3]
    lps = torch.from_numpy(t.target_logprobs.astype(np.float32)).view(-1, SEQ_LEN - 1, 8)[:3]
    torch.testing.assert_close(lps, top_lp, atol=2e-2, rtol=2e-3)
    agree = (ids == top_ids).float().mean()
    assert agree > 0.98  # ties within float16 may reorder a few ids
    gold = ref.gather(-1, torch.from_numpy(t.input_ids[:3, 1:].astype(np.int64))[..., None])[..., 0]
    torch.testing.assert_close(torch.from_numpy(t.gold_logprob[:3].astype(np.float32)), gold, atol=2e-2, rtol=2e-3)
    tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-7))
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
    """A sample build rounds stored log-probabilities to 8 mantissa bits by default, to nearest; 10 keeps float16's all."""
    from logitcache.cache.format import round_float16

    rounded = all_targets(sample_cache)
    assert read_manifest(sample_cache)["params"]["logprob_bits"] == 8
    assert np.all(rounded.target_logprobs.view(np.uint16) & 0b11 == 0)
    build_cache(teacher_dir, corpus_file, tmp_path / "full", method="sample", samples=20, logprob_bits=10)
    full = all_targets(tmp_path / "full")
    assert np.array_equal(full.target_ids, rounded.target_ids)  # rounding touches nothing but the log-probabilities
    assert np.any(full.target_logprobs.view(np.uint16) & 0b11)
    assert np.array_equal(full.gold_logprob, rounded.gold_logprob)  # gold keeps all of float16
    # Both are the same float32 value rounded once: to 10 bits (within 2^-11) and to 8 (within 2^-9). So the
    # 8-bit value is an 8-bit neighbour of the 10-bit one, and mostly the nearest (ties may go either way).
    a, b = full.target_logprobs.astype(np.float64), rounded.target_logprobs.astype(np.float64)
    assert np.all(np.abs(a - b) <= np.abs(a) * (2.0**-9 + 2.0**-11) * (1 + 2.0**-10))
    nearest = round_float16(full.target_logprobs, 8)
    assert np.mean(nearest == rounded.target_logprobs) > 0.8  # ~7/8 expected: 1/4 of 10-bit values sit on a tie


def test_windows_are_the_packed_corpus(teacher_dir, corpus_file, topk_cache):
    """Documents + EOS, concatenated, cut into consecutive windows; sequence ids 0..N-1; remainder dropped."""
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    stream = []
    for line in corpus_file.read_text().splitlines():
        stream += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    t = all_targets(topk_cache)
    manifest = read_manifest(topk_cache)
    n = len(stream) // SEQ_LEN
    assert np.array_equal(t.input_ids.reshape(-1), np.asarray(stream[: n * SEQ_LEN]))
    assert np.array_equal(t.sequence_ids, np.arange(n))
    assert manifest["corpus"]["dropped_tokens"] == len(stream) - n * SEQ_LEN
    assert manifest["corpus"]["tokens"] == len(stream)


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


def _corpus_variants(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    import datasets

    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs)
    (tmp_path / "c.jsonl").write_text(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:10]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[10:]))
    return {"jsonl": tmp_path / "c.jsonl", "zst": tmp_path / "c.jsonl.zst", "parquet": tmp_path / "c.parquet",
            "datasets": tmp_path / "ds", "folder": folder}


def test_every_corpus_format_gives_the_same_windows(teacher_dir, documents, tmp_path):
    variants = _corpus_variants(tmp_path, documents[:25])
    results = {}
    for name, path in variants.items():
        out = tmp_path / f"out-{name}"
        build_cache(teacher_dir, path, out, method="topk", k=4, text_field="body")
        results[name] = all_targets(out).input_ids
    first = results.pop("jsonl")
    for name, ids in results.items():
        assert np.array_equal(first, ids), name


def test_text_files_are_one_document_each(teacher_dir, documents, tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, doc in enumerate(documents[:20]):
        (folder / f"{i:03d}.txt").write_text(doc)
    manifest = build_cache(teacher_dir, folder, tmp_path / "out", method="topk", k=4)
    assert manifest["corpus"]["documents"] == 20
    assert manifest["corpus"]["text_field"] is None  # no records, so no field; --text-field changes nothing
    assert build_cache(teacher_dir, folder, tmp_path / "out", method="topk", k=4, text_field="body") == manifest


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return processes.run([sys.executable, "-m", "logitcache", *args], env=env, **kw)


def cli_build(teacher: Path, corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("build", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
                   "--seq-len", str(SEQ_LEN), *extra)


@pytest.fixture
def bad_inputs(teacher_dir, corpus_file, topk_cache, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    damaged = tmp_path / "damaged.jsonl.zst"
    packed = zstandard.ZstdCompressor().compress(corpus_file.read_bytes())
    damaged.write_bytes(packed[: len(packed) // 2] + bytes(64) + packed[len(packed) // 2 + 64 :])
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"body": list(range(100))}), numbers)
    folder = tmp_path / "corpus-folder"
    folder.mkdir()
    (folder / "docs.jsonl").write_bytes(corpus_file.read_bytes())
    a_file = tmp_path / "a-file"
    a_file.touch()
    return {
        "missing teacher": (["--teacher", str(tmp_path / "nope")], "not a directory"),
        "teacher without config": (["--teacher", str(tmp_path)], "no config.json"),
        "empty corpus": (["--corpus", str(empty)], "fewer than one window"),
        "missing corpus": (["--corpus", str(tmp_path / "nope.jsonl")], "does not exist"),
        "a cache as corpus": (["--corpus", str(topk_cache)], "is a logitcache cache"),
        "missing text field": (["--text-field", "content"], "no field 'content'"),
        "seq-len beyond context": (["--seq-len", "4096"], "beyond the teacher's context"),
        "k beyond vocab": (["--k", "1000"], "larger than the teacher's vocabulary"),
        "N < 1": (["--method", "sample", "--samples", "0"], "at least 1"),
        "unknown method": (["--method", "dense"], "choose one of"),
        "unknown dtype": (["--dtype", "fp16"], "choose one of float32, bfloat16, float16"),
        "not a device": (["--device", "gpu"], "not a torch device"),
        "chunk-mib 0": (["--chunk-mib", "0"], "must be at least 1"),
        "damaged zst": (["--corpus", str(damaged)], "not a readable zstd stream"),
        "numbers as text": (["--corpus", str(numbers), "--text-field", "body"], "holds int64, not text"),
        "out inside the corpus": (["--corpus", str(folder), "--out", str(folder / "cache")], "lies inside --corpus"),
        "out under a file": (["--out", str(a_file / "cache")], "Not a directory"),
        "gpu memory 5": (["--gpu-memory-utilization", "5"], "a fraction in (0, 1]"),
        "tensor parallel 0": (["--tensor-parallel-size", "0"], "must be at least 1"),
        "max seqs 0": (["--max-num-seqs", "0"], "must be at least 1"),
        **({} if torch.cuda.is_available() else {"no cuda": (["--device", "cuda"], "has no CUDA device")}),
    }


def test_bad_input_is_one_clear_line(teacher_dir, corpus_file, tmp_path, bad_inputs):
    for name, (override, message) in bad_inputs.items():
        args = {"--teacher": str(teacher_dir), "--corpus": str(corpus_file), "--out": str(tmp_path / name)}
        extra = []
        for i in range(0, len(override), 2):
            if override[i] in args:
                args[override[i]] = override[i + 1]
            else:
                extra += override[i : i + 2]
        result = run_cli("build", *[x for kv in args.items() for x in kv], "--seq-len", str(SEQ_LEN), *extra)
        assert result.returncode == 1, (name, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in result.stderr.replace("\n", " "), (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / name / "manifest.json").exists()


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


def test_error_lines_keep_square_brackets(tmp_path):
    result = run_cli("inspect", str(tmp_path / "runs[old]"))
    assert result.returncode == 1 and f"{tmp_path / 'runs[old]' / 'manifest.json'} not found" in result.stdout + result.stderr


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


def test_inspect_of_a_cache_missing_a_shard_is_one_error_line(topk_cache, tmp_path):
    (tmp_path / "manifest.json").write_bytes((topk_cache / "manifest.json").read_bytes())
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 1
    assert "shard-00000.parquet: cannot read column" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


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


def _edited_teacher(teacher_dir: Path, out: Path, edit) -> Path:
    """A copy of the test teacher after ``edit(model, tokenizer)``."""
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    edit(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_teacher_giving_nan_is_refused_before_writing(teacher_dir, corpus_file, tmp_path):
    def poison(model, tokenizer):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")

    broken = _edited_teacher(teacher_dir, tmp_path / "nan-teacher", poison)
    for method in ("topk", "sample"):
        with pytest.raises(LogitcacheError, match="NaN"):
            build_cache(broken, corpus_file, tmp_path / method, method=method)
        assert not list((tmp_path / method).glob("shard-*.parquet"))


def test_a_failed_build_stops_its_tokenizer_thread(teacher_dir, corpus_file, tmp_path):
    def poison(model, tokenizer):
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")

    broken = _edited_teacher(teacher_dir, tmp_path / "nan-teacher", poison)
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
    grown = _edited_teacher(teacher_dir, tmp_path / "grown", lambda model, tokenizer: tokenizer.add_tokens(["zqzqzq"]))
    vocab = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).config.vocab_size
    with pytest.raises(LogitcacheError, match=f"has {vocab + 1} tokens but the teacher's output head only {vocab}"):
        build_cache(grown, corpus_file, tmp_path / "out", method="topk", k=4)


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


def test_head_chunks_budget_the_samplers_scratch():
    from logitcache.targets.rows import row_bytes
    from logitcache.targets.spec import TargetSpec
    from logitcache.teacher.head import head_chunk_rows

    topk, few, many = TargetSpec("topk", k=32), TargetSpec("sample", samples=50), TargetSpec("sample", samples=20_000)
    assert row_bytes(topk, 2048) == 3 * 4 * 2048
    assert row_bytes(few, 2048) < 1.5 * row_bytes(topk, 2048)  # N=50: the vocabulary-wide tensors dominate
    assert row_bytes(many, 2048) > 100 * row_bytes(topk, 2048)  # N=20k: the draws do
    assert head_chunk_rows(16, 2048, topk) == (16 << 20) // (12 * 2048)
    assert head_chunk_rows(16, 2048, many) == (16 << 20) // row_bytes(many, 2048) < head_chunk_rows(16, 2048, topk) // 100
    assert head_chunk_rows(1, 1 << 20, topk) == 1  # never 0 rows


def test_output_head_goes_through_onednn_and_matches_torch(monkeypatch):
    from types import SimpleNamespace

    from logitcache.teacher import head as teacher

    monkeypatch.delenv(teacher.ONEDNN_SWITCH, raising=False)
    calls = []
    real = teacher._onednn_linear
    monkeypatch.setattr(teacher, "_onednn_linear", lambda h, w, b=None: calls.append(h.shape) or real(h, w, b))
    onednn = teacher.onednn_usable()
    g = torch.Generator().manual_seed(0)
    for rows, hidden, vocab in ((1, 8, 5), (37, 100, 2000), (256, 128, 2048)):
        h = torch.randn(rows, hidden, generator=g)
        w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
        ours = teacher.output_head(h, w, SimpleNamespace())
        torch.testing.assert_close(ours, torch.nn.functional.linear(h, w), rtol=1e-5, atol=1e-5)
        assert calls[-1:] == ([h.shape] if onednn else [])  # the head went through oneDNN wherever it can
    made = len(calls)
    half = teacher.linear(h.bfloat16(), w.bfloat16())
    with torch.enable_grad():
        needs_grad = h.clone().requires_grad_()
        teacher.linear(needs_grad, w).sum().backward()  # the oneDNN op has no gradient: torch's linear runs
    assert needs_grad.grad is not None and half.dtype == torch.bfloat16 and len(calls) == made
    monkeypatch.setenv(teacher.ONEDNN_SWITCH, "0")
    assert torch.equal(teacher.linear(h, w), torch.nn.functional.linear(h, w)) and len(calls) == made


@pytest.mark.parametrize("broken", ["raises", "disagrees"])
def test_output_head_falls_back_when_onednn_is_unusable(monkeypatch, caplog, broken):
    from logitcache.teacher import head as teacher

    def op(hidden, weight, bias=None):
        if broken == "raises":
            raise RuntimeError("No such operator mkldnn::_linear_pointwise")
        return torch.nn.functional.linear(hidden, weight, bias) + 1.0

    monkeypatch.delenv(teacher.ONEDNN_SWITCH, raising=False)
    monkeypatch.setattr(teacher, "_onednn_linear", op)
    monkeypatch.setattr(teacher.platform, "machine", lambda: "x86_64")
    teacher.onednn_usable.cache_clear()
    try:
        h, w = torch.randn(4, 16), torch.randn(32, 16)
        assert torch.equal(teacher.linear(h, w), torch.nn.functional.linear(h, w))
        assert not teacher.onednn_usable()
        if torch.backends.mkldnn.is_available():
            assert "CPU teachers use" in caplog.text
    finally:
        teacher.onednn_usable.cache_clear()


def test_cpu_teacher_runs_its_decoder_linears_through_onednn(monkeypatch, teacher_dir):
    from transformers import AutoModelForCausalLM

    from logitcache.teacher import head as teacher
    from logitcache.teacher.hf import HFTeacher

    monkeypatch.delenv(teacher.ONEDNN_SWITCH, raising=False)
    onednn = teacher.onednn_usable()  # its probe, if it runs now, is not the model's
    calls = []
    real = teacher._onednn_linear
    monkeypatch.setattr(teacher, "_onednn_linear", lambda h, w, b=None: calls.append(w.shape) or real(h, w, b))
    ours = HFTeacher(teacher_dir, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(str(teacher_dir), local_files_only=True).eval()
    linears = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, ours.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        routed = ours.hidden_states(ids)
        reference = plain.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        logits = ours.model(input_ids=ids).logits
    torch.testing.assert_close(routed, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, plain(input_ids=ids).logits.detach(), rtol=1e-4, atol=1e-4)
    if onednn:  # every projection of the decoder and the model's lm_head went through oneDNN
        assert len(linears) > 2 and len(calls) == 2 * len(linears) - 1
    made = len(calls)
    ours.model(input_ids=ids).logits.sum().backward()  # outside inference mode with trainable weights: torch's linear
    assert len(calls) == made and all(p.grad is not None for p in ours.model.get_decoder().parameters() if p.requires_grad)
    monkeypatch.setenv(teacher.ONEDNN_SWITCH, "0")
    with torch.inference_mode():
        assert torch.equal(ours.hidden_states(ids), reference) and len(calls) == made


def test_null_text_is_an_empty_document_in_every_format(tmp_path):
    from logitcache.corpus import Corpus

    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": "b"}\n')
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        assert list(Corpus.open(tmp_path / name, "text").documents()) == ["a", "", "b"]


def test_run_build_rejects_bad_settings(teacher_dir, corpus_file, tmp_path):
    with pytest.raises(LogitcacheError, match="worker-index"):
        run_build(BuildSettings(teacher=teacher_dir, corpus=corpus_file, out=tmp_path, num_workers=2, worker_index=2))


def test_the_manifest_names_the_teacher_by_an_absolute_path(teacher_dir, monkeypatch):
    from logitcache.teacher.hf import HFTeacher

    monkeypatch.chdir(teacher_dir.parent)  # train looks the tokenizer up by this path, from wherever it runs
    assert HFTeacher(Path(teacher_dir.name), device="cpu").describe()["path"] == str(teacher_dir.resolve())
