"""The reader examples (pyarrow, datasets, polars, duckdb, spark) agree with logitcache.cache.format.read_shard.

Each example recovers the first window's targets from a cache with one tool only; on synthetic
caches of both methods (one with a tempered proposal, one without log-probabilities: format v4's
``--logprob-bits 0``) and on real builds they must match the writer's own reader exactly (the
decoded log-probabilities, or None where the cache has none) and imply the same target distribution.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import processes
import pyarrow.parquet as pq
import pytest
from spark_session import local_spark, require_java

import logitcache
from logitcache.cache.format import FORMAT_VERSION, WindowTargets, read_shard, write_shard
from logitcache.cache.layout import shard_name
from logitcache.cache.manifest import FORMAT_NAME, fingerprint, write_manifest
from logitcache.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ["read_pyarrow", "read_datasets", "read_polars", "read_duckdb", "read_spark"]
VOCAB = 64


def _teacher_logprobs(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Peaked random teacher distributions over VOCAB ids: ``[rows, VOCAB] float64`` log-probs."""
    probs = rng.dirichlet(np.full(VOCAB, 0.2), size=rows)
    return np.log(np.maximum(probs, 1e-30))


def _sparse_targets(rng: np.random.Generator, logprobs: np.ndarray, method: str, params: dict):
    """(lengths [R], ids [S], logprobs [S], tail [R] | None, counts [S] | None), descending per position."""
    if method == "topk":
        k = params["k"]
        ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(logprobs, ids, axis=1)
        rest = np.exp(logprobs).sum(axis=1) - np.exp(top).sum(axis=1)
        lengths = np.full(len(logprobs), k)
        return lengths, ids.reshape(-1), top.reshape(-1), np.log(np.maximum(rest, 1e-30)), None
    proposal = np.exp(logprobs / params["proposal_temperature"])
    proposal /= proposal.sum(axis=1, keepdims=True)
    counts = np.stack([rng.multinomial(params["samples"], q) for q in proposal])
    lengths, all_ids, all_lp, all_counts = [], [], [], []
    for row_counts, row_lp in zip(counts, logprobs):
        ids = np.flatnonzero(row_counts)
        ids = ids[np.argsort(-row_lp[ids], kind="stable")]
        lengths.append(len(ids))
        all_ids.append(ids)
        all_lp.append(row_lp[ids])
        all_counts.append(row_counts[ids])
    cat = np.concatenate
    return np.array(lengths), cat(all_ids), cat(all_lp), None, cat(all_counts)


def random_window_targets(rng: np.random.Generator, first_id: int, windows: int, seq_len: int,
                          method: str, params: dict) -> WindowTargets:
    """Valid random targets for ``windows`` windows of ``seq_len`` tokens (sequence ids from ``first_id``)."""
    positions = windows * (seq_len - 1)
    logprobs = _teacher_logprobs(rng, positions)
    input_ids = rng.integers(0, VOCAB, size=(windows, seq_len))
    gold = np.take_along_axis(logprobs, input_ids[:, 1:].reshape(-1, 1), axis=1)
    lengths, ids, lp, tail, counts = _sparse_targets(rng, logprobs, method, params)
    return WindowTargets(
        sequence_ids=np.arange(first_id, first_id + windows, dtype=np.int64),
        input_ids=input_ids.astype(np.int32),
        target_lengths=lengths.reshape(windows, seq_len - 1).astype(np.uint16),
        target_ids=ids.astype(np.int32),
        target_logprobs=lp.astype(np.float32),
        gold_logprob=gold.reshape(windows, seq_len - 1).astype(np.float32),
        tail_logprob=None if tail is None else tail.reshape(windows, seq_len - 1).astype(np.float32),
        target_counts=None if counts is None else counts.astype(np.uint16),
    )


def write_synthetic_cache(cache_dir: Path, method: str, params: dict, *, windows: int = 5,
                          seq_len: int = 7, shard_size: int = 3, seed: int = 0) -> dict:
    """A complete cache (shards, then manifest.json) of random valid targets; returns the manifest."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    identity = {"method": method, "params": params, "seq_len": seq_len, "seed": seed, "synthetic": True}
    build = fingerprint(identity)
    shards, entries = [], 0
    for index, first in enumerate(range(0, windows, shard_size)):
        rows = min(shard_size, windows - first)
        targets = random_window_targets(rng, first, rows, seq_len, method, params)
        path = cache_dir / shard_name(index)
        write_shard(path, targets, {"format_version": FORMAT_VERSION, "method": method, "params": params,
                                    "build_fingerprint": build})
        entries += int(targets.target_lengths.sum())
        shards.append({"file": path.name, "index": index, "rows": rows, "tokens": rows * seq_len,
                       "target_entries": int(targets.target_lengths.sum()), "bytes": path.stat().st_size,
                       "sha256": sha256_file(path), "first_sequence_id": first})
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "logitcache_version": logitcache.__version__,
        "fingerprint": build, "method": method, "params": params, "seq_len": seq_len, "seed": seed,
        "shard_size": shard_size, "vocab_size": VOCAB,
        "teacher": {"backend": "synthetic", "path": "", "name": "dirichlet", "dtype": "float64",
                    "fingerprint": fingerprint({"teacher": "dirichlet"}), "vocab_size": VOCAB},
        "tokenizer": {"fingerprint": fingerprint({"tokenizer": "ids"}), "vocab_size": VOCAB, "eos_token_id": None},
        "corpus": {"description": "random ids", "fingerprint": fingerprint({"seed": seed}), "text_field": None,
                   "documents": windows, "tokens": windows * seq_len, "dropped_tokens": 0},
        "totals": {"sequences": windows, "tokens": windows * seq_len, "positions": windows * (seq_len - 1),
                   "target_entries": entries, "bytes": sum(s["bytes"] for s in shards)},
        "shards": shards,
    }
    write_manifest(cache_dir, manifest)
    return manifest


CACHES = {
    "topk": ("topk", {"k": 5}),
    "sample": ("sample", {"samples": 16, "proposal_temperature": 1.0}),
    "sample-tempered": ("sample", {"samples": 16, "proposal_temperature": 2.0}),
    # format v4: write_shard drops target_logprobs (ids and counts only)
    "sample-ids-only": ("sample", {"samples": 16, "proposal_temperature": 1.0, "logprob_bits": 0}),
}


@pytest.fixture(scope="module", params=[*CACHES, "topk_cache", "sample_cache", "ids_only_cache"])
def example_cache(request, tmp_path_factory) -> Path:
    """A synthetic cache, or a real build from a tiny teacher (the conftest fixtures)."""
    if request.param not in CACHES:
        return request.getfixturevalue(request.param)
    cache_dir = tmp_path_factory.mktemp(request.param)
    write_synthetic_cache(cache_dir, *CACHES[request.param])
    return cache_dir


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_first_window(cache_dir: Path) -> list[dict]:
    """The first window's targets per position, from the writer's own reader."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    targets = read_shard(cache_dir / manifest["shards"][0]["file"])
    lengths = targets.target_lengths[0].astype(np.int64)
    ends = np.cumsum(lengths)
    tau = manifest["params"].get("proposal_temperature", 1.0)
    rows = []
    for t, (start, end) in enumerate(zip(ends - lengths, ends)):
        logprobs = None if targets.target_logprobs is None else targets.target_logprobs[start:end]
        row = {"gold_id": int(targets.input_ids[0, t + 1]), "gold_logprob": targets.gold_logprob[0, t],
               "ids": targets.target_ids[start:end], "logprobs": logprobs}
        if targets.method == "topk":
            row["tail_logprob"] = targets.tail_logprob[0, t]
            row["probs"] = np.exp(logprobs.astype(np.float64))
        else:
            counts = targets.target_counts[start:end].astype(np.float64)
            row["counts"] = targets.target_counts[start:end]
            if tau == 1:  # also a cache without log-probabilities (always tau = 1)
                row["probs"] = counts / manifest["params"]["samples"]
            else:
                weights = counts * np.exp(logprobs.astype(np.float64) * (1 - 1 / tau))
                row["probs"] = weights / weights.sum()
        rows.append(row)
    return rows


def _same_float32(got, expected) -> bool:
    """Equal as float32 (every decoded code is a float32; the examples may hold it in float64)."""
    return np.array_equal(np.asarray(got, dtype=np.float32), np.asarray(expected, dtype=np.float32))


@pytest.fixture(scope="module")
def spark():
    """The Spark example's ``getOrCreate`` joins this session, whose JVM is stopped after the module."""
    with local_spark() as session:
        yield session


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_recovers_the_writers_targets(example, example_cache, capsys, request):
    if example == "read_spark":
        request.getfixturevalue("spark")
    module = _load_example(example)
    got = module.first_window_targets(example_cache)
    expected = _expected_first_window(example_cache)
    assert [row["position"] for row in got] == list(range(len(expected)))
    for row, want in zip(got, expected):
        assert row["gold_id"] == want["gold_id"]
        assert _same_float32(row["gold_logprob"], want["gold_logprob"])
        np.testing.assert_array_equal(row["ids"], want["ids"])
        if want["logprobs"] is None:
            assert row["logprobs"] is None
        else:
            assert _same_float32(row["logprobs"], want["logprobs"])
        np.testing.assert_allclose(row["probs"], want["probs"], rtol=1e-12, atol=0)
        if "tail_logprob" in want:
            assert _same_float32(row["tail_logprob"], want["tail_logprob"])
            assert "counts" not in row
        else:
            np.testing.assert_array_equal(row["counts"], want["counts"])
            assert row["probs"].sum() == pytest.approx(1.0)
    module.print_table(got)
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(expected)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_script_runs(example, tmp_path):
    if example == "read_spark":
        require_java()
    cache_dir = tmp_path / "cache"
    write_synthetic_cache(cache_dir, *CACHES["sample-tempered"])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = processes.run([sys.executable, f"examples/{example}.py", str(cache_dir)], cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gold_id" in result.stdout


def test_synthetic_manifest_follows_the_published_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "schemas" / "manifest.schema.json").read_text())
    for name, (method, params) in CACHES.items():
        jsonschema.validate(write_synthetic_cache(tmp_path / name, method, params), schema)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_refuses_an_unknown_format_version(example, tmp_path):
    manifest = write_synthetic_cache(tmp_path, *CACHES["topk"], windows=1)
    write_manifest(tmp_path, {**manifest, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match=r"format version \(2, 3, 4\)"):
        _load_example(example).first_window_targets(tmp_path)


@pytest.mark.parametrize("kind", ["sample-ids-only", "ids_only_cache"])
def test_ids_only_caches_have_no_target_logprobs(kind, tmp_path, request):
    """The caches that exercise the examples' no-log-probabilities path really lack the column."""
    if kind in CACHES:
        write_synthetic_cache(tmp_path, *CACHES[kind])
        cache_dir = tmp_path
    else:
        cache_dir = request.getfixturevalue(kind)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["params"]["logprob_bits"] == 0
    assert manifest["params"].get("proposal_temperature", 1.0) == 1.0
    for shard in manifest["shards"]:
        assert "target_logprobs" not in pq.read_schema(cache_dir / shard["file"]).names
