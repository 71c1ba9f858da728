"""A stand-in for a teacher with a real, wide vocabulary (32k … 262k ids), made from the demo teacher.

There is no big-vocabulary LLM offline, and mapping the demo's 2,048 ids injectively into a wide range
(``bench_storage.remapped_ids``) keeps every row group at ≤ 2,048 distinct ids, which is what the
dictionary-encoded ``target_ids`` column pays for. Here every base id ``j`` of the demo teacher
**fans out** to ``F = width / 2048`` wide ids (its surface variants: case, leading space, …), and the
teacher's probability of ``j`` is split among them:

    t(j, s | context) = t_base(j | context) · z(rank),   rank = (s − shift(j, context)) mod F

``z`` is a Zipf law (``z(r) ∝ (r + 1)^-zipf_a``) over the ``F`` variants, and ``shift`` rotates which
variant is the likely one by the context (``contexts`` classes of the previous token, hashed with
``j``), so the same base id shows different wide ids at different positions. Wide ids are spread
over ``[0, width)`` by one random permutation (related variants are not neighbours). The base teacher's
logits are multiplied by ``sharpen`` (chosen by :func:`calibrate` so that N = 50 draws hit the
issue's real-teacher 17.6–18.9 distinct ids per position at every width).

The targets are drawn exactly from that distribution: ``sample`` N draws (a base id from the base
teacher, then a variant from ``z``), ``topk`` the exact ``k`` most likely wide ids (they lie among the
``k`` most likely base ids × ``k`` most likely variants), the tail and gold log-probabilities exact;
the window's tokens are the gold wide ids (the corpus token's variant, drawn from the same split).

What it reproduces: ids as wide as a real vocabulary's, thousands to tens of thousands of distinct ids
per row group, a context-dependent spread of mass over surface variants, real per-position id counts.
What it does not: a real LLM's frequency order of ids (BPE ids of frequent tokens are small; here wide
ids are random, which is the worst case for value-based encodings such as delta coding and neutral for
dictionaries), and a real model's semantic neighbourhoods beyond the variant split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logitcache.cache.format import WindowTargets


@dataclass(frozen=True)
class Fanout:
    """How base ids fan out to ``width`` wide ids (``width`` a multiple of the base vocabulary)."""

    base_vocab: int
    width: int
    zipf_a: float = 3.0
    contexts: int = 8
    seed: int = 0
    frequency_order: bool = False  # wide ids numbered by expected frequency (as BPE numbers merges) instead of at random

    @property
    def variants(self) -> int:
        return self.width // self.base_vocab

    def log_split(self) -> np.ndarray:
        """``[F] float64``: log of the Zipf split over a base id's variants, by rank."""
        z = (np.arange(self.variants) + 1.0) ** -self.zipf_a
        return np.log(z / z.sum())

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(``shift [base_vocab, contexts] int64``, ``wide_id [base_vocab * F] int32``: the wide id of slot
        ``j * F + s``)."""
        rng = np.random.default_rng(self.seed)
        shift = rng.integers(0, self.variants, size=(self.base_vocab, self.contexts))
        if self.variants == 1:  # no fan-out: the base ids as they are
            return shift, np.arange(self.width, dtype=np.int32)
        if not self.frequency_order:
            return shift, rng.permutation(self.width).astype(np.int32)
        # expected frequency of slot (j, s): base id j's (BPE ids: smaller is more frequent, ~1/(j+1)) times the
        # split's mean over the contexts; the most frequent slot gets id 0
        slots = np.arange(self.variants)
        split = np.exp(self.log_split())[(slots[None, None, :] - shift[:, :, None]) % self.variants].mean(axis=1)
        frequency = split / (np.arange(self.base_vocab) + 1.0)[:, None]
        wide_id = np.empty(self.width, dtype=np.int32)
        wide_id[np.argsort(-frequency.reshape(-1), kind="stable")] = np.arange(self.width, dtype=np.int32)
        return shift, wide_id

    def wide(self, base: np.ndarray, rank: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Wide ids of base ids ``base`` at variant ``rank`` in contexts ``context`` (broadcast; int32)."""
        shift, wide_id = self.tables()
        slot = (rank + shift[base, context]) % self.variants
        return wide_id[base * self.variants + slot]


def base_logprobs(teacher, input_ids: np.ndarray, sharpen: float, batch: int = 16) -> np.ndarray:
    """``[B, n-1, V] float32``: the base teacher's log-softmax of logits × ``sharpen`` at every position
    of ``input_ids [B, n]``."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(input_ids), batch):
            ids = torch.from_numpy(input_ids[i : i + batch].astype(np.int64))
            logits = teacher.model(input_ids=ids).logits[:, :-1].float() * sharpen
            out.append(torch.log_softmax(logits, -1).numpy())
    return np.concatenate(out)


def contexts_of(input_ids: np.ndarray, fanout: Fanout) -> np.ndarray:
    """``[B, n-1] int64``: the context class of each position (its own token, the previous one of the predicted)."""
    return input_ids[:, :-1].astype(np.int64) * 2654435761 % 2**32 % fanout.contexts


def distinct_per_position(logprobs: np.ndarray, fanout: Fanout, samples: int, seed: int = 0) -> float:
    """Mean distinct wide ids among ``samples`` draws at positions ``logprobs [P, V]``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.multinomial(torch.from_numpy(logprobs).exp(), samples, replacement=True, generator=gen).numpy()
    rank = _draw_ranks(fanout, base.shape, np.random.default_rng(seed))
    keys = base.astype(np.int64) * fanout.variants + rank  # context fixed: distinctness does not depend on it
    keys.sort(axis=1)
    return float(1 + (np.diff(keys, axis=1) != 0).sum(axis=1).mean())


def _draw_ranks(fanout: Fanout, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(np.exp(fanout.log_split()))
    return np.minimum(np.searchsorted(cdf, rng.random(shape) * cdf[-1], side="right"), fanout.variants - 1)


def calibrate(teacher, input_ids: np.ndarray, fanout: Fanout, target: float, samples: int = 50,
              rows: int = 96) -> float:
    """The ``sharpen`` factor at which ``samples`` draws give ``target`` distinct wide ids per position
    (bisection on ``rows`` windows spread over ``input_ids``)."""
    spread = np.linspace(0, len(input_ids) - 1, min(rows, len(input_ids))).astype(np.int64)  # rows from the whole set
    logits = base_logprobs(teacher, input_ids[spread], 1.0)  # log-softmax: scaling it scales the logits up to a shift
    flat = logits.reshape(-1, logits.shape[-1])
    lo, hi = 0.8, 4.0
    for _ in range(14):
        mid = (lo + hi) / 2
        scaled = torch.log_softmax(torch.from_numpy(flat) * mid, -1).numpy()
        lo, hi = (mid, hi) if distinct_per_position(scaled, fanout, samples) > target else (lo, mid)
    return (lo + hi) / 2


def wide_targets(teacher, windows: WindowTargets, fanout: Fanout, sharpen: float, method: str,
                 k: int = 32, samples: int = 50, seed: int = 0, batch: int = 32) -> WindowTargets:
    """The stand-in's ``method`` targets (``topk`` ``k`` or ``sample`` ``samples``) on the windows of
    ``windows`` (full rows; their input ids are the base tokens), ids wide, in the v1/v2 order (descending
    log-probability within a position); ``batch`` windows at a time."""
    parts = [_wide_batch(teacher, windows.select(np.arange(i, min(i + batch, len(windows)))), fanout, sharpen, method,
                         k, samples, seed + i) for i in range(0, len(windows), batch)]
    return WindowTargets.concat(parts)


def _wide_batch(teacher, windows: WindowTargets, fanout: Fanout, sharpen: float, method: str, k: int, samples: int,
                seed: int) -> WindowTargets:
    rng = np.random.default_rng(seed)
    lp = base_logprobs(teacher, windows.input_ids, sharpen)  # [B, n-1, V]
    b, positions, vocab = lp.shape
    context = contexts_of(windows.input_ids, fanout)
    log_split = fanout.log_split()
    # the tokens: each base token's variant drawn from the split at its position (the first token: context 0)
    token_rank = _draw_ranks(fanout, windows.input_ids.shape, rng)
    token_context = np.concatenate([np.zeros((b, 1), dtype=np.int64), context], axis=1)
    input_ids = fanout.wide(windows.input_ids.astype(np.int64), token_rank, token_context)
    gold_base = windows.input_ids[:, 1:].astype(np.int64)
    gold = np.take_along_axis(lp, gold_base[..., None], -1)[..., 0] + log_split[token_rank[:, 1:]]
    flat_lp = lp.reshape(-1, vocab)
    flat_context = context.reshape(-1)
    if method == "topk":
        ids, logprobs, lengths, tail = _topk(flat_lp, flat_context, fanout, k)
        counts = None
    else:
        ids, logprobs, counts, lengths = _sample(flat_lp, flat_context, fanout, samples, seed)
        tail = None
    return WindowTargets(
        sequence_ids=windows.sequence_ids, input_ids=input_ids, target_lengths=lengths.reshape(b, positions).astype(np.uint16),
        target_ids=ids, target_logprobs=logprobs.astype(np.float32), gold_logprob=gold.astype(np.float32),
        tail_logprob=None if tail is None else tail.reshape(b, positions).astype(np.float32), target_counts=counts,
    )


def _topk(lp: np.ndarray, context: np.ndarray, fanout: Fanout, k: int):
    """The exact top ``k`` wide ids of each position ``lp [P, V]``, descending; and the log tail mass."""
    base = np.argsort(-lp, axis=1)[:, :k]  # [P, k]
    ranks = min(k, fanout.variants)
    cand = np.take_along_axis(lp, base, 1)[:, :, None] + fanout.log_split()[None, None, :ranks]  # [P, k, ranks]
    cand = cand.reshape(len(lp), -1)
    order = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(cand, order, 1)
    ids = fanout.wide(np.take_along_axis(base, order // ranks, 1), order % ranks, context[:, None])
    kept = np.exp(values.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.maximum(1.0 - kept, 0.0))
    return ids.reshape(-1).astype(np.int32), values.reshape(-1), np.full(len(lp), k), tail


def _sample(lp: np.ndarray, context: np.ndarray, fanout: Fanout, samples: int, seed: int):
    """``samples`` draws of each position's wide distribution: distinct ids (descending log-probability),
    their log-probabilities, counts ``uint16`` and lengths."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.multinomial(torch.from_numpy(lp).exp(), samples, replacement=True, generator=gen).numpy().astype(np.int64)
    rank = _draw_ranks(fanout, base.shape, np.random.default_rng(seed + 1))
    value = np.take_along_axis(lp, base, 1) + fanout.log_split()[rank]
    key = base * fanout.variants + rank
    # per position: distinct keys, ordered by descending value (ties by key)
    order = np.lexsort((key, -value), axis=1)
    key, value, base, rank = (np.take_along_axis(a, order, 1) for a in (key, value, base, rank))
    first = np.ones_like(key, dtype=bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    counts = np.diff(np.append(np.flatnonzero(first.reshape(-1)), first.size))
    ids = fanout.wide(base, rank, context[:, None])[first]
    return ids.astype(np.int32), value[first], counts.astype(np.uint16), first.sum(axis=1)
