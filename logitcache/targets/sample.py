"""Exact importance sampling (RS-KD): ``N`` draws with replacement per row by inverse-CDF sampling
on the uniforms of :mod:`.rng`, stored as distinct ids with counts. With a proposal temperature
``T`` the draws come from ``softmax(z / T)`` and the losses reweight them by ``t / q``.
"""

from __future__ import annotations

import math

import torch

from logitcache.targets.rng import sorted_uniforms
from logitcache.targets.topk import RowTargets


def _block_size(vocab: int, n: int) -> int:
    """Ids per block for two-level inverse-CDF sampling: balances the block scan (V/B) and the in-block scan (n*B)."""
    target = max(8.0, (vocab / max(n, 1)) ** 0.5)
    return 1 << round(math.log2(target))


def _draw_weights(weights: torch.Tensor, keys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` draws per row in proportion to ``weights [R, V]`` (non-negative, unnormalised).

    Returns the drawn ids ``[R, n] int64``, equal ids adjacent within a row. Exact two-level
    inverse CDF over ``nb`` blocks of ``B`` ids, block ``j`` being the ids ``j, j + nb, j + 2nb, …``
    (strided, so that block sums and the in-block scans are contiguous vector adds): a draw first
    picks a block by the float64 prefix sum of block masses, then an id inside it by the prefix sum
    of that block alone, scaled by its own total. Each id is
    drawn with its float32 weight divided by the row total, up to float64 rounding; ids of weight 0
    are never drawn. Cost per row is ``O(V + n*B)``.
    """
    rows, vocab = weights.shape
    b = _block_size(vocab, n)
    nb = -(-vocab // b)
    if vocab != nb * b:
        weights = torch.nn.functional.pad(weights, (0, nb * b - vocab))
    members = weights.view(rows, b, nb)  # members[r, i, j] = weight of id j + i * nb
    mass = members.sum(1)  # [R, nb] float32, summed in a fixed order per row
    cdf = torch.cumsum(mass, dim=-1, dtype=torch.float64)
    u = sorted_uniforms(keys, n) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)  # [R, n], non-decreasing
    block_mass = mass.gather(1, block).double()
    frac = ((u - (cdf.gather(1, block) - block_mass)) / block_mass).clamp_(0.0, 1.0 - 2.0**-53)
    inner_cdf = torch.cumsum(members.gather(2, block[:, None, :].expand(rows, b, n)), dim=1, dtype=torch.float64)
    # B is small: counting prefix sums <= target beats a batched binary search.
    pos = (inner_cdf <= (frac * inner_cdf[:, -1])[:, None, :]).sum(1).clamp_(max=b - 1)
    return block + pos * nb


def _weights(scores: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores / T)`` (one fused pass, a new tensor) and ``logsumexp(scores)`` per row ``[R]``.

    At ``T = 1`` the log-partition comes for free: the largest probability is ``exp(max - lse)``.
    """
    probs = torch.softmax(scores if temperature == 1.0 else scores / temperature, dim=-1)
    if temperature == 1.0:
        log_partition = scores.amax(-1) - probs.amax(-1).log()
    else:
        log_partition = torch.logsumexp(scores, dim=-1)
    return probs, log_partition


def draw(logprobs: torch.Tensor, keys: torch.Tensor, n: int, temperature: float = 1.0) -> torch.Tensor:
    """``n`` draws with replacement per row from ``softmax(logprobs / temperature)``: ``[R, n] int64``.

    Equal ids come out adjacent (draws are made in block order, see :func:`sorted_uniforms`); as a
    multiset they are ``n`` independent draws. Raw logits work as well as log-probabilities.
    """
    return _draw_weights(_weights(logprobs, temperature)[0], keys, n)


def sample_targets(logprobs: torch.Tensor, keys: torch.Tensor, n: int, temperature: float = 1.0) -> RowTargets:
    """RS-KD targets: distinct sampled ids with their counts (sum ``n``) and teacher log-probabilities.

    Ids within a row are ordered by descending teacher log-probability; every row is padded to
    ``n`` entries with id 0, count 0 and log-probability -inf (a fixed width keeps the device from
    synchronising with the host).
    """
    return _sample(logprobs, keys, n, temperature)[0]


def _sample(scores: torch.Tensor, keys: torch.Tensor, n: int, temperature: float) -> tuple[RowTargets, torch.Tensor]:
    """:func:`sample_targets` on ``scores`` (log-probabilities, or raw logits), also returning the
    log-partition ``logsumexp(scores)`` per row (~0 for log-probabilities). The targets' log-probabilities
    are ``scores`` at the ids, not yet normalised."""
    probs, log_partition = _weights(scores, temperature)
    ids = _draw_weights(probs, keys, n)
    # Equal draws are adjacent: each run becomes one entry, compacted to the left.
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = first.cumsum(1) - 1
    lengths = run[:, -1] + 1
    counts = torch.zeros_like(ids).scatter_add_(1, run, torch.ones_like(ids))
    unique = torch.zeros_like(ids).scatter_(1, run, ids)
    real = torch.arange(n, device=ids.device)[None, :] < lengths[:, None]
    lp, order = torch.sort(torch.where(real, scores.gather(1, unique), float("-inf")), dim=1, descending=True, stable=True)
    targets = RowTargets(ids=unique.gather(1, order), logprobs=lp, counts=counts.gather(1, order), lengths=lengths)
    return targets, log_partition
