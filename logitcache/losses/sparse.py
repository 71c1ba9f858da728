"""Distillation losses: student logits against a collated batch of cached teacher targets.

Every loss is a plain function
``loss(student_logits [B, P, V], batch, *, alpha, temperature, ...) -> LossOutput``
(the batch is the loader's collated dict, see docs/CONTRACTS.md). Its result is
``(1 - alpha) * kd + alpha * ce`` with ``ce`` the cross-entropy on the gold token.

Reduction. ``LossOutput.total`` is the SUM over the counted positions (``position_mask``)
and ``tokens`` their number. Callers divide the totals of all micro-batches and ranks by the
tokens of the whole step, so gradient accumulation and DDP equal one large batch. A batch
with no counted position gives total 0 and zero gradients.

Rows. The math works on flattened rows: the counted positions of the batch, as logits
``[R, V]`` and ``Rows`` of targets ``[R, K]``. Each ``*_rows`` function maps
``(logits [R, V] float32, rows) -> [R] float32`` and needs nothing beyond its own rows, so a
chunked output head can call it on row slices. Uncounted positions are dropped before any
math, so garbage there cannot reach the loss or its gradient.

Temperature. ``kl`` and ``topk-renorm`` (and ``rlkd`` with such a base) temper both sides:
the student is ``softmax(z / T)`` over the vocabulary, the teacher ``softmax(logprob / T)``
over the cached ids, and the loss is multiplied by ``T**2`` so that gradient scales stay
comparable across ``T`` (Hinton et al.). ``bild`` divides the selected values by ``T`` before
taking differences and uses no ``T**2`` factor, as in the paper. The other losses have no
temperature and refuse ``T != 1``: RS-KD is unbiased only for the teacher it sampled, and the
tail bucket is a sum over unknown ids whose tempered mass the cache cannot give.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from logitcache.errors import LogitcacheError

# A finite stand-in for log(0): exp of it is exactly 0, and unlike -inf it keeps
# log-softmax and logsumexp of fully masked rows finite, so their gradients are 0, not NaN.
LOG_ZERO = torch.finfo(torch.float32).min


# A tail mass below float32 resolution of 1 is zero by rounding (tails are 1 - sum t), not by
# the teacher; reverse KL takes such a tail as this mass instead of dividing by zero.
_MIN_TAIL_LOGPROB = math.log(torch.finfo(torch.float32).eps)


_PEARSON_EPS = 1e-12


_VANISHING_GAP = 1e3
"""Where a loss takes differences of teacher values (BiLD, RLKD), a cached log-prob of -inf (an id
of probability 0: a masked logit) stands at this far below the row's lowest finite one: it ranks
last, a difference with it weighs exp(-1e3 / T) = 0 beside the others (the limit of a log-prob
going to -inf), and -inf - -inf cannot make NaN. Relative to the row, so float32 keeps the
differences between the finite values exact."""


@dataclass(frozen=True)
class LossOutput:
    """A loss summed over the counted positions of a batch.

    ``total``: float32 scalar, the sum over counted positions. ``tokens``: int64 scalar,
    how many positions counted.
    """

    total: Tensor
    tokens: Tensor

    def mean(self) -> Tensor:
        """``total / tokens`` for this batch alone (0 when it counts no position)."""
        return self.total / self.tokens.clamp_min(1)


class Rows(NamedTuple):
    """Cached targets of the counted positions, flattened to ``R`` rows.

    ids ``[R, K] int64`` (padding id 0), mask ``[R, K] bool`` (real ids),
    logprobs ``[R, K] float32`` (teacher log-probs, 0 at padding), weights ``[R, K] float32``
    (sample: count / N; topk: exp(logprob); 0 at padding), tail_logprob ``[R] float32``
    (log teacher mass outside the ids, may be -inf), labels ``[R] int64`` (gold next tokens). A sample cache
    without log-probabilities (format v4, ``--logprob-bits 0``) gives NaN logprobs and tail: only ``rs-kd`` at
    proposal temperature 1, which reads the weights alone, is let near it (``train.settings.options_from_cache``).
    Caches of generated responses (format v3) add ``behavior`` ``[R] float32``, the log-probability the
    label was drawn with (NaN: not drawn by a recorded sampler), and :func:`with_future_rewards` the
    ``future_reward`` ``[R] float32`` of MiniLLM's long-term term; None where the batch has none.
    """

    ids: Tensor
    mask: Tensor
    logprobs: Tensor
    weights: Tensor
    tail_logprob: Tensor
    labels: Tensor
    behavior: Tensor | None = None
    future_reward: Tensor | None = None


RowLoss = Callable[[Tensor, Rows], Tensor]


LossFn = Callable[..., LossOutput]


def select_rows(student_logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Rows]:
    """The counted positions as float32 logits ``[R, V]`` and their ``Rows``.

    ``student_logits``: ``[B, P, V]`` any float dtype, position ``p`` predicting token ``p + 1``.
    """
    labels = batch["labels"]
    if student_logits.shape[:2] != labels.shape:
        raise LogitcacheError(
            f"student logits have shape {tuple(student_logits.shape)} but the batch has "
            f"{tuple(labels.shape)} positions; pass logits[:, :-1] (position t predicts token t + 1)"
        )
    window, position = batch["position_mask"].nonzero().unbind(1)
    return student_logits[window, position].float(), rows_at(batch, window, position)


def rows_at(batch: Mapping[str, Tensor], window: Tensor, position: Tensor) -> Rows:
    """The :class:`Rows` of the batch's positions ``(window[r], position[r])`` (``[R] int64`` each)."""

    def optional(name: str) -> Tensor | None:
        return batch[name][window, position].float() if name in batch else None

    return Rows(
        ids=batch["target_ids"][window, position],
        mask=batch["target_mask"][window, position],
        logprobs=batch["target_logprobs"][window, position].float(),
        weights=batch["target_weights"][window, position].float(),
        tail_logprob=batch["tail_logprob"][window, position].float(),
        labels=batch["labels"][window, position],
        behavior=optional("behavior_logprob"),
        future_reward=optional(FUTURE_REWARD),
    )


def mixed_rows(logits: Tensor, rows: Rows, kd: RowLoss, alpha: float) -> Tensor:
    """Per-row ``(1 - alpha) * kd + alpha * ce`` ``[R] float32``; a term weighted 0 is not computed."""
    if alpha == 0.0:
        return kd(logits, rows)
    if alpha == 1.0:
        return ce_rows(logits, rows)
    return (1.0 - alpha) * kd(logits, rows) + alpha * ce_rows(logits, rows)


def _loss_output(student_logits: Tensor, batch: Mapping[str, Tensor], kd: RowLoss, alpha: float) -> LossOutput:
    if not 0.0 <= alpha <= 1.0:
        raise LogitcacheError(f"alpha={alpha} is outside [0, 1]; the loss is (1 - alpha) * kd + alpha * ce")
    logits, rows = select_rows(student_logits, batch)
    return LossOutput(total=mixed_rows(logits, rows, kd, alpha).sum(), tokens=batch["position_mask"].sum())


def _require_unit_temperature(name: str, temperature: float) -> None:
    if temperature != 1.0:
        raise LogitcacheError(
            f"{name} has no temperature (got temperature={temperature}); "
            "set it to 1.0, or use kl / topk-renorm, which temper both sides"
        )


def _require_positive(name: str, value: float) -> None:
    if not value > 0.0:
        raise LogitcacheError(f"{name}={value} must be > 0")


# ---- small pure pieces ------------------------------------------------------------------


def masked_log_softmax(values: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over the ``mask``ed entries of the last dim; masked-out entries get ~log(0)."""
    return values.masked_fill(~mask, LOG_ZERO).log_softmax(-1)


def masked_kl(log_a: Tensor, log_b: Tensor, mask: Tensor) -> Tensor:
    """``sum_mask a * (log a - log b)`` ``[R]``; entries off the mask or with ``a = 0`` add 0 (and 0 grad)."""
    keep = mask & (log_a > -math.inf)
    log_a = log_a.masked_fill(~keep, 0.0)
    terms = log_a.exp() * (log_a - log_b.masked_fill(~keep, 0.0))
    return terms.masked_fill(~keep, 0.0).sum(-1)


def _soft_cross_entropy(log_target: Tensor, log_p: Tensor, mask: Tensor) -> Tensor:
    """``-sum_mask target * log p`` ``[R]`` for a normalised ``log_target`` ``[R, K]``."""
    return -(log_target.exp() * log_p).masked_fill(~mask, 0.0).sum(-1)


def _student_logprobs_at(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / T)`` over the full vocabulary, gathered at ``ids`` ``[R, K]``."""
    scaled = logits if temperature == 1.0 else logits / temperature
    return scaled.gather(-1, ids) - scaled.logsumexp(-1, keepdim=True)


class _Buckets(NamedTuple):
    """Teacher and student on the buckets ``cached ids + [outside]``: log-probs ``[R, K + 1]``
    float32 and the mask ``[R, K + 1]`` bool of the buckets that exist."""

    teacher: Tensor
    student: Tensor
    mask: Tensor


def _buckets(logits: Tensor, rows: Rows, min_tail_logprob: float = -math.inf, lse: Tensor | None = None) -> _Buckets:
    """Both distributions on ``cached ids + [outside]``.

    Student: full-vocabulary log-probs at the ids; the outside bucket is ``logsumexp`` of the
    uncached logits (exact, no ``1 - sum p`` cancellation). Teacher: ``logprobs`` and
    ``tail_logprob`` (raised to at least ``min_tail_logprob``) renormalised over the buckets that
    exist, so fp16 rounding cannot leave them summing off 1. When the ids cover the whole
    vocabulary the outside bucket is empty: it is masked out and any stored tail is dropped. ``lse``: the
    logits' ``logsumexp [R, 1]`` where the caller has it already.
    """
    if lse is None:
        lse = logits.logsumexp(-1, keepdim=True)
    hits = torch.zeros_like(logits).scatter_add_(-1, rows.ids, rows.mask.to(logits.dtype))
    cached = hits > 0
    log_outside = logits.masked_fill(cached, LOG_ZERO).logsumexp(-1, keepdim=True) - lse
    mask = torch.cat([rows.mask, ~cached.all(-1, keepdim=True)], -1)
    tail = rows.tail_logprob.clamp_min(min_tail_logprob)[:, None]
    logprobs = rows.logprobs
    if min_tail_logprob > -math.inf:  # a cached id of probability 0 gets the floor too; finite ones are kept
        logprobs = logprobs.masked_fill(logprobs == -math.inf, min_tail_logprob)
    return _Buckets(
        teacher=masked_log_softmax(torch.cat([logprobs, tail], -1), mask),
        student=torch.cat([logits.gather(-1, rows.ids) - lse, log_outside], -1),
        mask=mask,
    )


def _vanishing_floor(logprobs: Tensor) -> Tensor:
    """``logprobs`` ``[R, K]`` with -inf entries set :data:`_VANISHING_GAP` below the row's lowest finite value."""
    if logprobs.numel() == 0:
        return logprobs
    lowest = logprobs.masked_fill(logprobs == -math.inf, math.inf).amin(-1, keepdim=True)
    lowest = lowest.masked_fill(lowest == math.inf, 0.0)  # no finite value: any stand-in will do
    return torch.where(logprobs == -math.inf, lowest - _VANISHING_GAP, logprobs)


def _top_columns(values: Tensor, mask: Tensor, k: int) -> Tensor:
    """Indices ``[R, min(k, K)]`` of the k largest masked ``values``, largest first; padding sorts last."""
    return values.masked_fill(~mask, LOG_ZERO).topk(min(k, values.shape[-1]), dim=-1).indices


# ---- per-row losses ----------------------------------------------------------------------


def ce_rows(logits: Tensor, rows: Rows) -> Tensor:
    """Cross-entropy on the gold tokens ``[R] float32``."""
    return logits.logsumexp(-1) - logits.gather(-1, rows.labels[:, None]).squeeze(-1)


def rs_kd_log_weights(rows: Rows, proposal_temperature: float = 1.0) -> Tensor:
    """RS-KD's unnormalised log importance weights ``[R, K]``: ``log(count / N) + (1 - 1/tau) * logprob``
    (``t_i / q_i`` up to a constant for draws from ``q ∝ t^(1/tau)``); the plain and the fused loss share it."""
    log_w = rows.weights.log()
    if proposal_temperature != 1.0:  # (not 0 * logprob: a -inf one would give NaN)
        log_w = log_w + (1.0 - 1.0 / proposal_temperature) * rows.logprobs
    return log_w


def rs_kd_rows(logits: Tensor, rows: Rows, proposal_temperature: float = 1.0) -> Tensor:
    """RS-KD sparse cross-entropy ``logsumexp(z) - sum_i w_i z_i`` ``[R] float32``.

    ``w_i ∝ weights_i * exp((1 - 1/tau) * logprob_i)``, self-normalised per row: the
    importance weight ``t_i / q_i`` of a draw from ``q ∝ t^(1/tau)``. For ``tau = 1``,
    ``w = count / N`` and the gradient ``p - w`` is unbiased for the full-KD gradient ``p - t``.
    """
    log_w = rs_kd_log_weights(rows, proposal_temperature)
    log_p = _student_logprobs_at(logits, rows.ids)
    return _soft_cross_entropy(masked_log_softmax(log_w, rows.mask), log_p, rows.mask)


def topk_renorm_rows(logits: Tensor, rows: Rows, temperature: float = 1.0) -> Tensor:
    """``-T^2 sum_i t~_i log p_i`` ``[R] float32``, ``t~ = softmax(logprob / T)`` on the cached ids.

    At ``T = 1``, ``t~_i = t_i / sum_K t``: the teacher's tail is dropped. ``p = softmax(z / T)``
    over the full vocabulary, so uncached student mass is pushed down through the normaliser.
    """
    log_t = masked_log_softmax(rows.logprobs / temperature, rows.mask)
    log_p = _student_logprobs_at(logits, rows.ids, temperature)
    return temperature**2 * _soft_cross_entropy(log_t, log_p, rows.mask)


def kl_rows(logits: Tensor, rows: Rows, temperature: float = 1.0) -> Tensor:
    """Forward ``T^2 KL(t~ || p)`` ``[R] float32`` with the cached ids taken as the teacher's support.

    ``t~ = softmax(logprob / T)`` on the cached ids (tail dropped); ``p = softmax(z / T)`` over
    the full vocabulary (the student is not renormalised). Equals ``topk_renorm_rows`` minus the
    teacher's entropy; with K = V it is the dense forward KL.
    """
    log_t = masked_log_softmax(rows.logprobs / temperature, rows.mask)
    log_p = _student_logprobs_at(logits, rows.ids, temperature)
    return temperature**2 * masked_kl(log_t, log_p, rows.mask)


def topk_ghost_rows(logits: Tensor, rows: Rows) -> Tensor:
    """``sum_K t_i log(t_i / p_i) + r log(r / (1 - sum_K p_i))`` ``[R] float32``, ``r = exp(tail)``.

    KL between teacher and student on the buckets ``cached ids + [outside]`` (see ``_buckets``).
    """
    b = _buckets(logits, rows)
    return masked_kl(b.teacher, b.student, b.mask)


def reverse_kl_rows(logits: Tensor, rows: Rows) -> Tensor:
    """Reverse ``KL(p || t)`` ``[R] float32`` on the buckets ``cached ids + [outside]``.

    The teacher's tail is raised to at least float32 eps (1.2e-7) so that outside student
    mass costs a finite ``p_out * log(p_out / r)`` when the cache rounded the tail to 0; a cached
    id of teacher probability 0 (log-prob -inf) is given the same floor.
    """
    b = _buckets(logits, rows, _MIN_TAIL_LOGPROB)
    return masked_kl(b.student, b.teacher, b.mask)


def skew_kl_rows(logits: Tensor, rows: Rows, skew: float = 0.1) -> Tensor:
    """DistiLLM skew KL ``KL(t || skew * t + (1 - skew) * p)`` ``[R] float32`` on the buckets."""
    b = _buckets(logits, rows)
    mixture = torch.logaddexp(math.log(skew) + b.teacher, math.log1p(-skew) + b.student)
    return masked_kl(b.teacher, mixture, b.mask)


def skew_reverse_kl_rows(logits: Tensor, rows: Rows, skew: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL ``KL(p || (1 - skew) * t + skew * p)`` ``[R] float32`` on the buckets."""
    b = _buckets(logits, rows)
    mixture = torch.logaddexp(math.log1p(-skew) + b.teacher, math.log(skew) + b.student)
    return masked_kl(b.student, mixture, b.mask)


def gkd_jsd_rows(logits: Tensor, rows: Rows, beta: float = 0.5) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence ``beta KL(t || m) + (1 - beta) KL(p || m)``,
    ``m = beta t + (1 - beta) p``, ``[R] float32`` on the buckets ``cached ids + [outside]``."""
    b = _buckets(logits, rows)
    mixture = torch.logaddexp(math.log(beta) + b.teacher, math.log1p(-beta) + b.student)
    return beta * masked_kl(b.teacher, mixture, b.mask) + (1 - beta) * masked_kl(b.student, mixture, b.mask)


def minillm_rows(logits: Tensor, rows: Rows, clip: float) -> Tensor:
    """MiniLLM's reverse-KL policy gradient on the student's own samples, per drawn token ``[R] float32``:
    ``w * RKL + PG``, where ``RKL`` is :func:`reverse_kl_rows` (the single-step term) and
    ``PG = -min(rho * A, clip(rho, 1 - clip, 1 + clip) * A)``, ``rho = q_theta(y) / q_old(y)`` (the label's
    probability now over the one it was drawn with, ``rows.behavior``; with gradient), ``A =
    rows.future_reward`` and ``w = clip(rho)`` without gradient. A row not drawn by a recorded sampler
    (``behavior`` NaN: a prompt, an off-policy answer) has ``w = 1`` and no PG term.
    """
    lse = logits.logsumexp(-1, keepdim=True)  # one pass over the vocabulary for both terms
    b = _buckets(logits, rows, _MIN_TAIL_LOGPROB, lse)
    single = masked_kl(b.student, b.teacher, b.mask)  # reverse_kl_rows
    drawn = torch.isfinite(rows.behavior)
    log_now = (logits.gather(-1, rows.labels[:, None]) - lse)[:, 0]
    ratio = torch.exp(torch.where(drawn, log_now - rows.behavior, torch.zeros_like(log_now)))
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip)
    reward = torch.where(drawn, rows.future_reward, torch.zeros_like(ratio))
    policy = -torch.minimum(ratio * reward, clipped * reward)
    return torch.where(drawn, clipped.detach(), torch.ones_like(ratio)) * single + policy


def _logit_difference_kl(
    teacher: Tensor, student: Tensor, leader: Tensor, mask: Tensor, k: int, temperature: float
) -> Tensor:
    """``KL(softmax(d_t / T) || softmax(d_s / T))`` ``[R]`` over the pairwise differences
    ``d_mn = v_m - v_n`` (m < n, largest first) of the ``leader``'s top-k cached columns."""
    top = _top_columns(leader, mask, k)
    first, second = torch.triu_indices(top.shape[-1], top.shape[-1], 1, device=top.device)
    valid = mask.gather(-1, top)
    pairs = valid[:, first] & valid[:, second]

    def log_pair_softmax(values: Tensor) -> Tensor:
        picked = values.gather(-1, top) / temperature
        return masked_log_softmax(picked[:, first] - picked[:, second], pairs)

    return masked_kl(log_pair_softmax(teacher), log_pair_softmax(student), pairs)


def bild_rows(logits: Tensor, rows: Rows, k: int = 8, temperature: float = 3.0) -> Tensor:
    """BiLD ``t-LD + s-LD`` ``[R] float32``, all on the cached ids.

    Cached log-probs serve as teacher logits (differences are shift-invariant). t-LD uses the
    teacher's top-k cached ids. s-LD uses the student's top-k AMONG THE CACHED IDS: the teacher
    has no value for an uncached id, so a student top id outside the cache is skipped and the
    next-highest cached one is used instead. Rows with fewer than k cached ids use all of them.
    """
    student = logits.gather(-1, rows.ids)
    teacher = _vanishing_floor(rows.logprobs)
    t_ld = _logit_difference_kl(teacher, student, teacher, rows.mask, k, temperature)
    s_ld = _logit_difference_kl(teacher, student, student.detach(), rows.mask, k, temperature)
    return t_ld + s_ld


def _soft_ranks(values: Tensor, valid: Tensor, rank_temperature: float) -> Tensor:
    """``rank_i = sum_j valid_j * sigmoid((v_i - v_j) / tau)`` ``[R, M]``: a differentiable rank."""
    pairwise = torch.sigmoid((values[:, :, None] - values[:, None, :]) / rank_temperature)
    return (pairwise * valid[:, None, :]).sum(-1)


def _pearson(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Pearson correlation ``[R]`` of ``a`` and ``b`` ``[R, M]`` over the valid entries.

    0, with gradient 0, where either is constant: the correlation is undefined there and its
    gradient unbounded (a student with tied logits would otherwise get a gradient of ~1e6).
    """
    weight = valid.to(a.dtype)
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    a = (a - (a * weight).sum(-1, keepdim=True) / count) * weight
    b = (b - (b * weight).sum(-1, keepdim=True) / count) * weight
    spread = (a * a).sum(-1) * (b * b).sum(-1)
    scale = torch.where(spread > _PEARSON_EPS, spread.clamp_min(_PEARSON_EPS).rsqrt(), 0.0)
    return (a * b).sum(-1) * scale


def rank_correlation_rows(logits: Tensor, rows: Rows, k: int = 15, rank_temperature: float = 0.1) -> Tensor:
    """Soft-rank Pearson ``rho`` ``[R] float32`` of teacher log-probs and student logits on the
    union of the teacher's and the student's top-k cached ids (uncached ids have no teacher value)."""
    student = logits.gather(-1, rows.ids)
    teacher = _vanishing_floor(rows.logprobs)
    union = torch.zeros_like(rows.mask)
    union.scatter_(-1, _top_columns(teacher, rows.mask, k), True)
    union.scatter_(-1, _top_columns(student.detach(), rows.mask, k), True)
    union &= rows.mask
    # Pack the (at most 2k) union columns first so the pairwise ranks are [R, 2k, 2k], not [R, K, K].
    columns = union.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[:, : 2 * k]
    valid = union.gather(-1, columns)
    ranks_t = _soft_ranks(teacher.gather(-1, columns), valid, rank_temperature)
    ranks_s = _soft_ranks(student.gather(-1, columns), valid, rank_temperature)
    return _pearson(ranks_t, ranks_s, valid)


def rlkd_rows(logits: Tensor, rows: Rows, base: RowLoss, k: int = 15, rank_temperature: float = 0.1) -> Tensor:
    """RLKD ``2 * (1 - rho) + base`` ``[R] float32`` (see ``rank_correlation_rows``)."""
    return 2.0 * (1.0 - rank_correlation_rows(logits, rows, k, rank_temperature)) + base(logits, rows)


_TEMPERED_BASES: dict[str, Callable[..., Tensor]] = {"kl": kl_rows, "topk-renorm": topk_renorm_rows}


_UNTEMPERED_BASES: dict[str, RowLoss] = {
    "topk-ghost": topk_ghost_rows,
    "reverse-kl": reverse_kl_rows,
    "skew-kl": skew_kl_rows,
    "skew-reverse-kl": skew_reverse_kl_rows,
}


def _rlkd_base(name: str, temperature: float) -> RowLoss:
    if name in _TEMPERED_BASES:
        _require_positive("temperature", temperature)
        return partial(_TEMPERED_BASES[name], temperature=temperature)
    if name in _UNTEMPERED_BASES:
        _require_unit_temperature(name, temperature)
        return _UNTEMPERED_BASES[name]
    choices = ", ".join([*_TEMPERED_BASES, *_UNTEMPERED_BASES])
    raise LogitcacheError(f"unknown rlkd base loss {name!r}; choose one of {choices}")


# ---- public losses -----------------------------------------------------------------------


def ce_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 1.0
) -> LossOutput:
    """Cross-entropy on the gold tokens only (the cache is unused; ``alpha`` changes nothing).

    ``student_logits``: ``[B, P, V]`` float. No temperature.
    """
    _require_unit_temperature("ce", temperature)
    return _loss_output(student_logits, batch, ce_rows, alpha)


def rs_kd_loss(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
) -> LossOutput:
    """Random-sampling KD: unbiased sparse CE against ``target_weights`` (count / N).

    ``proposal_temperature``: the ``tau`` the cache was sampled at (``q ∝ t^(1/tau)``); draws are
    re-weighted by ``t / q`` and self-normalised (see ``rs_kd_rows``). No temperature.
    """
    _require_unit_temperature("rs-kd", temperature)
    _require_positive("proposal_temperature", proposal_temperature)
    return _loss_output(student_logits, batch, partial(rs_kd_rows, proposal_temperature=proposal_temperature), alpha)


def topk_renorm_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 1.0
) -> LossOutput:
    """CE against the top-K teacher renormalised over the cached ids (tail dropped); ``T**2``-scaled.

    Outside mass: the student is not renormalised (full-vocabulary softmax), so its mass
    outside the cached ids gets target 0 and is pushed down through the normaliser.
    """
    _require_positive("temperature", temperature)
    return _loss_output(student_logits, batch, partial(topk_renorm_rows, temperature=temperature), alpha)


def topk_ghost_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 1.0
) -> LossOutput:
    """KL with the teacher's tail as one extra "ghost" bucket: ``sum_K t log(t/p) + r log(r/(1 - sum_K p))``.

    Outside mass: the student's mass outside the cached ids is one bucket, ``1 - sum_K p``
    (computed exactly as a logsumexp of the uncached logits), matched to the teacher's tail
    ``r = exp(tail_logprob)``. The student is not renormalised. No temperature.
    """
    _require_unit_temperature("topk-ghost", temperature)
    return _loss_output(student_logits, batch, topk_ghost_rows, alpha)


def kl_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 1.0
) -> LossOutput:
    """Forward ``KL(t || p)`` with the cached ids taken as the teacher's full support; ``T**2``-scaled.

    Outside mass: the teacher is renormalised over the cached ids (its tail is dropped); the
    student is NOT renormalised: ``p`` is the full-vocabulary softmax, so its mass outside the
    cached ids has target 0 and is pushed down through the normaliser (gradient ``p_j``). With
    K = V this is exactly dense forward KL.
    """
    _require_positive("temperature", temperature)
    return _loss_output(student_logits, batch, partial(kl_rows, temperature=temperature), alpha)


def reverse_kl_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 1.0
) -> LossOutput:
    """Reverse ``KL(p || t)`` on the cached support. No temperature.

    Outside mass: penalised through the tail bucket. The student is NOT renormalised; its mass
    outside the cached ids is one bucket ``p_out = 1 - sum_K p`` compared with the teacher's tail
    ``r``: ``sum_K p_i log(p_i/t_i) + p_out log(p_out/r)`` (r floored at 1.2e-7). Why: this is the
    full reverse KL coarse-grained to ``cached ids + [outside]``, so it is a lower bound of the
    true one (log-sum inequality) and exact when K = V; renormalising the student instead would
    leave outside mass unconstrained, letting a mode-seeking student hide mass off the cache.
    """
    _require_unit_temperature("reverse-kl", temperature)
    return _loss_output(student_logits, batch, reverse_kl_rows, alpha)


def _require_skew(skew: float) -> None:
    if not 0.0 < skew < 1.0:
        raise LogitcacheError(f"skew={skew} must lie strictly between 0 and 1 (DistiLLM uses 0.1)")


def skew_kl_loss(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> LossOutput:
    """DistiLLM skew KL ``KL(t || skew t + (1 - skew) p)`` on the cached support. No temperature.

    Outside mass: penalised through the tail bucket, as in ``reverse_kl_loss``: the student is
    NOT renormalised; its outside mass is one bucket ``p_out = 1 - sum_K p`` mixed and compared
    with the teacher's tail ``r``. The mixture keeps every term finite (at most ``log(1/skew)``
    per unit of teacher mass), so no floor is needed.
    """
    _require_unit_temperature("skew-kl", temperature)
    _require_skew(skew)
    return _loss_output(student_logits, batch, partial(skew_kl_rows, skew=skew), alpha)


def skew_reverse_kl_loss(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> LossOutput:
    """DistiLLM skew reverse KL ``KL(p || (1 - skew) t + skew p)`` on the cached support. No temperature.

    Outside mass: penalised through the tail bucket, as in ``reverse_kl_loss``: the student is
    NOT renormalised; its outside mass is one bucket ``p_out = 1 - sum_K p`` compared with
    ``(1 - skew) r + skew p_out``, which costs at most ``p_out log(1/skew)``, so no floor is needed.
    """
    _require_unit_temperature("skew-reverse-kl", temperature)
    _require_skew(skew)
    return _loss_output(student_logits, batch, partial(skew_reverse_kl_rows, skew=skew), alpha)


def gkd_jsd_loss(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> LossOutput:
    """GKD's generalised JSD ``beta KL(t || m) + (1 - beta) KL(p || m)``, ``m = beta t + (1 - beta) p``, on
    the cached support (Agarwal et al., on-policy distillation: meant for the student's own samples,
    valid on any cache). No temperature. ``beta`` -> 0 behaves like forward KL, -> 1 like reverse KL
    (each scaled by ``beta`` resp. ``1 - beta``); 0.5 is the symmetric JSD, bounded by ``log 2`` a position.

    Outside mass: as in ``skew_kl_loss``, the student is NOT renormalised; its mass outside the cached
    ids is one bucket compared with the teacher's tail, and the mixture keeps every term finite.
    """
    _require_unit_temperature("gkd-jsd", temperature)
    if not 0 < beta < 1:
        raise LogitcacheError(f"--jsd-beta {beta}: must lie in (0, 1)")
    return _loss_output(student_logits, batch, partial(gkd_jsd_rows, beta=beta), alpha)


FUTURE_REWARD = "future_reward"


BASELINES = ("whiten", "none")


DEFAULT_BASELINE = "whiten"


def with_future_rewards(batch: Mapping[str, Tensor], baseline: str) -> dict[str, Tensor]:
    """``batch`` with MiniLLM's length-normalised long-term reward ``future_reward [B, P] float32``: at a
    drawn position ``t`` (counted, ``behavior_logprob`` finite) with later drawn positions in its sequence, the
    mean ``A_t`` of ``r_u = gold_logprob_u - behavior_logprob_u`` over those positions ``u > t``; 0 elsewhere.

    ``r_u`` is the per-token log-ratio ``log p(y_u) - log q(y_u)`` of teacher and student at the time of
    sampling (the reward of MiniLLM, computed at rollout as PPO does); sequences are rows, or the segments
    of a packed row (``position_ids`` restarting at 0). ``baseline``: ``whiten`` (what MiniLLM's
    implementation does) standardises the ``A_t`` of the batch to mean 0 and standard deviation 1, a
    baseline that removes the common part of the rewards (a student worse than its teacher everywhere has
    negative rewards everywhere, whose policy gradient only adds noise); ``none`` keeps them as they are.
    """
    _check_baseline(baseline)
    behavior = batch["behavior_logprob"].double()
    drawn = batch["position_mask"] & torch.isfinite(behavior)
    # a gold token of teacher probability 0 (a masked logit) is given the floor reverse KL gives the tail
    gold = batch["gold_logprob"].double().clamp_min(_MIN_TAIL_LOGPROB)
    reward = torch.where(drawn, gold - behavior, torch.zeros_like(behavior))
    if "position_ids" in batch:  # position p belongs to the segment of token p
        segment = (batch["position_ids"][:, :-1] == 0).long().cumsum(1)
    else:
        segment = torch.zeros_like(reward, dtype=torch.long)
    width = int(segment.max()) + 1 if segment.numel() else 1

    def after(values: Tensor) -> Tensor:
        """``[B, P]``: the sum of ``values`` over the later positions of each position's own segment."""
        totals = values.new_zeros(values.shape[0], width).scatter_add_(1, segment, values)
        later_segments = totals.flip(1).cumsum(1).flip(1) - totals  # the segments after each one
        return values.sum(1, keepdim=True) - values.cumsum(1) - later_segments.gather(1, segment)

    rewards, count = after(reward), after(drawn.double())  # float64: differences of sums over long packed rows
    scored = drawn & (count > 0.5)
    future = torch.where(scored, rewards / count.clamp_min(1.0), torch.zeros_like(rewards))
    if baseline == "whiten" and scored.any():
        values = future[scored]
        spread = values.std(unbiased=False) if values.numel() > 1 else values.new_ones(())
        future = torch.where(scored, (future - values.mean()) / (spread + _WHITEN_EPS), future)
    return {**batch, FUTURE_REWARD: future.float()}


_WHITEN_EPS = 1e-6


def _check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        raise LogitcacheError(f"--pg-baseline {baseline}: use one of {', '.join(BASELINES)}")


def prepare_batch(name: str, batch: Mapping[str, Tensor], options: Mapping[str, object]) -> Mapping[str, Tensor]:
    """What loss ``name`` (with ``options``) computes over whole sequences before its rows are taken one chunk at a
    time (fused): ``minillm``'s future rewards; ``batch`` itself for every other loss."""
    if name == "minillm" and "behavior_logprob" in batch and FUTURE_REWARD not in batch:
        return with_future_rewards(batch, options.get("baseline", DEFAULT_BASELINE))
    return batch


def minillm_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 1.0, clip: float = 0.2,
    baseline: str = DEFAULT_BASELINE,
) -> LossOutput:
    """MiniLLM (Gu et al., 2023) offline, in rounds: the reverse KL ``KL(q_theta || p)`` of student and teacher on
    sequences the student drew, by policy gradient (:func:`minillm_rows`), on a cache built from ``logitcache
    generate``'s output (format v3: ``behavior_logprob``), sampled at temperature 1 and top-p 1 so that the
    recorded log-probabilities are the student's own (``train.settings.minillm_ready`` refuses other caches).

    MiniLLM splits the gradient of the sequence-level reverse KL into a single-step term, the exact gradient
    of each position's reverse KL (here on the cached support, as ``reverse-kl``: the student's mass outside
    the stored ids is one bucket against the teacher's tail), and a long-term term, the policy gradient of
    the rewards still to come, ``R_{t+1} = mean_{u > t} log(p(y_u) / q(y_u))`` (its length normalisation),
    whose only teacher input is the log-probability of each drawn token: the cache's ``gold_logprob``.
    Samples go stale as the student trains on them, so each token is importance-weighted by
    ``q_theta(y_t) / q_old(y_t)`` with ``q_old`` recorded at generation time, clipped to ``1 +- clip`` as in
    PPO, which MiniLLM builds on. ``baseline``: see :func:`with_future_rewards` (``whiten``, the default, is per
    loss call, i.e. per micro-batch, as MiniLLM's per PPO mini-batch; then gradient accumulation is not exactly
    one large batch). Taken from MiniLLM: the two terms, the length normalisation, per-token importance
    weights, clipping, whitened advantages (its implementation). Differences: the long-term reward starts after
    ``t`` (the paper's ``R_{t+1}``; its implementation adds ``r_t``), and the single-step term is on the cached
    support, weighted by the clipped ratio. Not taken: teacher-mixed sampling (the teacher is offline; off-policy data is
    mixed in per round instead) and the pre-training loss (use ``alpha``: CE on the drawn tokens). No
    temperature.
    """
    _require_unit_temperature("minillm", temperature)
    if not 0 < clip < 1:
        raise LogitcacheError(f"--pg-clip {clip}: must lie in (0, 1)")
    if "behavior_logprob" not in batch:
        if batch["position_mask"].any():
            raise LogitcacheError("minillm needs the sampling log-probabilities of generated responses: a cache built "
                                  "from `logitcache generate`'s output (format v3 on, --format chat or prompt-response)")
        nothing = torch.full(batch["position_mask"].shape, math.nan, device=batch["position_mask"].device)
        batch = {**batch, "behavior_logprob": nothing}  # nothing counts
    _check_baseline(baseline)
    prepared = prepare_batch("minillm", batch, {"baseline": baseline})
    return _loss_output(student_logits, prepared, partial(minillm_rows, clip=clip), alpha)


def bild_loss(
    student_logits: Tensor, batch: Mapping[str, Tensor], *, alpha: float = 0.0, temperature: float = 3.0, k: int = 8
) -> LossOutput:
    """BiLD (t-LD + s-LD over top-k logit differences, divided by ``temperature``, no ``T**2``).

    s-LD uses the student's top-k among the cached ids (see ``bild_rows``). 0 when the student's
    logits equal the teacher's log-probs plus a constant.
    """
    _require_positive("temperature", temperature)
    _require_positive("k", k)
    return _loss_output(student_logits, batch, partial(bild_rows, k=k, temperature=temperature), alpha)


def rlkd_loss(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    k: int = 15,
    rank_temperature: float = 0.1,
    base: str = "kl",
) -> LossOutput:
    """RLKD ``2 * (1 - rho) + base``: rho is the Pearson correlation of sigmoid soft ranks
    (``rank_i = sum_j sigmoid((v_i - v_j) / rank_temperature)``) of teacher log-probs and student
    logits on the union of both top-k, restricted to cached ids.

    ``base``: kl (default) or topk-renorm, tempered by ``temperature``; or topk-ghost,
    reverse-kl, skew-kl, skew-reverse-kl (temperature 1). The rank term has no temperature.
    """
    _require_positive("rank_temperature", rank_temperature)
    _require_positive("k", k)
    kd = partial(rlkd_rows, base=_rlkd_base(base, temperature), k=k, rank_temperature=rank_temperature)
    return _loss_output(student_logits, batch, kd, alpha)


LOSSES: dict[str, LossFn] = {
    "ce": ce_loss,
    "rs-kd": rs_kd_loss,
    "topk-renorm": topk_renorm_loss,
    "topk-ghost": topk_ghost_loss,
    "kl": kl_loss,
    "reverse-kl": reverse_kl_loss,
    "skew-kl": skew_kl_loss,
    "skew-reverse-kl": skew_reverse_kl_loss,
    "gkd-jsd": gkd_jsd_loss,
    "minillm": minillm_loss,
    "bild": bild_loss,
    "rlkd": rlkd_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; an unknown name raises ``LogitcacheError`` listing the choices."""
    if name not in LOSSES:
        raise LogitcacheError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def default_temperature(name: str) -> float:
    """The temperature loss ``name`` uses when none is given (3 for bild, else 1)."""
    return inspect.signature(get_loss(name)).parameters["temperature"].default


def check_options(name: str, *, alpha: float = 0.0, temperature: float | None = None, **options: float | str) -> float:
    """Raise the ``LogitcacheError`` (or ``TypeError`` for an unknown keyword) that loss ``name``
    raises for these options, before any data is seen; return the temperature it will use
    (``None``: the loss's own default, 3 for bild, else 1).

    Runs the loss on an empty batch, so the checks are the loss's own and cannot drift from it.
    """
    loss = get_loss(name)
    if temperature is None:
        temperature = default_temperature(name)
    empty = {
        "labels": torch.zeros(0, 0, dtype=torch.int64),
        "target_ids": torch.zeros(0, 0, 0, dtype=torch.int64),
        "target_mask": torch.zeros(0, 0, 0, dtype=torch.bool),
        "target_logprobs": torch.zeros(0, 0, 0),
        "target_weights": torch.zeros(0, 0, 0),
        "tail_logprob": torch.zeros(0, 0),
        "gold_logprob": torch.zeros(0, 0),
        "position_mask": torch.zeros(0, 0, dtype=torch.bool),
    }
    loss(torch.zeros(0, 0, 1), empty, alpha=alpha, temperature=temperature, **options)
    return temperature
