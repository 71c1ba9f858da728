"""Top-k targets from rows of log-probabilities ``[R, V]``: the k largest, descending, and the log of the tail mass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RowTargets:
    """Sparse targets for ``R`` rows, padded to ``L`` ids per row (``lengths`` says how many are real).

    ids ``[R, L] int64``, logprobs ``[R, L] float32`` (descending within the real part),
    counts ``[R, L] int64`` or None, lengths ``[R] int64``, tail_logprob ``[R] float32`` or None
    (ids, counts and lengths are int32 where :mod:`logitcache.targets.kernels` made them).
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
