"""``logitcache export``: the exported rows reproduce the cache's targets; bad input is refused; writes are crash-safe.

``--to hf`` must give back every stored value exactly (float16 log-probs as float32). ``--to axolotl``
must keep each window's ids and give, per position, the stored distribution normalised over its ids:
top-k renormalised, sample counts as logitcache's own RS-KD weights (``losses.sparse.rs_kd_log_weights``).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import all_targets, build_cache, run_cli
from datasets import load_from_disk
from test_examples import CACHES, write_synthetic_cache

from logitcache.cache.export import PAD_LOGPROB, export_cache
from logitcache.cache.format import WindowTargets
from logitcache.cache.manifest import read_manifest
from logitcache.errors import LogitcacheError
from logitcache.losses.sparse import Rows, masked_log_softmax, rs_kd_log_weights

FLOAT32_LOGPROB_ERROR = 2e-6  # float64 arithmetic rounded once to float32, on log-probs of magnitude < 16


@pytest.fixture(scope="module", params=["topk_cache", "sample_cache", "ids_only_cache", "sample-tempered", "documents"])
def cache(request, tmp_path_factory):
    """The conftest's real builds (a sample cache with and without log-probabilities), a synthetic sample cache
    drawn from a tempered proposal (tau = 2), and a real build with a row per document (rows of different lengths)."""
    if request.param == "documents":
        folder = tmp_path_factory.mktemp("documents") / "cache"
        build_cache(request.getfixturevalue("teacher_dir"), request.getfixturevalue("corpus_file"), folder,
                    packing="documents", method="sample", samples=16)
        return folder
    if request.param in CACHES:
        folder = tmp_path_factory.mktemp("synthetic")
        write_synthetic_cache(folder, *CACHES[request.param], windows=7, seq_len=9)
        return folder
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def exported(cache, tmp_path_factory):
    """layout → the exported dataset's rows by sequence id."""
    out = tmp_path_factory.mktemp("export")
    rows = {}
    for layout in ("hf", "axolotl"):
        export_cache(cache, out / layout, layout)
        rows[layout] = {row["sequence_id"]: row for row in load_from_disk(str(out / layout)).with_format("numpy")}
    return rows


def windows(cache) -> list[tuple[int, np.ndarray, list[tuple[int, int]], WindowTargets]]:
    """(sequence id, input ids, each position's (start, end) entry span, the window's shard targets) per window."""
    targets = all_targets(cache)
    ends = np.cumsum(targets.target_lengths.reshape(-1).astype(np.int64))
    spans = list(zip((ends - targets.target_lengths.reshape(-1)).tolist(), ends.tolist()))
    positions, tokens = targets.target_lengths.shape[1], targets.tokens()
    return [(int(sid), targets.input_ids[b, : tokens[b]], spans[b * positions : b * positions + tokens[b] - 1], targets)
            for b, sid in enumerate(targets.sequence_ids)]


def test_hf_export_keeps_every_stored_value(cache, exported):
    rows = exported["hf"]
    assert len(rows) == read_manifest(cache)["totals"]["sequences"]
    for b, (sid, input_ids, spans, targets) in enumerate(windows(cache)):
        row = rows[sid]
        np.testing.assert_array_equal(row["input_ids"], input_ids)
        assert len(row["target_ids"]) == len(spans) == len(input_ids) - 1
        for t, (start, end) in enumerate(spans):
            np.testing.assert_array_equal(row["target_ids"][t], targets.target_ids[start:end])
            if targets.target_logprobs is not None:
                np.testing.assert_array_equal(row["target_logprobs"][t], targets.target_logprobs[start:end].astype(np.float32))
            if targets.method == "sample":
                np.testing.assert_array_equal(row["target_counts"][t], targets.target_counts[start:end])
        np.testing.assert_array_equal(row["gold_logprob"], targets.gold_logprob[b, : len(spans)].astype(np.float32))
        if targets.method == "topk":
            np.testing.assert_array_equal(row["tail_logprob"], targets.tail_logprob[b, : len(spans)].astype(np.float32))
        assert ("tail_logprob" in row) == (targets.method == "topk") != ("target_counts" in row)
        assert ("target_logprobs" in row) == (targets.target_logprobs is not None)


def reference_logprobs(targets: WindowTargets, start: int, end: int, tau: float) -> np.ndarray:
    """What the position's axolotl log-probs must be: top-k log-softmax, or RS-KD's normalised log weights."""
    if targets.target_logprobs is None:  # a sample cache without them: tau = 1, the weights are count / N
        logprobs = torch.full((1, end - start), math.nan, dtype=torch.float64)
    else:
        logprobs = torch.from_numpy(targets.target_logprobs[start:end].astype(np.float64))[None]
    if targets.method == "topk":
        return torch.log_softmax(logprobs, dim=-1)[0].numpy()
    counts = torch.from_numpy(targets.target_counts[start:end].astype(np.float64))[None]
    k = counts.shape[1]
    rows = Rows(ids=torch.zeros(1, k, dtype=torch.int64), mask=torch.ones(1, k, dtype=torch.bool), logprobs=logprobs,
                weights=counts / counts.sum(), tail_logprob=torch.zeros(1), labels=torch.zeros(1, dtype=torch.int64))
    return masked_log_softmax(rs_kd_log_weights(rows, tau), rows.mask)[0].numpy()


def test_axolotl_export_is_the_normalised_stored_distribution(cache, exported):
    rows = exported["axolotl"]
    tau = read_manifest(cache)["params"].get("proposal_temperature", 1.0)
    for sid, input_ids, spans, targets in windows(cache):
        row = rows[sid]
        np.testing.assert_array_equal(row["input_ids"], input_ids)
        np.testing.assert_array_equal(row["labels"], input_ids)
        assert (row["attention_mask"] == 1).all() and len(row["attention_mask"]) == len(input_ids)
        assert len(row["target_token_ids"]) == len(row["target_logprobs"]) == len(row["target_mask"]) == len(input_ids)
        for t, (start, end) in enumerate(spans):
            np.testing.assert_array_equal(row["target_token_ids"][t], targets.target_ids[start:end])
            assert (row["target_mask"][t] == 1).all()
            np.testing.assert_allclose(row["target_logprobs"][t], reference_logprobs(targets, start, end, tau),
                                       rtol=0, atol=FLOAT32_LOGPROB_ERROR)
            assert np.exp(row["target_logprobs"][t].astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)
        # The last input token has no next token: one padding entry, masked, as axolotl's collator pads.
        assert row["target_token_ids"][-1].tolist() == [0] and row["target_mask"][-1].tolist() == [0]
        assert row["target_logprobs"][-1].tolist() == [np.float32(PAD_LOGPROB)]


def test_axolotl_sample_targets_are_the_draw_frequencies_at_tau_1(sample_cache, tmp_path):
    export_cache(sample_cache, tmp_path / "out", "axolotl")
    samples = read_manifest(sample_cache)["params"]["samples"]
    by_id = {row["sequence_id"]: row for row in load_from_disk(str(tmp_path / "out")).with_format("numpy")}
    for sid, _, spans, targets in windows(sample_cache)[:3]:
        for t, (start, end) in enumerate(spans):
            frequencies = np.exp(by_id[sid]["target_logprobs"][t].astype(np.float64))
            np.testing.assert_allclose(frequencies * samples, targets.target_counts[start:end], rtol=1e-5)


def test_export_cli_writes_the_dataset_and_says_so(topk_cache, tmp_path):
    result = run_cli("export", str(topk_cache), "--to", "hf", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 0, result.stderr
    sequences = read_manifest(topk_cache)["totals"]["sequences"]
    assert f"exported {sequences} windows (topk)" in result.stdout.replace("\n", " ")
    assert len(load_from_disk(str(tmp_path / "out"))) == sequences


def test_bad_export_input_is_one_clear_line(topk_cache, tmp_path):
    result = run_cli("export", str(topk_cache), "--to", "trl", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown export layout 'trl'; choose one of axolotl, hf"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("not a cache", "manifest.json not found"),
    ("out exists", "already exists; choose another --out or pass --overwrite"),
    ("out inside the cache", "overlaps the cache"),
    ("out is the cache", "overlaps the cache"),
    ("out is a file", "is a file, not a folder"),
])
def test_export_refuses_bad_input(case, message, topk_cache, tmp_path):
    cache, out, overwrite = topk_cache, tmp_path / "out", False
    if case == "not a cache":
        cache = tmp_path
    elif case == "out exists":
        out.mkdir()
    elif case == "out inside the cache":
        out, overwrite = topk_cache / "export", True
    elif case == "out is the cache":
        out, overwrite = topk_cache, True
    else:
        out.write_text("a file")
        overwrite = True
    before = sorted(p.name for p in topk_cache.iterdir())
    with pytest.raises(LogitcacheError, match=message):
        export_cache(cache, out, "hf", overwrite=overwrite)
    assert sorted(p.name for p in topk_cache.iterdir()) == before


def test_a_failed_export_leaves_the_previous_one_and_no_temporaries(topk_cache, tmp_path):
    out = tmp_path / "exports" / "out"
    export_cache(topk_cache, out, "hf")
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    damaged = tmp_path / "damaged"
    shutil.copytree(topk_cache, damaged)
    last = damaged / read_manifest(damaged)["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(LogitcacheError, match="not a readable shard"):
        export_cache(damaged, out, "axolotl", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_export_reports_progress_for_every_window(sample_cache, tmp_path):
    done = []
    about = export_cache(sample_cache, tmp_path / "out", "hf", progress=done.append)
    manifest = read_manifest(sample_cache)
    assert sum(done) == about["sequences"] == manifest["totals"]["sequences"]
    assert len(done) == len(manifest["shards"])
