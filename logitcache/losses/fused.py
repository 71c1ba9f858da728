"""The output head and the loss in one chunked pass: the student's ``[B, P, V]`` logits never exist.

``fused_loss(name, hidden, head_weight, batch)`` equals ``get_loss(name)(hidden @ head_weight.T, batch)``
(same value, same gradients, same :class:`~logitcache.losses.sparse.LossOutput` contract: a SUM over the
counted positions and their number) but walks the counted positions in chunks of ``C`` rows:

1. logits ``z = h @ W.T`` ``[C, V]`` float32 for one chunk (the matmul in the autocast dtype);
2. the per-row loss and its gradient with respect to ``z``;
3. at once, the chunk's share of the gradients ``dh = dz @ W`` and ``dW += dz.T @ h``.

Peak memory is a few ``[C, V]`` float32 buffers plus the ``[R, H]`` and ``[V, H]`` gradients,
whatever ``B * P`` is.

Why the gradient in forward rather than logits recomputed in backward: it takes the same three
head matmuls per step as the unfused path, where recomputing takes four (a third more head
FLOPs: what dominates on a CPU) and a second pass of logsumexp and exp over ``[R, V]`` with
twice the kernel launches (what dominates on a GPU). The price: forward computes gradients even if
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
costs. The teacher weights come from the same pure pieces of :mod:`logitcache.losses.sparse`, per chunk
(``[C, K]``, never ``[R, K]`` temporaries); the cached ids of a row are assumed distinct, as a
cache stores them.

Every other loss of :data:`~logitcache.losses.sparse.LOSSES` runs its plain function on each chunk under
autograd: the same memory bound, at the plain loss's speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.losses.sparse import (
    FUTURE_REWARD,
    LOG_ZERO,
    LOSSES,
    LossOutput,
    Rows,
    check_options,
    get_loss,
    masked_kl,
    masked_log_softmax,
    prepare_batch,
    rows_at,
    rs_kd_log_weights,
)

_CLOSED_FORMS = ("ce", "rs-kd", "topk-renorm", "kl", "topk-ghost")


# (logits [C, V] float32 of the rows in span, may be overwritten; span; whether to return the gradient)
#   -> (loss summed over those rows [] float32, d loss / d logits [C, V] float32 or None)
ChunkLoss = Callable[[Tensor, slice, bool], tuple[Tensor, Tensor | None]]


def supports(name: str) -> bool:
    """Whether ``fused_loss`` computes ``name``: every loss of ``LOSSES`` (closed forms for
    ce, rs-kd, topk-renorm, kl and topk-ghost; the plain loss per chunk for the others)."""
    return name in LOSSES


def packed_inputs(position_ids: Tensor | None) -> dict:
    """The keyword arguments that make an HF causal LM see packed rows alone: ``position_ids`` restarting at
    each row and no KV cache (transformers derives a block-diagonal causal mask from the position ids
    only when there is no attention mask and no cache; with a cache the rows would attend to each other)."""
    return {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}


def student_hidden(model: torch.nn.Module, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """``[B, T, H]``: an HF causal LM's final hidden states (after its last norm), from its own
    forward so that wrappers (DDP, ``torch.compile``) see the call; logits only for the last position.
    ``position_ids [B, T]`` (packed rows, restarting per row) when given: see :func:`packed_inputs`."""
    extra = packed_inputs(position_ids)
    return model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, **extra).hidden_states[-1]


@torch.no_grad()
def linear_head(model: torch.nn.Module, input_ids: Tensor) -> torch.nn.Linear | None:
    """The head of an HF causal LM whose logits are exactly ``head(student_hidden(model, ids))``, else None.

    Checked on ``input_ids`` ``[B, T] int64`` (a row of the first batch will do) in eval mode, so
    that a model which changes its logits after the head (soft-capping, logit scales) or reports
    other hidden states is caught whatever its architecture: it must be trained with the plain loss.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids).logits.float()
        ours = head(student_hidden(model, input_ids)).float()
    except (TypeError, ValueError, IndexError):  # no logits_to_keep, or no hidden states
        return None
    finally:
        model.train(training)
    return head if ours.shape == logits.shape and torch.allclose(ours, logits, rtol=1e-4, atol=1e-4) else None


def default_chunk_rows(vocab_size: int, hidden_size: int, device: torch.device | str) -> int:
    """Counted positions per chunk when ``fused_loss`` is given none.

    Every chunk reads the head ``[V, H]`` three times and rewrites its gradient once, so chunks
    must be tall enough for that to stay small beside the chunk's own logits traffic. GPU: at
    least 512 rows (the head matmuls stay compute-bound) and 64M logits (256 MiB float32; few
    chunks, so few kernel launches). CPU: ``2 * H`` rows, the chunk's logits kept between 128K
    elements (512 KiB, cache-sized) and 4M (16 MiB); measured best for H = 64 at V = 2048 and 32768.
    """
    if torch.device(device).type == "cuda":
        return max(512, (1 << 26) // vocab_size)
    return max(1, (1 << 17) // vocab_size, min(2 * hidden_size, (1 << 22) // vocab_size))


# ---- closed forms ------------------------------------------------------------------------


class _Group(NamedTuple):
    """Soft cross-entropies at one temperature: ``sum_k w_k * (lse(z / T) - z[ids_k] / T)`` ``[R]``.

    ids ``[R, K] int64``; weights ``[R, K] float32`` (scales folded in, 0 at padding); total ``[R]``
    their sum.
    """

    temperature: float
    ids: Tensor
    weights: Tensor
    total: Tensor


class _Outside(NamedTuple):
    """topk-ghost's outside bucket ``weight * (lse(z) - lse(z off the cached ids))`` ``[R]``.

    ids ``[R, K]`` and padding ``[R, K] bool`` of the cached ids; marks ``[R, K]`` float32: ~log(0)
    on cached ids, +inf on padding, so that an ``amin`` scatter masks exactly the cached logits
    (padding id 0 may also be a cached id of the row).
    """

    weight: Tensor
    ids: Tensor
    padding: Tensor
    marks: Tensor


class _ClosedForm(NamedTuple):
    """The loss ``sum(groups) + outside + constant`` ``[R]`` as a function of the rows' logits.

    At most two groups (KD at T, gold CE at 1); the T = 1 group, which the outside bucket joins,
    comes last. Built for one chunk's rows at a time, so that its ``[R, K]`` terms never exist for
    the whole batch (a KD step then peaks where a CE step does).
    """

    groups: list[_Group]
    outside: _Outside | None
    constant: Tensor


def _normalised(log_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``log softmax`` over the masked entries and its ``exp`` with 0 at padding, both ``[R, K]``."""
    log_t = masked_log_softmax(log_values, mask)
    return log_t, log_t.exp().masked_fill(~mask, 0.0)


def _kd_terms(
    name: str, rows: Rows, vocab_size: int, temperature: float, options: Mapping
) -> tuple[float, Tensor, Tensor | None, Tensor]:
    """The KD term of ``name`` (its ``*_rows`` function of losses/sparse.py, in closed form) as
    ``(T, weights [R, K], outside weight [R] or None, constant [R])``, soft targets on ``rows.ids``."""
    zero = rows.tail_logprob.new_zeros(rows.tail_logprob.shape)
    if name == "rs-kd":
        _, w = _normalised(rs_kd_log_weights(rows, options.get("proposal_temperature", 1.0)), rows.mask)
        return 1.0, w, None, zero
    if name in ("topk-renorm", "kl"):
        log_t, t = _normalised(rows.logprobs / temperature, rows.mask)
        negative_entropy = masked_kl(log_t, torch.zeros_like(log_t), rows.mask) if name == "kl" else zero
        return temperature, temperature**2 * t, None, temperature**2 * negative_entropy
    assert name == "topk-ghost", name
    # Buckets: the cached ids + [outside]; no outside bucket when the ids cover the vocabulary.
    buckets = torch.cat([rows.mask, rows.mask.sum(-1, keepdim=True) < vocab_size], -1)
    log_t, t = _normalised(torch.cat([rows.logprobs, rows.tail_logprob[:, None]], -1), buckets)
    return 1.0, t[:, :-1], t[:, -1], masked_kl(log_t, torch.zeros_like(log_t), buckets)


def _closed_form(
    name: str, rows: Rows, vocab_size: int, alpha: float, temperature: float, options: Mapping
) -> _ClosedForm:
    """``(1 - alpha) * kd + alpha * ce`` for all rows; a term weighted 0 is left out, as in ``mixed_rows``."""
    kd_weight, ce_weight = (0.0, 1.0) if name == "ce" else (1.0 - alpha, alpha)
    terms: list[tuple[float, Tensor, Tensor]] = []  # (T, ids, weights)
    outside, constant = None, rows.tail_logprob.new_zeros(rows.tail_logprob.shape)
    if kd_weight:
        t, weights, outside_weight, constant = _kd_terms(name, rows, vocab_size, temperature, options)
        terms.append((t, rows.ids, kd_weight * weights))
        constant = kd_weight * constant
        if outside_weight is not None:
            marks = torch.full_like(rows.logprobs, math.inf).masked_fill_(rows.mask, LOG_ZERO)
            outside = _Outside(kd_weight * outside_weight, rows.ids, ~rows.mask, marks)
    if ce_weight:
        gold = rows.labels[:, None]
        terms.append((1.0, gold, torch.full(gold.shape, ce_weight, device=gold.device)))
    groups = []
    for t in sorted({t for t, _, _ in terms}, key=lambda t: t == 1.0):
        ids = torch.cat([i for u, i, _ in terms if u == t], -1)
        weights = torch.cat([w for u, _, w in terms if u == t], -1)
        groups.append(_Group(t, ids, weights, weights.sum(-1)))
    return _ClosedForm(groups, outside, constant)


def _group_cross_entropy(
    scaled: Tensor, group: _Group, outside: _Outside | None, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """``group`` (and ``outside``) on ``scaled = z / T`` ``[C, V]``: the loss summed over rows and
    its gradient with respect to ``z``, computed in ``scaled``'s buffer.

    With an outside bucket the cached logits are first set to ~log(0) in place, which gives
    ``lse_uncached`` with one logsumexp; the full ``lse`` adds the cached ones back.
    """
    t = group.temperature
    value = -(group.weights * scaled.gather(-1, group.ids)).sum()
    if outside is None:
        lse = scaled.logsumexp(-1)
        value = value + (group.total * lse).sum()
    else:
        cached = scaled.gather(-1, outside.ids).masked_fill_(outside.padding, LOG_ZERO)
        scaled.scatter_reduce_(-1, outside.ids, outside.marks, "amin")
        lse_out = scaled.logsumexp(-1)
        lse = torch.logaddexp(lse_out, cached.logsumexp(-1))
        value = value + (group.total * lse + outside.weight * (lse - lse_out)).sum()
    if not need_grad:
        return value, None
    if outside is None:
        # total * softmax(z / T) / T = exp(z / T - lse + log(total / T)); a total of 0 gives exp(-inf) = 0.
        grad = scaled.sub_((lse - (group.total / t).log())[:, None]).exp_()
        return value, grad.scatter_add_(-1, group.ids, group.weights / -t)
    # Uncached j: coef * p_j - u * q_j = q_j * (coef * p_out - u), q = softmax over the uncached
    # (stable when p_out underflows). Cached entries are exp(log 0) = 0 here; they get coef * p_i.
    coef = group.total + outside.weight
    grad = scaled.sub_(lse_out[:, None]).exp_().mul_((coef * (lse_out - lse).exp() - outside.weight)[:, None])
    grad.scatter_add_(-1, outside.ids, coef[:, None] * (cached - lse[:, None]).exp())
    return value, grad.scatter_add_(-1, group.ids, -group.weights)


def _closed_form_chunk(
    z: Tensor, span: slice, need_grad: bool, *, rows: Callable[[slice], Rows], form: Callable[[Rows], _ClosedForm]
) -> tuple[Tensor, Tensor | None]:
    """A :data:`ChunkLoss` for the closed-form losses (``form`` of the chunk's rows); ``z`` is overwritten."""
    form = form(rows(span))
    total, grad = form.constant.sum(), None
    for i, group in enumerate(form.groups):
        t = group.temperature
        last = i == len(form.groups) - 1
        scaled = (z if t == 1.0 else z.div_(t)) if last else z / t
        value, group_grad = _group_cross_entropy(scaled, group, form.outside if t == 1.0 else None, need_grad)
        total = total + value
        grad = group_grad if grad is None else grad.add_(group_grad)
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
        **{name: values[:, None] for name, values in (("behavior_logprob", rows.behavior), (FUTURE_REWARD, rows.future_reward))
           if values is not None},
    }


def _plain_chunk(
    z: Tensor, span: slice, need_grad: bool, *, rows: Callable[[slice], Rows], loss: Callable[..., LossOutput]
) -> tuple[Tensor, Tensor | None]:
    """A :data:`ChunkLoss` that runs the plain loss (bound to its options) under autograd."""
    batch = _rows_batch(rows(span))
    if not need_grad:
        return loss(z[:, None], batch).total, None
    z.requires_grad_(True)
    with torch.enable_grad():
        total = loss(z[:, None], batch).total
    (grad,) = torch.autograd.grad(total, z)
    return total.detach(), grad


# ---- the chunked head --------------------------------------------------------------------


def _row_taker(batch: Mapping[str, Tensor], positions: Tensor) -> Callable[[slice], Rows]:
    """``take(span)``: the :class:`Rows` of the counted ``positions[span]`` (``[R, 2]`` (window,
    position) pairs), gathered from the batch one chunk at a time: no ``[R, K]`` copy of the targets."""
    return lambda span: rows_at(batch, *positions[span].unbind(1))


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
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
            value, grad_z = chunk_loss(z, slice(start, start + chunk_rows), need_grad)
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
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return total, grad_h, grad_w, grad_b


class _FusedHeadLoss(torch.autograd.Function):
    """``_chunked`` as an autograd node: gradients made in forward, scaled by backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, chunk_rows, dtype):  # noqa: ANN001, ANN205
        total, *grads = _chunked(hidden, weight, bias, chunk_loss, chunk_rows, dtype, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        # In place: the saved gradients are used once. A second backward finds them modified and raises.
        grads = [None if g is None else g.mul_(grad_total) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


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
    ``p`` predicting token ``p + 1`` (``student_hidden(model, input_ids)[:, :-1]``).
    ``head_weight``: ``[V, H]`` (``lm_head.weight``); ``head_bias``: ``[V]`` or None. Only for
    students whose logits are exactly ``hidden @ W.T + b`` (see :func:`linear_head`).
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
    temperature = check_options(name, alpha=alpha, temperature=temperature, **options)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(head_weight.shape[0], head_weight.shape[1], hidden.device)
    if chunk_rows < 1:
        raise LogitcacheError(f"chunk_rows={chunk_rows} must be at least 1")
    batch = prepare_batch(name, batch, options)  # what a loss takes from whole sequences, before rows go by chunks
    positions = batch["position_mask"].nonzero()  # the counted positions, in select_rows' order
    hidden_rows, rows = hidden[positions[:, 0], positions[:, 1]], _row_taker(batch, positions)
    if name in _CLOSED_FORMS:
        form = partial(_closed_form, name, vocab_size=head_weight.shape[0], alpha=alpha, temperature=temperature, options=options)
        chunk_loss = partial(_closed_form_chunk, rows=rows, form=form)
    else:
        loss = partial(get_loss(name), alpha=alpha, temperature=temperature, **options)
        chunk_loss = partial(_plain_chunk, rows=rows, loss=loss)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
    tokens = batch["position_mask"].sum()
    tensors = (hidden_rows, head_weight, head_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        total = _FusedHeadLoss.apply(*tensors, chunk_loss, chunk_rows, dtype)
    else:
        total = _chunked(*tensors, chunk_loss, chunk_rows, dtype, (False, False, False))[0]
    return LossOutput(total=total, tokens=tokens)
