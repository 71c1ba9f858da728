"""The targets' compiled CPU kernels (``lc_topk``, ``lc_sample`` in :mod:`logitcache.native`): the same
results as :mod:`.topk` and :mod:`.sample` to float32 rounding, each row in two passes while it sits in L1.
"""

from __future__ import annotations

import torch

from logitcache.native.library import library, pointer


def _rows(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Contiguous inputs of the right dtypes, with shapes checked: the C side trusts them."""
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [rows, vocab] with vocab >= 1, not {list(logits.shape)}")
    rows = logits.shape[0]
    for name, tensor in (("labels", labels), ("keys", keys)):
        if tensor is not None and tensor.shape != (rows,):
            raise ValueError(f"{name} must be [rows] = [{rows}], not {list(tensor.shape)}")
    out = [logits.contiguous(), labels.to(torch.int64).contiguous()]
    return (*out, keys.to(torch.int64).contiguous()) if keys is not None else tuple(out)


def _check_labels(bad: int, vocab: int) -> None:
    if bad:
        raise ValueError(f"{bad} labels lie outside [0, {vocab}): the rows' vocabulary")


def topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Top-``k`` of ``logits [R, V] float32`` (CPU): ids ``[R, k] int32`` and log-softmax ``[R, k]
    float32`` (descending; equal logits by lower id), log of the mass outside them ``[R]`` and the
    log-softmax at ``labels [R]``."""
    logits, labels = _rows(logits, labels)
    rows, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k}: need 1 <= k <= vocab ({vocab})")
    ids = torch.empty(rows, k, dtype=torch.int32)
    logprobs = torch.empty(rows, k)
    tail, gold = torch.empty(rows), torch.empty(rows)
    bad = library().lc_topk(pointer(logits), rows, vocab, k, pointer(labels),
                            pointer(ids), pointer(logprobs), pointer(tail), pointer(gold))
    _check_labels(bad, vocab)
    return ids, logprobs, tail, gold


def sample(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, n: int, temperature: float,
           block_size: int) -> tuple[torch.Tensor, ...]:
    """``n`` draws per row of ``logits [R, V] float32`` (CPU) at ``temperature``, grouped: ids, log-softmax
    and counts ``[R, n]`` (int32, float32, int32; padded after ``lengths [R] int32`` entries), and the
    log-softmax at ``labels [R]``. Draws are those of :func:`logitcache.targets.sample.draw` for the same
    ``keys [R] int64`` and ``block_size``, up to float32 rounding."""
    logits, labels, keys = _rows(logits, labels, keys)
    rows, vocab = logits.shape
    if n < 1 or block_size < 1 or not temperature > 0:
        raise ValueError(f"need n >= 1, block_size >= 1 and temperature > 0, not {n}, {block_size}, {temperature}")
    ids = torch.empty(rows, n, dtype=torch.int32)
    logprobs = torch.empty(rows, n)
    counts = torch.empty(rows, n, dtype=torch.int32)
    lengths = torch.empty(rows, dtype=torch.int32)
    gold = torch.empty(rows)
    bad = library().lc_sample(pointer(logits), rows, vocab, n, 1.0 / temperature, block_size, pointer(keys),
                              pointer(labels), pointer(ids), pointer(logprobs), pointer(counts), pointer(lengths),
                              pointer(gold))
    _check_labels(bad, vocab)
    return ids, logprobs, counts, lengths, gold
