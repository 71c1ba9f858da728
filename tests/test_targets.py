"""The RS-KD sampler: exact (chi-square against the softmax), unbiased, and a pure function of
(seed, sequence_id, position)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitcache.targets.rng import row_keys, uniforms
from logitcache.targets.rows import row_targets
from logitcache.targets.sample import draw, sample_targets
from logitcache.targets.spec import TargetSpec
from logitcache.targets.topk import TAIL_EXACT_BELOW, topk_targets


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


def test_round_float16_is_round_to_nearest():
    from logitcache.cache.format import round_float16

    values = np.concatenate([-np.logspace(-3, 4.5, 5000), [0.0, -np.inf]]).astype(np.float16)
    for bits in (1, 4, 8):
        out = round_float16(values, bits)
        assert out.dtype == np.float16
        assert np.all(out.view(np.uint16) & ((1 << (10 - bits)) - 1) == 0)
        finite = np.isfinite(values)
        exact, got = values[finite].astype(np.float64), out[finite].astype(np.float64)
        assert np.all(np.abs(got - exact) <= np.abs(exact) * 2.0 ** -(bits + 1))
        assert out[-1] == -np.inf and out[-2] == 0.0
    assert round_float16(np.array([-65504.0], np.float16), 8)[0] == -65504.0  # never rounded up to -inf
    assert np.array_equal(round_float16(values, 10).view(np.uint16), values.view(np.uint16))


def test_round_float16_from_float32_rounds_once():
    """float32 in: within 2^-(bits+1) of the float32 value (float32 -> float16 -> bits would reach 1.25x that)."""
    from logitcache.cache.format import round_float16

    values = -np.exp(np.random.default_rng(0).uniform(np.log(1e-3), np.log(2e4), 100_000)).astype(np.float32)
    for bits in (4, 8, 10):
        out = round_float16(values, bits)
        assert out.dtype == np.float16
        assert np.all(out.view(np.uint16) & ((1 << (10 - bits)) - 1) == 0)
        error = np.abs(out.astype(np.float64) - values) / np.abs(values)
        assert error.max() <= 2.0 ** -(bits + 1)
    twice = round_float16(values.astype(np.float16), 8).astype(np.float64)
    assert (np.abs(twice - values) / np.abs(values)).max() > 2.0**-9  # the bound the single rounding keeps
    special = round_float16(np.array([-np.inf, 0.0, -65504.0], np.float32), 8)
    assert special[0] == -np.inf and special[1] == 0.0 and special[2] == -65504.0
