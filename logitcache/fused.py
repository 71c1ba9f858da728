"""The output head and the loss in one chunked pass: the student's ``[B, P, V]`` logits never exist.

``fused_loss(name, hidden, head_weight, batch)`` equals ``get_loss(name)(hidden @ head_weight.T, batch)``
(same value, same gradients, same :class:`~logitcache.losses.LossOutput` contract: a SUM over the
counted positions and their number) but walks the counted positions in chunks of ``C`` rows:

1. logits ``z = h @ W.T`` ``[C, V]`` float32 for one chunk (the matmul in the autocast dtype);
2. the per-row loss and its gradient with respect to ``z``;
3. at once, the chunk's share of the gradients ``dh = dz @ W`` and ``dW += dz.T @ h``.

Peak memory is a few ``[C, V]`` float32 buffers plus the ``[R, H]`` and ``[V, H]`` gradients,
whatever ``B * P`` is.

Why the gradient in forward rather than logits recomputed in backward: it takes the same three
head matmuls per step as the unfused path, where recomputing takes four (a third more head
FLOPs) and a second softmax over ``[R, V]``. The price: forward computes gradients even if
backward never runs (so a forward without grad, e.g. evaluation, skips them), and the saved
gradients are scaled in place by backward, so backward runs once (a second
``backward(retain_graph=True)`` raises instead of scaling twice).

Closed forms. ``ce``, ``rs-kd``, ``topk-renorm`` and ``kl`` are soft cross-entropies against the
tempered student, ``scale * (sum_k w_k * lse(z / T) - sum_k w_k z[id_k] / T)`` per row (``kl`` adds
the teacher's negative entropy, a constant), whose gradient is
``scale / T * (sum_k w_k * softmax(z / T) - w scattered at the ids)``. ``topk-ghost`` adds the
outside bucket ``u * (lse(z) - lse_uncached(z))``, ``u`` the teacher's renormalised tail, whose
gradient is ``u * p`` on the cached ids and ``u * (p - q)`` elsewhere, ``q`` the softmax over
the uncached ids. These run in place on the chunk's logits buffer (a logsumexp, a subtract, an
exp and scatters of ``[C, K]`` values) with no autograd graph, so a KD step costs what a CE step
costs. The teacher weights come from the same pure pieces of :mod:`logitcache.losses`, and the
cached ids of a row are assumed distinct, as a cache stores them.

Every other loss of :data:`~logitcache.losses.LOSSES` runs its plain function on each chunk under
autograd: the same memory bound, at the plain loss's speed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.losses import _LOG_ZERO, LOSSES, LossOutput, Rows, _kl, _masked_log_softmax, get_loss, select_rows

_CLOSED_FORMS = ("ce", "rs-kd", "topk-renorm", "kl", "topk-ghost")

# (logits [C, V] float32, that may be overwritten; rows; whether to return the gradient)
#   -> (loss summed over the rows [] float32, d loss / d logits [C, V] float32 or None)
ChunkLoss = Callable[[Tensor, Rows, bool], tuple[Tensor, Tensor | None]]


def supports(name: str) -> bool:
    """Whether ``fused_loss`` computes ``name``: every loss of ``LOSSES`` (closed forms for
    ce, rs-kd, topk-renorm, kl and topk-ghost; the plain loss per chunk for the others)."""
    return name in LOSSES


def default_chunk_rows(vocab_size: int, hidden_size: int, device: torch.device | str) -> int:
    """Counted positions per chunk when ``fused_loss`` is given none.

    Every chunk reads the head ``[V, H]`` three times and rewrites its gradient once, so chunks
    must be tall enough for that to stay small beside the chunk's own logits traffic. GPU: at
    least 512 rows (the head matmuls stay compute-bound) and 16M logits (64 MiB float32). CPU:
    ``2 * H`` rows, with the chunk's logits kept between 128K elements (L2-sized, 512 KiB) and 4M
    (16 MiB); measured best for H = 64 at V = 2048 and 32768.
    """
    if torch.device(device).type == "cuda":
        return max(512, (1 << 24) // vocab_size)
    return max(1, (1 << 17) // vocab_size, min(2 * hidden_size, (1 << 22) // vocab_size))


# ---- closed forms ------------------------------------------------------------------------


class _Part(NamedTuple):
    """``scale * (sum_k w_k * lse(z / T) - sum_k w_k * z[ids_k] / T)`` ``[C]``: a soft cross-entropy.

    ids ``[C, K] int64``, weights ``[C, K] float32`` (0 at padding).
    """

    temperature: float
    scale: float
    ids: Tensor
    weights: Tensor


class _Outside(NamedTuple):
    """``weight * (lse(z) - lse(z over the ids not in ids[mask]))`` ``[C]``: topk-ghost's outside bucket."""

    weight: Tensor
    ids: Tensor
    mask: Tensor


class _ClosedForm(NamedTuple):
    """A chunk's loss ``sum(parts) + outside + constant`` ``[C]`` as a function of its logits."""

    parts: list[_Part]
    outside: _Outside | None
    constant: Tensor


def _normalised(log_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``log softmax`` over the masked entries and its ``exp`` with 0 at padding, both ``[C, K]``."""
    log_t = _masked_log_softmax(log_values, mask)
    return log_t, log_t.exp().masked_fill(~mask, 0.0)


def _kd_form(name: str, rows: Rows, vocab_size: int, scale: float, temperature: float, options: Mapping) -> _ClosedForm:
    """``scale`` times the KD term of ``name`` (the ``*_rows`` function of losses.py, in closed form)."""
    zero = rows.tail_logprob.new_zeros(rows.tail_logprob.shape)
    if name == "rs-kd":
        tau = options.get("proposal_temperature", 1.0)
        _, w = _normalised(rows.weights.log() + (1.0 - 1.0 / tau) * rows.logprobs, rows.mask)
        return _ClosedForm([_Part(1.0, scale, rows.ids, w)], None, zero)
    if name in ("topk-renorm", "kl"):
        log_t, t = _normalised(rows.logprobs / temperature, rows.mask)
        scale *= temperature**2
        constant = scale * _kl(log_t, torch.zeros_like(log_t), rows.mask) if name == "kl" else zero
        return _ClosedForm([_Part(temperature, scale, rows.ids, t)], None, constant)
    assert name == "topk-ghost", name
    # Buckets: the cached ids + [outside]; no outside bucket when the ids cover the vocabulary.
    buckets = torch.cat([rows.mask, rows.mask.sum(-1, keepdim=True) < vocab_size], -1)
    log_t, t = _normalised(torch.cat([rows.logprobs, rows.tail_logprob[:, None]], -1), buckets)
    negative_entropy = _kl(log_t, torch.zeros_like(log_t), buckets)
    return _ClosedForm([_Part(1.0, scale, rows.ids, t[:, :-1])], _Outside(scale * t[:, -1], rows.ids, rows.mask), scale * negative_entropy)


def _closed_form(name: str, rows: Rows, vocab_size: int, alpha: float, temperature: float, options: Mapping) -> _ClosedForm:
    """``(1 - alpha) * kd + alpha * ce``; a term weighted 0 is left out, as in ``mixed_rows``."""
    kd_weight, ce_weight = (0.0, 1.0) if name == "ce" else (1.0 - alpha, alpha)
    form = _ClosedForm([], None, rows.tail_logprob.new_zeros(rows.tail_logprob.shape))
    if kd_weight:
        form = _kd_form(name, rows, vocab_size, kd_weight, temperature, options)
    if ce_weight:
        gold = _Part(1.0, ce_weight, rows.labels[:, None], torch.ones_like(rows.labels[:, None], dtype=torch.float32))
        form = form._replace(parts=[*form.parts, gold])
    return form


def _soft_cross_entropy(
    scaled: Tensor, parts: list[_Part], outside: _Outside | None, temperature: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """The ``parts`` (all at ``temperature``) and ``outside`` on ``scaled = z / temperature`` ``[C, V]``.

    Returns the loss summed over rows and its gradient with respect to ``z``, computed in
    ``scaled``'s buffer. With an outside bucket the cached logits are first set to ~log(0) in
    place, which gives ``lse_uncached`` with one logsumexp; the full ``lse`` adds the cached ones back.
    """
    ids = torch.cat([p.ids for p in parts], -1)
    weights = torch.cat([p.scale * p.weights for p in parts], -1)
    coef = weights.sum(-1)
    value = -(weights * scaled.gather(-1, ids)).sum()
    if outside is None:
        lse = scaled.logsumexp(-1)
        value = value + (coef * lse).sum()
    else:
        cached = scaled.gather(-1, outside.ids).masked_fill(~outside.mask, _LOG_ZERO)
        marks = torch.full_like(cached, math.inf).masked_fill_(outside.mask, _LOG_ZERO)
        scaled.scatter_reduce_(-1, outside.ids, marks, "amin")
        lse_out = scaled.logsumexp(-1)
        lse = torch.logaddexp(lse_out, cached.logsumexp(-1))
        value = value + (coef * lse + outside.weight * (lse - lse_out)).sum()
    if not need_grad:
        return value, None
    if outside is None:
        # coef * softmax(z / T) / T: exp(z / T - lse + log(coef / T)); coef 0 gives exp(-inf) = 0.
        grad = scaled.sub_((lse - (coef / temperature).log())[:, None]).exp_()
        return value, grad.scatter_add_(-1, ids, weights / -temperature)
    # Uncached j: coef * p_j - u * q_j = q_j * (coef * p_out - u), q = softmax over the uncached
    # (stable when p_out underflows). Cached entries are exp(log 0) = 0 here; they get coef * p_i.
    coef = coef + outside.weight
    grad = scaled.sub_(lse_out[:, None]).exp_().mul_((coef * (lse_out - lse).exp() - outside.weight)[:, None])
    cached_p = coef[:, None] * (cached - lse[:, None]).exp()
    return value, grad.scatter_add_(-1, torch.cat([outside.ids, ids], -1), torch.cat([cached_p, -weights], -1))


def _closed_form_chunk(
    z: Tensor, rows: Rows, need_grad: bool, *, name: str, alpha: float, temperature: float, options: Mapping
) -> tuple[Tensor, Tensor | None]:
    """A :data:`ChunkLoss` for the closed-form losses; ``z`` is overwritten."""
    form = _closed_form(name, rows, z.shape[-1], alpha, temperature, options)
    # At most two temperatures (KD at T, gold CE at 1); T = 1 goes last and works in z's buffer.
    temperatures = sorted({p.temperature for p in form.parts}, key=lambda t: t == 1.0)
    total, grad = form.constant.sum(), None
    for i, t in enumerate(temperatures):
        scaled = z.div_(t) if i == len(temperatures) - 1 else z / t
        parts = [p for p in form.parts if p.temperature == t]
        value, part_grad = _soft_cross_entropy(scaled, parts, form.outside if t == 1.0 else None, t, need_grad)
        total = total + value
        grad = part_grad if grad is None else grad.add_(part_grad)
    return total, grad


# ---- any other loss: the plain function on each chunk --------------------------------------


def _rows_batch(rows: Rows) -> dict[str, Tensor]:
    """``C`` rows as a collated batch of ``C`` windows of one counted position each."""
    return {
        "labels": rows.labels[:, None],
        "target_ids": rows.ids[:, None],
        "target_mask": rows.mask[:, None],
        "target_logprobs": rows.logprobs[:, None],
        "target_weights": rows.weights[:, None],
        "tail_logprob": rows.tail_logprob[:, None],
        "position_mask": torch.ones_like(rows.labels[:, None], dtype=torch.bool),
    }


def _plain_chunk(z: Tensor, rows: Rows, need_grad: bool, *, loss: Callable[..., LossOutput]) -> tuple[Tensor, Tensor | None]:
    """A :data:`ChunkLoss` that runs the plain loss (bound to its options) under autograd."""
    batch = _rows_batch(rows)
    if not need_grad:
        return loss(z[:, None], batch).total, None
    z.requires_grad_(True)
    with torch.enable_grad():
        total = loss(z[:, None], batch).total
    (grad,) = torch.autograd.grad(total, z)
    return total.detach(), grad


# ---- the chunked head --------------------------------------------------------------------


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Rows,
    chunk_loss: ChunkLoss,
    chunk_rows: int,
    dtype: torch.dtype,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The loss over ``hidden [R, H]`` summed, and the gradients ``want``ed of (hidden, weight, bias).

    Matmuls run in ``dtype`` (the autocast dtype, or the inputs'); logits, the loss and the
    head's gradient accumulators are float32.
    """
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    need_grad = any(want)
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if want[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want[2] else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(dtype)
            z = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()
            value, grad_z = chunk_loss(z, Rows(*(t[start : start + chunk_rows] for t in rows)), need_grad)
            total += value
            if not need_grad:
                continue
            grad_z_mm = grad_z.to(dtype)
            if grad_h is not None:
                grad_h[start : start + chunk_rows] = grad_z_mm @ w
            if grad_w is not None and dtype == torch.float32:
                grad_w.addmm_(grad_z_mm.T, h)
            elif grad_w is not None:
                grad_w += grad_z_mm.T @ h
            if grad_b is not None:
                grad_b += grad_z.sum(0)
    cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
    return total, grad_h, cast(grad_w, weight), cast(grad_b, bias)


class _FusedHeadLoss(torch.autograd.Function):
    """``_chunked`` as an autograd node: gradients made in forward, scaled by backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, chunk_loss, chunk_rows, dtype):  # noqa: ANN001, ANN205
        total, *grads = _chunked(hidden, weight, bias, rows, chunk_loss, chunk_rows, dtype, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        # In place: the saved gradients are used once. A second backward finds them modified and raises.
        grads = [None if g is None else g.mul_(grad_total) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def _check_options(name: str, alpha: float, temperature: float, options: Mapping) -> None:
    """Raise what the plain loss raises for these options (it runs on an empty batch)."""
    empty = {
        "labels": torch.zeros(0, 0, dtype=torch.int64),
        "target_ids": torch.zeros(0, 0, 0, dtype=torch.int64),
        "target_mask": torch.zeros(0, 0, 0, dtype=torch.bool),
        "target_logprobs": torch.zeros(0, 0, 0),
        "target_weights": torch.zeros(0, 0, 0),
        "tail_logprob": torch.zeros(0, 0),
        "position_mask": torch.zeros(0, 0, dtype=torch.bool),
    }
    get_loss(name)(torch.zeros(0, 0, 1), empty, alpha=alpha, temperature=temperature, **options)


def fused_loss(
    name: str,
    hidden: Tensor,
    head_weight: Tensor,
    batch: Mapping[str, Tensor],
    *,
    alpha: float = 0.0,
    temperature: float | None = None,
    chunk_rows: int | None = None,
    head_bias: Tensor | None = None,
    **options: float | str,
) -> LossOutput:
    """``get_loss(name)(hidden @ head_weight.T + head_bias, batch, ...)`` without the ``[B, P, V]`` logits.

    ``hidden``: ``[B, P, H]`` the student's final hidden states (after its last norm), position
    ``p`` predicting token ``p + 1`` (``model.model(...).last_hidden_state[:, :-1]`` for an HF
    causal LM). ``head_weight``: ``[V, H]`` (``lm_head.weight``); ``head_bias``: ``[V]`` or None.
    Only for students whose logits are exactly ``hidden @ W.T + b`` (no logit scale or soft-cap).
    ``alpha``, ``temperature`` (None: the plain loss's default, 3 for bild, else 1) and
    ``options`` (``proposal_temperature``, ``skew``, ``k``, ...) are the plain loss's and are
    checked by it. ``chunk_rows``: counted positions per chunk (default
    :func:`default_chunk_rows`). Under autocast the head's matmuls run in the autocast dtype,
    the loss in float32, as on the plain path.
    """
    if hidden.shape[:2] != batch["labels"].shape:
        raise LogitcacheError(
            f"hidden states have shape {tuple(hidden.shape)} but the batch has {tuple(batch['labels'].shape)} "
            "positions; pass hidden[:, :-1] (position t predicts token t + 1)"
        )
    if temperature is None:
        temperature = inspect.signature(get_loss(name)).parameters["temperature"].default
    _check_options(name, alpha, temperature, options)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(head_weight.shape[0], head_weight.shape[1], hidden.device)
    if chunk_rows < 1:
        raise LogitcacheError(f"chunk_rows={chunk_rows} must be at least 1")
    if name in _CLOSED_FORMS:
        chunk_loss = partial(_closed_form_chunk, name=name, alpha=alpha, temperature=temperature, options=options)
    else:
        chunk_loss = partial(_plain_chunk, loss=partial(get_loss(name), alpha=alpha, temperature=temperature, **options))
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
    hidden_rows, rows = select_rows(hidden, batch)
    tokens = batch["position_mask"].sum()
    tensors = (hidden_rows, head_weight, head_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        total = _FusedHeadLoss.apply(*tensors, rows, chunk_loss, chunk_rows, dtype)
    else:
        total = _chunked(*tensors, rows, chunk_loss, chunk_rows, dtype, (False, False, False))[0]
    return LossOutput(total=total, tokens=tokens)
