"""Sparse targets (logitcache/targets/). The RS-KD sampler: exact (chi-square against the softmax),
unbiased, and a pure function of (seed, sequence_id, position); top-k tails; row_targets on raw logits.
The compiled CPU kernels (targets/kernels.py) against the torch reference: the same top-k and tails,
the same draws up to float32 rounding, exact sampling on their own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import needs_compiler

from logitcache.native import library as native
from logitcache.targets import kernels
from logitcache.targets.rng import row_keys, uniforms
from logitcache.targets.rows import row_targets
from logitcache.targets.sample import _block_size, draw, sample_targets
from logitcache.targets.spec import TargetSpec
from logitcache.targets.topk import TAIL_EXACT_BELOW, RowTargets, topk_targets


def chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution (Wilson–Hilferty normal approximation)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def logits(v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("vocab,temperature", [(12, 1.0), (300, 1.0), (1000, 0.7)])
def test_draws_follow_the_softmax(vocab, temperature):
    """Pooled draws over 40k rows pass a chi-square goodness-of-fit test against softmax(z/T)."""
    z = logits(vocab, seed=vocab)
    lp = torch.log_softmax(z, -1).expand(40_000, -1).contiguous()
    keys = row_keys(7, torch.arange(40_000), torch.zeros(40_000, dtype=torch.long))
    ids = draw(lp, keys, 10, temperature)
    observed = torch.bincount(ids.flatten(), minlength=vocab).double()
    expected = torch.softmax(z.double() / temperature, -1) * ids.numel()
    # Pool categories with small expectations so the chi-square approximation holds.
    big = expected >= 5
    stat = float((((observed - expected) ** 2 / expected)[big]).sum())
    rest_o, rest_e = observed[~big].sum(), expected[~big].sum()
    if rest_e > 0:
        stat += float((rest_o - rest_e) ** 2 / rest_e)
    dof = int(big.sum()) - (0 if rest_e > 0 else 1)
    assert chi2_sf(stat, dof) > 1e-4, (stat, dof)


def test_a_wrong_distribution_is_detected():
    """The chi-square check has power: draws from a slightly different softmax fail it."""
    z = logits(12, seed=3)
    lp = torch.log_softmax(z * 1.1, -1).expand(40_000, -1).contiguous()
    keys = row_keys(7, torch.arange(40_000), torch.zeros(40_000, dtype=torch.long))
    observed = torch.bincount(draw(lp, keys, 10).flatten(), minlength=12).double()
    expected = torch.softmax(z.double(), -1) * observed.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, 11) < 1e-6


def test_counts_estimate_is_unbiased():
    """Mean of count/N over many positions equals the teacher probabilities."""
    z = logits(50, seed=1)
    rows = 20_000
    lp = torch.log_softmax(z, -1).expand(rows, -1).contiguous()
    t = sample_targets(lp, row_keys(0, torch.arange(rows), torch.zeros(rows, dtype=torch.long)), 50)
    estimate = torch.zeros(rows, 50, dtype=torch.float64).scatter_add_(1, t.ids, t.counts.double() / 50).mean(0)
    truth = torch.softmax(z.double(), -1)
    stderr = torch.sqrt(truth * (1 - truth) / (50 * rows))
    assert torch.all((estimate - truth).abs() < 5 * stderr + 1e-9)


def test_sample_targets_structure():
    lp = torch.log_softmax(torch.randn(64, 200, generator=torch.Generator().manual_seed(0)) * 3, -1)
    t = sample_targets(lp, row_keys(1, torch.arange(64), torch.arange(64)), 50)
    assert torch.all(t.counts.sum(1) == 50)
    width = t.ids.shape[1]
    real = torch.arange(width)[None] < t.lengths[:, None]
    assert torch.all((t.counts > 0) == real)
    for r in range(64):
        ids = t.ids[r, : t.lengths[r]]
        assert len(set(ids.tolist())) == len(ids)
        assert torch.equal(t.logprobs[r, : t.lengths[r]], lp[r, ids])
        assert torch.all(t.logprobs[r, : t.lengths[r]].diff() <= 0)


def test_draws_depend_only_on_seed_sequence_and_position():
    """The same (seed, sequence_id, position) gives the same draws whatever the chunking or row order."""
    gen = torch.Generator().manual_seed(5)
    lp = torch.log_softmax(torch.randn(96, 400, generator=gen) * 2, -1)
    seq = torch.randint(0, 10_000, (96,), generator=gen)
    pos = torch.randint(0, 512, (96,), generator=gen)
    whole = draw(lp, row_keys(3, seq, pos), 50)
    chunked = torch.cat([draw(lp[i : i + 7], row_keys(3, seq[i : i + 7], pos[i : i + 7]), 50) for i in range(0, 96, 7)])
    perm = torch.randperm(96, generator=gen)
    shuffled = draw(lp[perm], row_keys(3, seq[perm], pos[perm]), 50)
    assert torch.equal(whole, chunked)
    assert torch.equal(whole[perm], shuffled)
    assert not torch.equal(whole, draw(lp, row_keys(4, seq, pos), 50))


def test_uniforms_are_uniform_and_distinct_per_draw():
    u = uniforms(row_keys(0, torch.arange(20_000), torch.zeros(20_000, dtype=torch.long)), 5)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1).double()
    expected = u.numel() / 20
    assert chi2_sf(float(((counts - expected) ** 2 / expected).sum()), 19) > 1e-4
    assert float(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]).__abs__() < 0.05


def test_zero_probability_ids_are_never_drawn():
    lp = torch.full((1000, 64), float("-inf"))
    lp[:, [3, 40]] = math.log(0.5)
    ids = draw(lp, row_keys(0, torch.arange(1000), torch.zeros(1000, dtype=torch.long)), 50)
    assert set(ids.unique().tolist()) == {3, 40}


def test_topk_tail_is_the_mass_outside():
    lp = torch.log_softmax(torch.randn(8, 100, generator=torch.Generator().manual_seed(2)) * 4, -1)
    t = topk_targets(lp, 5)
    covered = t.logprobs.exp().sum(1)
    torch.testing.assert_close(t.tail_logprob.exp() + covered, torch.ones(8), rtol=0, atol=1e-5)
    assert torch.all(t.logprobs.diff(dim=1) <= 0)


def test_topk_tail_is_exact_for_flat_and_peaked_rows():
    """The float64 shortcut and the exact path for rows whose top-k cover > 99.9 %: both match logsumexp of the rest."""
    gen = torch.Generator().manual_seed(4)
    scale = torch.logspace(-1, 1.5, 256)[:, None]  # from nearly uniform to one id with almost all the mass
    lp = torch.log_softmax(torch.randn(256, 500, generator=gen) * scale, -1)
    t = topk_targets(lp.clone(), 8, inplace=True)
    exact = torch.logsumexp(lp.scatter(-1, t.ids, float("-inf")), -1)
    close = t.tail_logprob < TAIL_EXACT_BELOW
    assert 10 < int(close.sum()) < 246  # both paths are exercised
    torch.testing.assert_close(t.tail_logprob[~close], exact[~close], rtol=0, atol=1e-4)
    torch.testing.assert_close(t.tail_logprob[close], exact[close], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_row_targets_from_raw_logits(method):
    """row_targets takes raw logits (any offset per row) and stores the log-softmax at the ids and at the gold token."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 300, generator=gen) * 3 + torch.randn(64, 1, generator=gen) * 50
    labels = torch.randint(0, 300, (64,), generator=gen)
    keys = row_keys(0, torch.arange(64), torch.zeros(64, dtype=torch.long))
    lp = torch.log_softmax(logits.double(), -1)
    t, gold = row_targets(logits.clone(), labels, keys, TargetSpec(method, k=10, samples=30))
    torch.testing.assert_close(gold.double(), lp.gather(1, labels[:, None])[:, 0], rtol=0, atol=1e-5)
    real = torch.arange(t.ids.shape[1])[None] < t.lengths[:, None]
    torch.testing.assert_close(t.logprobs[real].double(), lp.gather(1, t.ids)[real], rtol=0, atol=1e-5)
    if method == "sample":
        assert torch.all(t.counts.sum(1) == 30)
        assert torch.equal(t.ids, sample_targets(lp.float(), keys, 30).ids)  # the offset does not change the draws


# The compiled kernels (targets/kernels.py), skipped where no C compiler built them.


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


@needs_compiler
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


@needs_compiler
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


@needs_compiler
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


@needs_compiler
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


@needs_compiler
def test_labels_outside_the_vocabulary_are_refused():
    z, labels = random_logits(3, 100, seed=0), torch.tensor([3, 100, -1])
    with pytest.raises(ValueError, match="2 labels lie outside"):
        kernels.topk(z, labels, 4)
    with pytest.raises(ValueError, match="2 labels lie outside"):
        kernels.sample(z, labels, keys_for(3), 10, 1.0, 8)


@needs_compiler
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


@needs_compiler
def test_no_rows():
    ids, _, _, gold = kernels.topk(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long), 5)
    assert ids.shape == (0, 5) and gold.shape == (0,)
    assert kernels.sample(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long), keys_for(0), 5, 1.0, 8)[3].shape == (0,)


@needs_compiler
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


@needs_compiler
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


@needs_compiler
def test_zero_weight_ids_are_never_drawn():
    """-inf logits (and ids whose weight underflows) are never drawn, even in the last block."""
    vocab, rows = 1000, 500
    z = torch.full((rows, vocab), float("-inf"))
    z[:, [0, 999, 500]] = torch.tensor([0.0, 1.0, -1.0])
    ids, _, counts, lengths, _ = kernels.sample(z, labels_for(rows, 3) * 0, keys_for(rows), 30, 1.0, 16)
    drawn = set(ids[torch.arange(30)[None, :] < lengths[:, None]].tolist())
    assert drawn <= {0, 999, 500} and counts.sum() == rows * 30


@needs_compiler
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


@needs_compiler
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
        assert (torch.equal(fast.counts[same].long(), slow.counts[same])
                and torch.equal(fast.lengths.long()[same], slow.lengths[same]))


@needs_compiler
def test_gpu_and_half_rows_stay_on_torch():
    assert not native.usable(torch.zeros(2, 8, dtype=torch.bfloat16))
    targets, gold = row_targets(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long), keys_for(4),
                                TargetSpec("topk", k=2))
    assert isinstance(targets, RowTargets) and targets.ids.dtype == torch.int64 and np.allclose(gold, -math.log(8))
