"""Sparse targets from rows of teacher log-probabilities: top-k, and exact importance sampling.

Every function here takes a chunk of rows ``logprobs [R, V] float32`` (log-softmax of the
teacher's logits at temperature 1, one row per position) on any device and returns small
per-row results. Row chunks are independent, so the caller bounds memory by the chunk size.

Sampling is exact inverse-CDF sampling with counter-based random numbers: draw ``j`` of row
``r`` uses the uniform ``hash(seed, sequence_id, position, j)``, so the result depends only on
(seed, sequence_id, position) and never on batch size, batch order or device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logitcache import native

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores it."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic): a strong 64-bit mixer."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def row_keys(seed: int, sequence_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row from (seed, sequence_id, position): ``[R] int64``."""
    key = splitmix64(torch.full_like(sequence_ids, _signed(seed)))
    key = splitmix64(key ^ sequence_ids)
    return splitmix64(key ^ positions)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[R, n] float64`` uniforms in [0, 1): draw ``j`` of row ``r`` is a function of (keys[r], j) only."""
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    bits = splitmix64(keys[:, None] * _GOLDEN + j[None, :])
    return _shr(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


@dataclass
class RowTargets:
    """Sparse targets for ``R`` rows, padded to ``L`` ids per row (``lengths`` says how many are real).

    ids ``[R, L] int64``, logprobs ``[R, L] float32`` (descending within the real part),
    counts ``[R, L] int64`` or None, lengths ``[R] int64``, tail_logprob ``[R] float32`` or None
    (ids, counts and lengths are int32 where :mod:`logitcache.native` made them).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    counts: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None


TAIL_EXACT_BELOW = math.log(1e-3)
"""On CPU the tail is ``log1p(-sum(exp(top-k)))`` in float64, exact to ~1e-4 relative above this
(float32 log-probabilities carry ~3e-7 absolute error in that sum); rows below it get the exact
``logsumexp`` of the rest."""


def topk_targets(logprobs: torch.Tensor, k: int, inplace: bool = False) -> RowTargets:
    """Top-``k`` ids and log-probabilities (descending) and the log of the mass outside them.

    The tail is the ``logsumexp`` over the other ids, not ``log(1 - sum)`` alone, so it stays accurate
    when the top-k cover almost everything. On CPU a full pass is only paid for such rows (see
    :data:`TAIL_EXACT_BELOW`); elsewhere every row takes it, which needs no host synchronisation.
    ``inplace`` lets it overwrite ``logprobs`` (no copy).
    """
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1, sorted=True)
    lengths = torch.full((logprobs.shape[0],), k, dtype=torch.int64, device=logprobs.device)
    if logprobs.device.type != "cpu":
        rest = logprobs.scatter_(-1, top_ids, float("-inf")) if inplace else logprobs.scatter(-1, top_ids, float("-inf"))
        return RowTargets(ids=top_ids, logprobs=top_lp, lengths=lengths, tail_logprob=torch.logsumexp(rest, dim=-1))
    covered = top_lp.double().exp().sum(-1)
    tail = torch.log1p(-covered.clamp_(max=1.0)).float()
    close = (tail < TAIL_EXACT_BELOW).nonzero()[:, 0]
    if close.numel():
        rest = logprobs.index_select(0, close).scatter_(-1, top_ids.index_select(0, close), float("-inf"))
        tail[close] = torch.logsumexp(rest, dim=-1)
    return RowTargets(ids=top_ids, logprobs=top_lp, lengths=lengths, tail_logprob=tail)


def _block_size(vocab: int, n: int) -> int:
    """Ids per block for two-level inverse-CDF sampling: balances the block scan (V/B) and the in-block scan (n*B)."""
    target = max(8.0, (vocab / max(n, 1)) ** 0.5)
    return 1 << round(math.log2(target))


def sorted_uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[R, n] float64``: the order statistics of ``n`` uniforms on [0, 1), ascending within each row.

    ``S_j / S_{n+1}`` for the running sums ``S`` of ``n + 1`` exponential variables has exactly the
    distribution of ``n`` sorted uniforms, so draws made from them come out sorted with no sort.
    A function of ``keys`` only, like :func:`uniforms`.
    """
    sums = torch.cumsum(-torch.log1p(-uniforms(keys, n + 1)), dim=1)
    return sums[:, :n] / sums[:, n:].clamp_min(2.0**-1000)


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


SAMPLE_LOGPROB_BITS = 8


@dataclass(frozen=True)
class TargetSpec:
    """What to store per position: ``topk`` with ``k`` ids, or ``sample`` with ``samples`` draws.

    ``logprob_bits``: mantissa bits (of float16's 10) kept in a sample build's ``target_logprobs``.
    RS-KD learns from the counts, whose noise (~1/sqrt(count)) dwarfs a 2**-9 relative error in a
    log-probability; 8 bits saves ~0.4 bytes per entry. top-k keeps all 10, and gold always does.
    """

    method: str
    k: int = 32
    samples: int = 50
    seed: int = 0
    proposal_temperature: float = 1.0
    logprob_bits: int = SAMPLE_LOGPROB_BITS

    @property
    def params(self) -> dict:
        if self.method == "topk":
            return {"k": self.k}
        return {"samples": self.samples, "proposal_temperature": self.proposal_temperature, "logprob_bits": self.logprob_bits}

    @property
    def stored_logprob_bits(self) -> int:
        return self.logprob_bits if self.method == "sample" else 10


def row_bytes(spec: TargetSpec, vocab: int) -> int:
    """Working memory of :func:`row_targets` per row, in bytes (what a chunk of rows must budget).

    Three ``V``-wide float32 tensors (logits, log-probabilities or probabilities, scratch); a
    sample adds per draw the in-block prefix sums (``B`` float32 gathered, float64 scanned, bool
    compared: 13 bytes each) and about a dozen ``N``-wide int64/float64 rows.
    """
    wide = 3 * 4 * vocab
    if spec.method == "topk":
        return wide
    return wide + spec.samples * (13 * _block_size(vocab, spec.samples) + 13 * 8)


def row_targets(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, spec: TargetSpec) -> tuple[RowTargets, torch.Tensor]:
    """Targets and gold log-probabilities ``[R]`` from raw teacher logits ``[R, V] float32``.

    float32 rows on CPU go to the compiled kernels (:mod:`logitcache.native`) when they are
    available: the same targets to float32 rounding, ids and counts as int32. Otherwise ``topk``
    takes one fused log-softmax pass and may overwrite its output; ``sample`` never forms
    log-probabilities for the whole vocabulary: it draws from ``exp(logits - max)`` and normalises
    the drawn ids and the gold token only.
    """
    if native.usable(logits):
        return _native_row_targets(logits, labels, keys, spec)
    if spec.method == "topk":
        logprobs = torch.log_softmax(logits, dim=-1)
        gold = logprobs.gather(1, labels[:, None])[:, 0]
        return topk_targets(logprobs, spec.k, inplace=True), gold
    targets, log_partition = _sample(logits, keys, spec.samples, spec.proposal_temperature)
    targets.logprobs.sub_(log_partition[:, None])
    gold = logits.gather(1, labels[:, None])[:, 0] - log_partition
    return targets, gold


def _native_row_targets(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                        spec: TargetSpec) -> tuple[RowTargets, torch.Tensor]:
    if spec.method == "topk":
        ids, logprobs, tail, gold = native.topk(logits, labels, spec.k)
        lengths = torch.full((logits.shape[0],), spec.k, dtype=torch.int32)
        return RowTargets(ids=ids, logprobs=logprobs, lengths=lengths, tail_logprob=tail), gold
    block = _block_size(logits.shape[1], spec.samples)
    ids, logprobs, counts, lengths, gold = native.sample(logits, labels, keys, spec.samples, spec.proposal_temperature, block)
    return RowTargets(ids=ids, logprobs=logprobs, lengths=lengths, counts=counts), gold
