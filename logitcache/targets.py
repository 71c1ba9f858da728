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
    counts ``[R, L] int64`` or None, lengths ``[R] int64``, tail_logprob ``[R] float32`` or None.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    counts: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None


def topk_targets(logprobs: torch.Tensor, k: int, inplace: bool = False) -> RowTargets:
    """Top-``k`` ids and log-probabilities (descending) and the log of the mass outside them.

    The tail is ``logsumexp`` over the other ids, not ``log(1 - sum)``, so it stays accurate when
    the top-k cover almost everything. ``inplace`` lets it overwrite ``logprobs`` (no copy).
    """
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1, sorted=True)
    rest = logprobs.scatter_(-1, top_ids, float("-inf")) if inplace else logprobs.scatter(-1, top_ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)
    lengths = torch.full((logprobs.shape[0],), k, dtype=torch.int64, device=logprobs.device)
    return RowTargets(ids=top_ids, logprobs=top_lp, lengths=lengths, tail_logprob=tail)


def _block_size(vocab: int, n: int) -> int:
    """Ids per block for two-level inverse-CDF sampling: balances the block scan (V/B) and the in-block scan (n*B)."""
    target = max(8.0, (vocab / max(n, 1)) ** 0.5)
    return 1 << round(math.log2(target))


def draw(logprobs: torch.Tensor, keys: torch.Tensor, n: int, temperature: float = 1.0) -> torch.Tensor:
    """``n`` draws with replacement per row from ``softmax(logprobs / temperature)``: ``[R, n] int64``.

    Exact two-level inverse CDF: a draw first picks a block of ``B`` ids by the float64 prefix sum
    of block masses, then an id inside the block by the prefix sum of that block alone, scaled by
    its own total. Each id is drawn with its float32 probability divided by the row total, up to
    float64 rounding; ids of probability 0 are never drawn. Cost per row is ``O(V + n*B)`` instead
    of the ``O(V)`` float64 scan plus per-row overheads of ``torch.multinomial``.
    """
    rows, vocab = logprobs.shape
    scaled = logprobs if temperature == 1.0 else torch.log_softmax(logprobs / temperature, dim=-1)
    b = _block_size(vocab, n)
    probs = scaled.exp()
    if vocab % b:
        probs = torch.nn.functional.pad(probs, (0, b - vocab % b))
    probs = probs.view(rows, -1, b)
    mass = probs.sum(-1).double()  # [R, nb]: float32 sums of B ids, exact enough and 15x faster
    cdf = torch.cumsum(mass, dim=-1)
    u = uniforms(keys, n) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # [R, n]
    before = (cdf - mass).gather(1, block)
    frac = ((u - before) / mass.gather(1, block)).clamp_(0.0, 1.0 - 2.0**-53)
    inner = probs[torch.arange(rows, device=probs.device)[:, None], block]  # [R, n, B]
    inner_cdf = torch.cumsum(inner, dim=-1, dtype=torch.float64)
    # B is small: counting prefix sums <= target beats a batched binary search.
    pos = (inner_cdf <= (frac * inner_cdf[..., -1])[..., None]).sum(-1)
    return (block * b + pos.clamp_(max=b - 1)).clamp_(max=vocab - 1)


def sample_targets(logprobs: torch.Tensor, keys: torch.Tensor, n: int, temperature: float = 1.0) -> RowTargets:
    """RS-KD targets: distinct sampled ids with their counts (sum ``n``) and teacher log-probabilities.

    Ids within a row are ordered by descending teacher log-probability; every row is padded to
    ``n`` entries with id 0, count 0 and log-probability -inf (a fixed width keeps the device from
    synchronising with the host).
    """
    ids = torch.sort(draw(logprobs, keys, n, temperature), dim=-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # Run lengths of equal ids: position of each run start, and distance to the next start.
    col = torch.arange(n, device=ids.device).expand_as(ids)
    next_start = torch.flip(torch.cummin(torch.flip(torch.where(first, col, n), [1]), dim=1).values, [1])
    ends = torch.cat([next_start[:, 1:], torch.full_like(next_start[:, :1], n)], dim=1)
    run_counts = torch.where(first, ends - col, 0)
    lp = torch.where(first, logprobs.gather(1, ids), float("-inf"))
    order = torch.argsort(lp, dim=1, descending=True, stable=True)
    return RowTargets(
        ids=torch.where(first.gather(1, order), ids.gather(1, order), 0),
        logprobs=lp.gather(1, order),
        counts=run_counts.gather(1, order),
        lengths=first.sum(dim=1),
    )


@dataclass(frozen=True)
class TargetSpec:
    """What to store per position: ``topk`` with ``k`` ids, or ``sample`` with ``samples`` draws."""

    method: str
    k: int = 32
    samples: int = 50
    seed: int = 0
    proposal_temperature: float = 1.0

    @property
    def params(self) -> dict:
        if self.method == "topk":
            return {"k": self.k}
        return {"samples": self.samples, "proposal_temperature": self.proposal_temperature}


def row_targets(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, spec: TargetSpec) -> tuple[RowTargets, torch.Tensor]:
    """Targets and gold log-probabilities ``[R]`` from raw teacher logits ``[R, V] float32``.

    Consumes ``logits``: it is turned into log-probabilities in place (no second ``[R, V]`` buffer).
    """
    logprobs = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    gold = logprobs.gather(1, labels[:, None])[:, 0]
    if spec.method == "topk":
        return topk_targets(logprobs, spec.k, inplace=True), gold
    return sample_targets(logprobs, keys, spec.samples, spec.proposal_temperature), gold
