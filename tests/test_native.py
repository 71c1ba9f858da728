"""The compiled CPU target kernels (logitcache/native_targets.c) against the torch reference in
logitcache.targets: the same top-k and tails, the same draws up to float32 rounding, exact sampling
on their own, and the torch fallback when they cannot be built."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from test_sampling import chi2_sf

from logitcache.loader import collate as collating
from logitcache.native import library as native
from logitcache.targets import kernels
from logitcache.targets.rng import row_keys
from logitcache.targets.rows import row_targets
from logitcache.targets.sample import _block_size, sample_targets
from logitcache.targets.spec import TargetSpec
from logitcache.targets.topk import RowTargets

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch path is the only one here")


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def labels_for(rows: int, vocab: int) -> torch.Tensor:
    return torch.arange(rows) * 7919 % vocab


def keys_for(rows: int, seed: int = 0) -> torch.Tensor:
    return row_keys(seed, torch.arange(rows), torch.arange(rows) % 97)


def reference_tail(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the softmax mass outside ``ids``, in float64."""
    lp = torch.log_softmax(logits.double(), -1)
    return torch.logsumexp(lp.scatter(1, ids.long(), float("-inf")), -1)


@pytest.mark.parametrize("vocab,k", [(2048, 32), (3001, 32), (1000, 8), (200, 1), (64, 64), (40_000, 300), (5000, 600)])
def test_topk_matches_torch(vocab, k):
    """Same ids (distinct logits), log-softmax to float32 rounding, the tail and gold log-probabilities;
    covers vocabularies that are not block multiples, k = V, and the heap path (k over 256 candidates)."""
    rows = 64
    z = random_logits(rows, vocab, seed=vocab + k)
    labels = labels_for(rows, vocab)
    ids, logprobs, tail, gold = kernels.topk(z, labels, k)
    lp = torch.log_softmax(z.double(), -1)
    values, expected = torch.topk(z, k)
    # torch orders equal logits arbitrarily (float32 randn collides at this size); ours by lower id
    assert torch.equal(z.gather(1, ids.long()), values)
    assert all(len(set(row)) == k for row in ids.tolist())
    tied = values[:, 1:] == values[:, :-1]
    assert torch.all(ids[:, 1:][tied] > ids[:, :-1][tied])
    assert torch.equal(ids.long()[~tied.any(1)], expected[~tied.any(1)])
    torch.testing.assert_close(logprobs.double(), lp.gather(1, ids.long()), rtol=0, atol=2e-5)
    assert torch.all(logprobs[:, 1:] <= logprobs[:, :-1])
    if k < vocab:
        torch.testing.assert_close(tail.double(), reference_tail(z, ids), rtol=0, atol=1e-4)
    else:
        assert torch.all(tail == float("-inf"))
    torch.testing.assert_close(gold.double(), lp.gather(1, labels[:, None])[:, 0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("bump", [18.0, 110.0])
def test_topk_tail_is_accurate_when_tiny(bump):
    """Peaked rows get their tail summed directly, not as 1 - covered: tails of e^-9 .. e^-21, and of
    ~e^-100, far below what float32 exp(x - max) can hold."""
    vocab, rows = 2048, 32
    z = random_logits(rows, vocab, seed=5, scale=1.0)
    z[:, :4] += torch.linspace(bump, bump + 12, rows)[:, None]  # four ids take almost all the mass
    ids, _, tail, _ = kernels.topk(z, labels_for(rows, vocab), 4)
    expected = reference_tail(z, ids)
    assert expected.max() < math.log(1e-4)
    torch.testing.assert_close(tail.double(), expected, rtol=1e-4, atol=0)


def test_topk_ties_and_masked_logits():
    """Equal logits rank by lower id (the tail counts the tied ids left out); -inf logits (a masked
    vocabulary) are ranked last and carry no mass; rows with fewer finite ids than k fill with -inf."""
    z = torch.zeros(3, 400)
    z[0, 100:110] = 1.0  # ten tied at the top, k = 4 keeps the first four
    z[1, 3:] = float("-inf")  # only ids 0..2 are finite
    z[2, :] = float("-inf")
    z[2, 7] = 0.0
    ids, logprobs, tail, gold = kernels.topk(z, torch.tensor([105, 2, 7]), 4)
    assert ids[0].tolist() == [100, 101, 102, 103]
    torch.testing.assert_close(tail[0].double(), reference_tail(z[:1], ids[:1])[0], rtol=0, atol=1e-5)
    assert ids[1, :3].tolist() == [0, 1, 2] and logprobs[1, 3] == float("-inf")
    assert tail[1] == float("-inf") and logprobs[2, 0] == 0.0 and gold[2] == 0.0


def test_nan_logits_give_nan_results():
    """A NaN (or +inf) logit makes the row's results NaN, which the build refuses to write."""
    z = random_logits(3, 512, seed=1)
    z[0, 17] = float("nan")
    z[1, 3] = float("inf")
    labels = labels_for(3, 512)
    _, logprobs, _, gold = kernels.topk(z, labels, 8)
    assert torch.isnan(logprobs[:2]).all() and torch.isnan(gold[:2]).all() and torch.isfinite(logprobs[2]).all()
    _, logprobs, _, _, gold = kernels.sample(z, labels, keys_for(3), 20, 1.0, 8)
    assert torch.isnan(gold[:2]).all() and torch.isfinite(gold[2])


def test_labels_outside_the_vocabulary_are_refused():
    z, labels = random_logits(3, 100, seed=0), torch.tensor([3, 100, -1])
    with pytest.raises(ValueError, match="2 labels lie outside"):
        kernels.topk(z, labels, 4)
    with pytest.raises(ValueError, match="2 labels lie outside"):
        kernels.sample(z, labels, keys_for(3), 10, 1.0, 8)


@pytest.mark.parametrize("call", [
    lambda z, y, key: kernels.topk(z, y, 0),
    lambda z, y, key: kernels.topk(z, y, 101),
    lambda z, y, key: kernels.topk(z, y[:2], 4),
    lambda z, y, key: kernels.sample(z, y, key[:2], 10, 1.0, 8),
    lambda z, y, key: kernels.sample(z, y, key, 0, 1.0, 8),
    lambda z, y, key: kernels.sample(z, y, key, 10, 1.0, 0),
    lambda z, y, key: kernels.sample(z, y, key, 10, 0.0, 8),
    lambda z, y, key: kernels.topk(z[0], y, 4),
])
def test_bad_arguments_are_refused_before_the_c_code(call):
    """The C side trusts its arguments: k outside [1, V], short labels or keys, n, block or temperature
    below 1 or 0, and a 1-D row are refused in Python (ASan found the out-of-bounds reads)."""
    with pytest.raises(ValueError):
        call(random_logits(3, 100, seed=0), torch.tensor([1, 2, 3]), keys_for(3))


def test_no_rows():
    ids, _, _, gold = kernels.topk(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long), 5)
    assert ids.shape == (0, 5) and gold.shape == (0,)
    assert kernels.sample(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long), keys_for(0), 5, 1.0, 8)[3].shape == (0,)


@pytest.mark.parametrize("vocab,n,temperature", [(2048, 50, 1.0), (3001, 50, 1.0), (500, 200, 0.7), (12, 5, 1.5)])
def test_sample_matches_torch(vocab, n, temperature):
    """Draws equal the torch sampler's for the same keys except where float32 rounding moves a
    boundary (a few rows in 10^4); counts, order and padding follow sample_targets."""
    rows = 2000
    z = random_logits(rows, vocab, seed=vocab)
    labels, keys = labels_for(rows, vocab), keys_for(rows)
    ids, logprobs, counts, lengths, gold = kernels.sample(z, labels, keys, n, temperature, _block_size(vocab, n))
    lp = torch.log_softmax(z.double(), -1)
    expected = sample_targets(lp.float(), keys, n, temperature)
    same = (ids.long() == expected.ids).all(1) & (counts.long() == expected.counts).all(1) & (lengths.long() == expected.lengths)
    assert same.float().mean() >= 0.995, int((~same).sum())
    real = torch.arange(n)[None, :] < lengths[:, None]
    assert torch.equal(counts.sum(1), torch.full((rows,), n, dtype=torch.int32))
    assert torch.all(counts[real] > 0) and torch.all(counts[~real] == 0) and torch.all(ids[~real] == 0)
    assert torch.all(logprobs[~real] == float("-inf"))
    torch.testing.assert_close(logprobs[real].double(), lp.gather(1, ids.long())[real], rtol=0, atol=2e-5)
    assert torch.all(logprobs[:, 1:][real[:, 1:]] <= logprobs[:, :-1][real[:, 1:]])
    torch.testing.assert_close(gold.double(), lp.gather(1, labels[:, None])[:, 0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_native_draws_follow_the_softmax(temperature):
    """Pooled counts over 40k rows of one distribution pass a chi-square test against softmax(z/T)."""
    vocab, rows, n = 300, 40_000, 10
    z = random_logits(1, vocab, seed=11, scale=2.0).expand(rows, -1).contiguous()
    ids, _, counts, _, _ = kernels.sample(z, labels_for(rows, vocab), keys_for(rows, seed=3), n, temperature, 8)
    observed = torch.bincount(ids.flatten().long(), weights=counts.flatten().double(), minlength=vocab)
    expected = torch.softmax(z[0].double() / temperature, -1) * rows * n
    big = expected >= 5
    stat = float((((observed - expected) ** 2 / expected)[big]).sum())
    rest_o, rest_e = observed[~big].sum(), expected[~big].sum()
    stat += float((rest_o - rest_e) ** 2 / rest_e) if rest_e > 0 else 0.0
    assert chi2_sf(stat, int(big.sum()) - (0 if rest_e > 0 else 1)) > 1e-4, stat


def test_zero_weight_ids_are_never_drawn():
    """-inf logits (and ids whose weight underflows) are never drawn, even in the last block."""
    vocab, rows = 1000, 500
    z = torch.full((rows, vocab), float("-inf"))
    z[:, [0, 999, 500]] = torch.tensor([0.0, 1.0, -1.0])
    ids, _, counts, lengths, _ = kernels.sample(z, labels_for(rows, 3) * 0, keys_for(rows), 30, 1.0, 16)
    drawn = set(ids[torch.arange(30)[None, :] < lengths[:, None]].tolist())
    assert drawn <= {0, 999, 500} and counts.sum() == rows * 30


def test_results_do_not_depend_on_the_chunk():
    """Row r's results depend on its logits and key only, not on which rows share its call."""
    z = random_logits(300, 700, seed=2)
    labels, keys = labels_for(300, 700), keys_for(300)
    whole = kernels.sample(z, labels, keys, 40, 1.0, 8)
    parts = [kernels.sample(z[s:s + 77], labels[s:s + 77], keys[s:s + 77], 40, 1.0, 8) for s in range(0, 300, 77)]
    for got, pieces in zip(whole, zip(*parts)):
        assert torch.equal(got, torch.cat(pieces))
    whole = kernels.topk(z, labels, 16)
    parts = [kernels.topk(z[s:s + 77], labels[s:s + 77], 16) for s in range(0, 300, 77)]
    for got, pieces in zip(whole, zip(*parts)):
        assert torch.equal(got, torch.cat(pieces))


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_row_targets_uses_the_kernels_and_agrees_with_torch(method, monkeypatch):
    """row_targets on CPU float32 goes to the kernels (int32 ids); with LOGITCACHE_NATIVE=0 it takes the
    torch path, and the two give the same targets."""
    z = random_logits(500, 1024, seed=4)
    labels, keys = labels_for(500, 1024), keys_for(500)
    spec = TargetSpec(method, k=16, samples=30)
    fast, fast_gold = row_targets(z.clone(), labels, keys, spec)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.library.cache_clear()
    try:
        slow, slow_gold = row_targets(z.clone(), labels, keys, spec)
    finally:
        monkeypatch.delenv(native.ENV_SWITCH)
        native.library.cache_clear()
    assert fast.ids.dtype == torch.int32 and slow.ids.dtype == torch.int64
    same = (fast.ids.long() == slow.ids).all(1)
    assert same.float().mean() >= 0.99
    torch.testing.assert_close(fast_gold, slow_gold, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.logprobs[same], slow.logprobs[same], rtol=0, atol=2e-5)
    if method == "topk":
        torch.testing.assert_close(fast.tail_logprob, slow.tail_logprob, rtol=0, atol=1e-4)
    else:
        assert torch.equal(fast.counts[same].long(), slow.counts[same]) and torch.equal(fast.lengths.long()[same], slow.lengths[same])


@pytest.mark.parametrize("compiler", ["false", "true"])
def test_a_failing_compiler_falls_back_to_torch(compiler, tmp_path, monkeypatch, caplog):
    """A compiler that fails, or exits 0 without writing a library (CC=true), leaves the torch path in
    charge with a note saying so, and nothing in the cache."""
    monkeypatch.setenv("LOGITCACHE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="logitcache.native"):
            assert native.library() is None
            assert not native.usable(torch.zeros(2, 8))
        assert "building targets with torch" in caplog.text
        assert list(tmp_path.iterdir()) == []
    finally:
        native.library.cache_clear()


def test_compiles_into_the_cache_folder_once(tmp_path, monkeypatch):
    """A cold cache compiles once into LOGITCACHE_CACHE_DIR (readable by all); later loads reuse the
    file; an empty or foreign file in its place is rebuilt, not loaded."""
    monkeypatch.setenv("LOGITCACHE_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.glob("native_targets-*.so"))
        assert len(built) == 1 and built[0].stat().st_mode & 0o755 == 0o755
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp
        for junk in (b"", b"not a library at all"):
            built[0].unlink()  # a new file: truncating the loaded library in place would crash this process
            built[0].write_bytes(junk)
            native.library.cache_clear()
            assert native.library() is not None and built[0].read_bytes()[:4] == native.ELF_MAGIC
        assert [p.name for p in tmp_path.iterdir()] == [built[0].name]
    finally:
        native.library.cache_clear()


def test_gpu_and_half_rows_stay_on_torch():
    assert not native.usable(torch.zeros(2, 8, dtype=torch.bfloat16))
    targets, gold = row_targets(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long), keys_for(4),
                                TargetSpec("topk", k=2))
    assert isinstance(targets, RowTargets) and targets.ids.dtype == torch.int64 and np.allclose(gold, -math.log(8))


def test_dense_rows_lays_out_flat_columns_and_refuses_what_does_not_add_up():
    lengths = np.array([[2, 0], [1, 3]], dtype=np.uint16)
    ids = np.arange(1, 7, dtype=np.int32)
    logprobs, weights = -np.arange(6, dtype=np.float32), np.linspace(0.1, 0.6, 6, dtype=np.float32)
    covered = np.exp(logprobs.astype(np.float64))
    dense_ids, dense_logprobs, dense_weights, mask, mass = collating.dense_rows(lengths, 3, ids, logprobs, weights, covered)
    assert dense_ids.tolist() == [[[1, 2, 0], [0, 0, 0]], [[3, 0, 0], [4, 5, 6]]] and dense_ids.dtype == np.int64
    assert mask.tolist() == [[[True, True, False], [False] * 3], [[True, False, False], [True] * 3]]
    assert dense_logprobs[1, 1].tolist() == [-3.0, -4.0, -5.0] and dense_weights[0, 1].tolist() == [0.0] * 3
    assert mass.tolist() == [[covered[0] + covered[1], 0.0], [covered[2], covered[3] + covered[4] + covered[5]]]
    assert len(collating.dense_rows(lengths, 3, ids, logprobs, weights)) == 4  # no covered: no mass
    empty = collating.dense_rows(np.zeros((0, 4), np.uint16), 0, ids[:0], logprobs[:0], weights[:0])
    assert empty[0].shape == (0, 4, 0)
    # a position wider than the rows; short columns; columns not flat (the C side would read past them)
    for bad in ({"width": 2}, {"ids": ids[:5]}, {"covered": covered[:5]}, {"ids": np.zeros((6, 0), np.int32)},
                {"logprobs": logprobs.reshape(3, 2)}, {"width": -1}):
        args = {"width": 3, "ids": ids, "logprobs": logprobs, "weights": weights, "covered": covered} | bad
        with pytest.raises(ValueError):
            collating.dense_rows(lengths, **args)
    for bad_lengths in (np.array([[-65530, 0], [1, 3]]), lengths.astype(np.float32), np.array([[2, 0], [1, 70000]])):
        with pytest.raises(ValueError, match="lengths must be integers"):
            collating.dense_rows(bad_lengths, 3, ids, logprobs, weights)
