""":func:`row_targets`: a chunk of teacher logits ``[R, V] float32`` → sparse targets and gold
log-probabilities, through the compiled kernels on CPU when they are available, else torch.
"""

from __future__ import annotations

import torch

from logitcache.native.library import usable
from logitcache.targets import kernels
from logitcache.targets.sample import _block_size, _sample
from logitcache.targets.spec import TargetSpec
from logitcache.targets.topk import RowTargets, topk_targets


def row_targets(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, spec: TargetSpec) -> tuple[RowTargets, torch.Tensor]:
    """Targets and gold log-probabilities ``[R]`` from raw teacher logits ``[R, V] float32``.

    float32 rows on CPU go to the compiled kernels (:mod:`logitcache.native`) when they are
    available: the same targets to float32 rounding, ids and counts as int32. Otherwise ``topk``
    takes one fused log-softmax pass and may overwrite its output; ``sample`` never forms
    log-probabilities for the whole vocabulary: it draws from ``exp(logits - max)`` and normalises
    the drawn ids and the gold token only.
    """
    if usable(logits):
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
        ids, logprobs, tail, gold = kernels.topk(logits, labels, spec.k)
        lengths = torch.full((logits.shape[0],), spec.k, dtype=torch.int32)
        return RowTargets(ids=ids, logprobs=logprobs, lengths=lengths, tail_logprob=tail), gold
    block = _block_size(logits.shape[1], spec.samples)
    ids, logprobs, counts, lengths, gold = kernels.sample(logits, labels, keys, spec.samples, spec.proposal_temperature, block)
    return RowTargets(ids=ids, logprobs=logprobs, lengths=lengths, counts=counts), gold


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
