"""Losses against plain dense / loop references, masks, accumulation and invariants.

Batches are built here the way the loader collates them (docs/CONTRACTS.md) from a dense
teacher distribution the test knows, so every sparse loss can be checked against the dense truth.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.losses.sparse import LOSSES, LossOutput, get_loss

V = 40
KL_FAMILY = ["kl", "topk-ghost", "reverse-kl", "skew-kl", "skew-reverse-kl", "gkd-jsd", "bild"]


# ---- building collated batches ------------------------------------------------------------


def dense_teacher(shape: tuple[int, int], scale: float = 2.0, seed: int = 0, vocab: int = V) -> Tensor:
    """Teacher log-probs [B, P, vocab] float32."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, vocab, generator=g)).log_softmax(-1)


def student_logits(shape: tuple[int, int], seed: int = 1, vocab: int = V) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(*shape, vocab, generator=g)).requires_grad_()


def sparse_batch(
    teacher: Tensor, keep: Tensor, weights: Tensor, position_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Collate the ids where ``keep`` [B, P, V] is set, ordered by descending teacher log-prob."""
    order = teacher.masked_fill(~keep, -math.inf).argsort(-1, descending=True)
    ids = order[..., : int(keep.sum(-1).max())]
    mask = keep.gather(-1, ids)
    ids = ids.where(mask, 0)
    b, p = teacher.shape[:2]
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, teacher.shape[-1], (b, p), generator=g)
    # as if a student had drawn the labels: each with the log-probability it was drawn with, the first not drawn
    behavior = torch.log(0.05 + 0.9 * torch.rand(b, p, generator=g))
    behavior[:, 0] = math.nan
    return {
        "labels": labels,
        "target_ids": ids,
        "target_mask": mask,
        "target_logprobs": teacher.gather(-1, ids).where(mask, 0.0),
        "target_weights": weights.gather(-1, ids).where(mask, 0.0),
        "tail_logprob": teacher.masked_fill(keep, -math.inf).logsumexp(-1),
        "gold_logprob": teacher.gather(-1, labels[..., None]).squeeze(-1),
        "behavior_logprob": behavior,
        "position_mask": torch.ones(b, p, dtype=torch.bool) if position_mask is None else position_mask,
    }


def topk_batch(teacher: Tensor, k: int, position_mask: Tensor | None = None) -> dict[str, Tensor]:
    top = teacher.topk(k, -1).indices
    keep = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, top, True)
    return sparse_batch(teacher, keep, teacher.exp(), position_mask)


def fp16_cache(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch as read back from a shard: teacher log-probs stored as float16."""
    rounded = dict(batch)
    for key in ("target_logprobs", "tail_logprob", "gold_logprob"):
        rounded[key] = batch[key].half().float()
    rounded["target_weights"] = rounded["target_logprobs"].exp().where(batch["target_mask"], 0.0)
    return rounded


def sample_counts(teacher: Tensor, draws: int, seed: int, proposal_temperature: float = 1.0) -> Tensor:
    """Counts [B, P, V] of ``draws`` ids drawn with replacement from ``softmax(teacher / tau)``."""
    proposal = (teacher / proposal_temperature).softmax(-1).reshape(-1, teacher.shape[-1])
    picks = torch.multinomial(proposal, draws, replacement=True, generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros_like(proposal).scatter_add_(-1, picks, torch.ones_like(picks, dtype=torch.float32))
    return counts.reshape(teacher.shape)


def sample_batch(teacher: Tensor, draws: int, seed: int, proposal_temperature: float = 1.0) -> dict[str, Tensor]:
    counts = sample_counts(teacher, draws, seed, proposal_temperature)
    return sparse_batch(teacher, counts > 0, counts / draws)


def cached_ids(batch: dict[str, Tensor], b: int, p: int) -> list[int]:
    return batch["target_ids"][b, p][batch["target_mask"][b, p]].tolist()


def loss_and_grad(name: str, logits: Tensor, batch: dict[str, Tensor], **options: float) -> tuple[Tensor, Tensor]:
    out = get_loss(name)(logits, batch, **options)
    (grad,) = torch.autograd.grad(out.total, logits)
    return out.total.detach(), grad


# ---- plain references (float64, dense or explicit loops) ----------------------------------


def kl_list(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """sum_i a_i log(a_i / b_i), with 0 log 0 = 0."""
    return sum((ai * (ai / bi).log() if ai > 0 else ai * 0.0) for ai, bi in zip(a, b, strict=True))


def bucket_reference(name: str, z: Tensor, lp: Tensor, ids: list[int], min_tail: float = 0.0) -> Tensor:
    """The bucket losses on one position: cached ids + one "outside" bucket; z, lp [V] float64."""
    p, t = z.softmax(-1), lp.exp()
    tb = [t[i] for i in ids] + [max(1.0 - sum(t[i] for i in ids), torch.tensor(min_tail, dtype=t.dtype))]
    pb = [p[i] for i in ids] + [1.0 - sum(p[i] for i in ids)]
    if name == "topk-ghost":
        return kl_list(tb, pb)
    if name == "reverse-kl":
        return kl_list(pb, tb)
    if name == "skew-kl":
        return kl_list(tb, [0.1 * ti + 0.9 * pi for ti, pi in zip(tb, pb, strict=True)])
    if name == "gkd-jsd":
        m = [0.5 * ti + 0.5 * pi for ti, pi in zip(tb, pb, strict=True)]
        return 0.5 * kl_list(tb, m) + 0.5 * kl_list(pb, m)
    assert name == "skew-reverse-kl"
    return kl_list(pb, [0.9 * ti + 0.1 * pi for ti, pi in zip(tb, pb, strict=True)])


def renorm_reference(name: str, z: Tensor, lp: Tensor, ids: list[int], temperature: float = 1.0) -> Tensor:
    """kl / topk-renorm on one position: teacher softmax(lp / T) over ids, student softmax(z / T)."""
    log_p = (z / temperature).log_softmax(-1)
    tempered = torch.stack([lp[i] / temperature for i in ids])
    target = tempered.softmax(-1)
    ce = -sum(target[j] * log_p[i] for j, i in enumerate(ids))
    entropy = -sum(tj * tj.log() for tj in target)
    return temperature**2 * (ce if name == "topk-renorm" else ce - entropy)


def bild_reference(z: Tensor, lp: Tensor, ids: list[int], k: int = 8, temperature: float = 3.0) -> Tensor:
    def logit_difference_kl(order: list[int]) -> Tensor:
        if len(order) < 2:
            return z.sum() * 0.0
        pairs = [(m, n) for a, m in enumerate(order) for n in order[a + 1 :]]
        d_t = torch.stack([(lp[m] - lp[n]) / temperature for m, n in pairs]).softmax(-1)
        d_s = torch.stack([(z[m] - z[n]) / temperature for m, n in pairs]).softmax(-1)
        return (d_t * (d_t.log() - d_s.log())).sum()

    teacher_top = sorted(ids, key=lambda i: -lp[i].item())[:k]
    student_top = sorted(ids, key=lambda i: -z[i].item())[:k]
    return logit_difference_kl(teacher_top) + logit_difference_kl(student_top)


def rlkd_reference(z: Tensor, lp: Tensor, ids: list[int], k: int = 15, tau: float = 0.1) -> Tensor:
    union = set(sorted(ids, key=lambda i: -lp[i].item())[:k]) | set(sorted(ids, key=lambda i: -z[i].item())[:k])

    def soft_ranks(values: Tensor) -> list[Tensor]:
        return [sum(torch.sigmoid((values[i] - values[j]) / tau) for j in union) for i in union]

    rt, rs = torch.stack(soft_ranks(lp)), torch.stack(soft_ranks(z))
    rt, rs = rt - rt.mean(), rs - rs.mean()
    rho = (rt * rs).sum() / ((rt * rt).sum() * (rs * rs).sum()).sqrt()
    return 2 * (1 - rho) + renorm_reference("kl", z, lp, ids)


def rs_kd_reference(z: Tensor, lp: Tensor, counts: Tensor, proposal_temperature: float) -> Tensor:
    """-sum_i w_i log p_i with w_i ∝ c_i t_i / q_i, q = softmax(lp / tau); all [V] float64."""
    q = (lp / proposal_temperature).softmax(-1)
    w = {i: counts[i] * lp[i].exp() / q[i] for i in range(len(z)) if counts[i] > 0}
    total = sum(w.values())
    log_p = z.log_softmax(-1)
    return -sum(wi / total * log_p[i] for i, wi in w.items())


def reference_loss(reference, logits: Tensor, batch: dict[str, Tensor], teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``reference(z [V], lp [V], cached ids)`` over counted positions, and its gradient."""
    z64 = logits.detach().double().requires_grad_()
    lp64 = teacher.double()
    total = sum(
        reference(z64[b, p], lp64[b, p], cached_ids(batch, b, p))
        for b, p in batch["position_mask"].nonzero().tolist()
    )
    (grad,) = torch.autograd.grad(total, z64)
    return total.detach(), grad


# ---- registry and validation -------------------------------------------------------------


def test_registry_names_and_unknown_name_lists_choices() -> None:
    assert list(LOSSES) == [
        "ce", "rs-kd", "topk-renorm", "topk-ghost", "kl", "reverse-kl", "skew-kl", "skew-reverse-kl", "gkd-jsd", "minillm",
        "bild", "rlkd",
    ]
    with pytest.raises(LogitcacheError, match="skew-reverse-kl"):
        get_loss("forward-kl")


@pytest.mark.parametrize(
    ("name", "options", "hint"),
    [
        ("rs-kd", {"temperature": 2.0}, "no temperature"),
        ("reverse-kl", {"temperature": 2.0}, "no temperature"),
        ("kl", {"alpha": 1.5}, "alpha"),
        ("skew-kl", {"skew": 0.0}, "skew"),
        ("gkd-jsd", {"beta": 1.0}, "jsd-beta"),
        ("gkd-jsd", {"temperature": 2.0}, "no temperature"),
        ("minillm", {"clip": 1.0}, "pg-clip"),
        ("minillm", {"baseline": "mean"}, "pg-baseline"),
        ("minillm", {"temperature": 2.0}, "no temperature"),
        ("rlkd", {"base": "bild"}, "choose one of"),
        ("rlkd", {"base": "reverse-kl", "temperature": 2.0}, "no temperature"),
    ],
)
def test_bad_options_raise_named_errors(name: str, options: dict, hint: str) -> None:
    teacher = dense_teacher((1, 2))
    with pytest.raises(LogitcacheError, match=hint):
        get_loss(name)(student_logits((1, 2)), topk_batch(teacher, 4), **options)


def test_logits_that_include_the_last_token_are_refused_with_a_hint() -> None:
    teacher = dense_teacher((1, 3))
    with pytest.raises(LogitcacheError, match=r"logits\[:, :-1\]"):
        get_loss("kl")(student_logits((1, 4)), topk_batch(teacher, 4))


# ---- dense references ---------------------------------------------------------------------


def dense_forward_kl(z: Tensor, lp: Tensor, temperature: float = 1.0) -> Tensor:
    t = (lp / temperature).log_softmax(-1)
    return temperature**2 * (t.exp() * (t - (z / temperature).log_softmax(-1))).sum()


def dense_soft_ce(z: Tensor, lp: Tensor) -> Tensor:
    return -(lp.exp() * z.log_softmax(-1)).sum()


def dense_reverse_kl(z: Tensor, lp: Tensor) -> Tensor:
    log_p = z.log_softmax(-1)
    return (log_p.exp() * (log_p - lp)).sum()


def dense_skew_kl(z: Tensor, lp: Tensor) -> Tensor:
    t, p = lp.exp(), z.softmax(-1)
    return (t * (t / (0.1 * t + 0.9 * p)).log()).sum()


def dense_skew_reverse_kl(z: Tensor, lp: Tensor) -> Tensor:
    t, p = lp.exp(), z.softmax(-1)
    return (p * (p / (0.9 * t + 0.1 * p)).log()).sum()


def dense_gkd_jsd(z: Tensor, lp: Tensor, beta: float = 0.5) -> Tensor:
    t, p = lp.exp(), z.softmax(-1)
    m = beta * t + (1 - beta) * p
    return beta * (t * (t / m).log()).sum() + (1 - beta) * (p * (p / m).log()).sum()


@pytest.mark.parametrize(
    ("name", "options", "dense"),
    [
        ("kl", {}, dense_forward_kl),
        ("kl", {"temperature": 2.0}, lambda z, lp: dense_forward_kl(z, lp, 2.0)),
        ("topk-renorm", {}, dense_soft_ce),
        ("topk-ghost", {}, dense_forward_kl),
        ("reverse-kl", {}, dense_reverse_kl),
        ("skew-kl", {}, dense_skew_kl),
        ("skew-reverse-kl", {}, dense_skew_reverse_kl),
        ("gkd-jsd", {}, dense_gkd_jsd),
        ("gkd-jsd", {"beta": 0.1}, lambda z, lp: dense_gkd_jsd(z, lp, 0.1)),
    ],
)
def test_full_vocabulary_cache_equals_dense_loss_and_gradient(name: str, options: dict, dense) -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    total, grad = loss_and_grad(name, logits, topk_batch(teacher, V), **options)

    z64 = logits.detach().double().requires_grad_()
    expected = dense(z64, teacher.double())
    (expected_grad,) = torch.autograd.grad(expected, z64)
    torch.testing.assert_close(total.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["topk-ghost", "reverse-kl", "skew-kl", "skew-reverse-kl", "gkd-jsd"])
def test_bucket_losses_match_loop_reference_on_topk_cache(name: str) -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, 6)
    total, grad = loss_and_grad(name, logits, batch)
    expected, expected_grad = reference_loss(
        lambda z, lp, ids: bucket_reference(name, z, lp, ids), logits, batch, teacher
    )
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["topk-ghost", "reverse-kl", "skew-kl", "skew-reverse-kl", "gkd-jsd"])
def test_bucket_losses_stay_finite_when_the_cache_rounded_the_tail_to_zero(name: str) -> None:
    # The teacher is truly zero outside its top 6, as a cache with tail_logprob = -inf claims.
    teacher = dense_teacher((2, 3))
    outside = ~torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, teacher.topk(6, -1).indices, True)
    teacher = teacher.masked_fill(outside, -math.inf).log_softmax(-1)
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, 6)
    assert torch.all(batch["tail_logprob"] == -math.inf)
    total, grad = loss_and_grad(name, logits, batch)

    # Reverse KL takes the teacher's zero tail as float32 eps; the others need no floor.
    floor = torch.finfo(torch.float32).eps if name == "reverse-kl" else 0.0
    expected, expected_grad = reference_loss(
        lambda z, lp, ids: bucket_reference(name, z, lp, ids, floor), logits, batch, teacher
    )
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "temperature"), [("kl", 1.0), ("kl", 2.0), ("topk-renorm", 1.0), ("topk-renorm", 0.5)]
)
def test_renormalised_losses_match_loop_reference_on_topk_cache(name: str, temperature: float) -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, 6)
    total, grad = loss_and_grad(name, logits, batch, temperature=temperature)
    expected, expected_grad = reference_loss(
        lambda z, lp, ids: renorm_reference(name, z, lp, ids, temperature), logits, batch, teacher
    )
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_ce_matches_dense_cross_entropy_and_ignores_alpha() -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, 4)
    expected = F.cross_entropy(logits.reshape(-1, V), batch["labels"].reshape(-1), reduction="sum")
    for alpha in (0.0, 0.4):
        torch.testing.assert_close(get_loss("ce")(logits, batch, alpha=alpha).total, expected)


def test_alpha_mixes_kd_and_ce() -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, 5)
    kd, ce = get_loss("kl")(logits, batch).total, get_loss("ce")(logits, batch).total
    torch.testing.assert_close(get_loss("kl")(logits, batch, alpha=0.3).total, 0.7 * kd + 0.3 * ce)


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_rs_kd_matches_loop_reference(proposal_temperature: float) -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    counts = sample_counts(teacher, 50, seed=3, proposal_temperature=proposal_temperature)
    batch = sparse_batch(teacher, counts > 0, counts / 50)
    total, grad = loss_and_grad("rs-kd", logits, batch, proposal_temperature=proposal_temperature)

    z64 = logits.detach().double().requires_grad_()
    expected = sum(
        rs_kd_reference(z64[b, p], teacher[b, p].double(), counts[b, p], proposal_temperature)
        for b in range(2)
        for p in range(3)
    )
    (expected_grad,) = torch.autograd.grad(expected, z64)
    torch.testing.assert_close(total.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [6, 12, V])
def test_bild_matches_loop_reference(k: int) -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, k)
    total, grad = loss_and_grad("bild", logits, batch)
    expected, expected_grad = reference_loss(bild_reference, logits, batch, teacher)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def peaked_sample_batch() -> tuple[Tensor, dict[str, Tensor]]:
    """A sample cache whose position (0, 0) drew one id 50 times while the others drew many."""
    teacher = dense_teacher((2, 3), scale=1.0)
    teacher[0, 0] = torch.full((V,), -40.0).index_fill(0, torch.tensor([3]), 0.0).log_softmax(-1)
    batch = sample_batch(teacher, 50, seed=9)
    assert batch["target_mask"][0, 0].sum() == 1 and batch["target_mask"].sum(-1).max() > 5
    return teacher, batch


def test_bild_matches_loop_reference_when_a_position_has_a_single_cached_id() -> None:
    teacher, batch = peaked_sample_batch()
    logits = student_logits((2, 3))
    total, grad = loss_and_grad("bild", logits, batch)
    expected, expected_grad = reference_loss(bild_reference, logits, batch, teacher)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_position_with_a_single_cached_id_keeps_loss_and_gradient_finite(name: str) -> None:
    _, batch = peaked_sample_batch()
    total, grad = loss_and_grad(name, student_logits((2, 3)), batch)
    assert torch.isfinite(total) and torch.isfinite(grad).all()


def zero_probability_batch(shape: tuple[int, int] = (2, 3)) -> dict[str, Tensor]:
    """A top-8 cache of a teacher with only 5 ids of nonzero probability: 3 cached log-probs are -inf."""
    batch = topk_batch(dense_teacher(shape), 8)
    logprobs = batch["target_logprobs"].clone()
    logprobs[..., :5] = logprobs[..., :5].log_softmax(-1)
    logprobs[..., 5:] = -math.inf
    tail = torch.full_like(batch["tail_logprob"], -math.inf)
    return dict(batch, target_logprobs=logprobs, target_weights=logprobs.exp(), tail_logprob=tail)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_cached_id_of_teacher_probability_zero_keeps_loss_and_gradient_finite(name: str) -> None:
    total, grad = loss_and_grad(name, student_logits((2, 3)), zero_probability_batch())
    assert torch.isfinite(total) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["reverse-kl", "bild", "rlkd"])
def test_a_zero_probability_reads_as_a_floor_or_as_a_vanishing_one(name: str) -> None:
    # reverse-kl floors it where it floors the tail; bild and rlkd take the limit of a log-prob
    # going to -inf (ranked last; in BiLD its pair differences take all the pair mass): here any
    # value a few thousand below the others, where exp(-gap / T) is 0 in float32.
    batch = zero_probability_batch()
    logprobs = batch["target_logprobs"]
    if name == "reverse-kl":
        stand_in = torch.tensor(math.log(torch.finfo(torch.float32).eps))
    else:
        stand_in = logprobs.masked_fill(logprobs == -math.inf, math.inf).amin(-1, keepdim=True) - 2500.0
    low = dict(batch, target_logprobs=torch.where(logprobs == -math.inf, stand_in, logprobs))
    logits = student_logits((2, 3))
    total, grad = loss_and_grad(name, logits, batch)
    expected, expected_grad = loss_and_grad(name, logits, low)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_rlkd_rank_term_has_no_gradient_when_the_student_is_tied() -> None:
    # Tied student logits: the correlation is undefined and taken as 0, and so is its gradient.
    batch = topk_batch(dense_teacher((2, 3)), 16)
    logits = torch.zeros(2, 3, V, requires_grad=True)
    total, grad = loss_and_grad("rlkd", logits, batch)
    kl_total, kl_grad = loss_and_grad("kl", logits, batch)
    torch.testing.assert_close(total, kl_total + 2.0 * 6, rtol=1e-6, atol=1e-5)  # 2 * (1 - 0) per position
    torch.testing.assert_close(grad, kl_grad, rtol=0.0, atol=1e-6)


def test_topk_ghost_drops_a_spurious_tail_when_the_cache_covers_the_vocabulary() -> None:
    # fp16 storage can leave a small tail even when the ids cover every token: there is no
    # outside bucket to put it in, so it must not blow up the loss.
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, V)
    batch["tail_logprob"] = torch.full((2, 3), math.log(1e-3))
    z64 = logits.detach().double()
    dense = sum(dense_forward_kl(z64[b, p], teacher[b, p].double()) for b in range(2) for p in range(3))
    torch.testing.assert_close(get_loss("topk-ghost")(logits, batch).total.double(), dense, rtol=1e-5, atol=1e-5)


def test_bild_s_ld_uses_student_top_ids_among_cached_ids() -> None:
    teacher = dense_teacher((1, 2))
    logits = student_logits((1, 2))
    batch = topk_batch(teacher, 12)
    # The student's favourite ids overall are uncached: s-LD must fall back to cached ones.
    uncached = teacher.topk(V, -1).indices[..., -3:]
    boosted = logits.detach().scatter_add(-1, uncached, torch.full(uncached.shape, 50.0)).requires_grad_()
    total, grad = loss_and_grad("bild", boosted, batch)
    expected, expected_grad = reference_loss(bild_reference, boosted, batch, teacher)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    assert grad.gather(-1, uncached).abs().max() == 0.0
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_rlkd_matches_loop_reference() -> None:
    teacher = dense_teacher((2, 2), scale=1.0)
    logits = student_logits((2, 2))
    batch = topk_batch(teacher, 24)
    total, grad = loss_and_grad("rlkd", logits, batch)
    expected, expected_grad = reference_loss(rlkd_reference, logits, batch, teacher)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [16, V])
def test_bild_is_zero_when_student_logits_are_teacher_logprobs_plus_constant(k: int) -> None:
    teacher = dense_teacher((2, 3))
    shift = 5.0 * torch.randn(2, 3, 1, generator=torch.Generator().manual_seed(4))
    assert abs(get_loss("bild")(teacher + shift, topk_batch(teacher, k)).total.item()) < 1e-5


@pytest.mark.parametrize("k", [16, V])
def test_rlkd_rank_term_vanishes_when_student_logits_are_teacher_logprobs_plus_constant(k: int) -> None:
    teacher = dense_teacher((2, 3))
    shift = 5.0 * torch.randn(2, 3, 1, generator=torch.Generator().manual_seed(4))
    batch = topk_batch(teacher, k)
    rlkd, kl = get_loss("rlkd")(teacher + shift, batch).total, get_loss("kl")(teacher + shift, batch).total
    torch.testing.assert_close(rlkd, kl, rtol=0.0, atol=1e-5)  # the rank term is 0
    if k == V:
        assert abs(rlkd.item()) < 1e-5  # and so is KL against the whole teacher


# ---- MiniLLM's policy gradient on the student's own samples -------------------------------


def minillm_reference(
    logits: Tensor, batch: dict[str, Tensor], teacher: Tensor, clip: float = 0.2, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """MiniLLM's loss by explicit loops in float64, and its gradient: at each counted position a weight times the
    reverse KL on the buckets, plus, at a drawn one, ``-min(rho A, clip(rho) A)`` with ``A`` the mean future reward
    ``gold - behavior`` over the later drawn positions of the row (``whiten``ed over the batch's drawn positions
    that have later ones)."""
    z64 = logits.detach().double().requires_grad_()
    lp64 = teacher.double()
    counted = batch["position_mask"]
    behavior = batch["behavior_logprob"].double()
    gold = batch["gold_logprob"].double()
    drawn = [(b, t) for b, t in counted.nonzero().tolist() if math.isfinite(behavior[b, t].item())]
    advantages = {}
    for b, t in drawn:
        later = [u for u in range(t + 1, counted.shape[1]) if (b, u) in drawn]
        if later:
            advantages[b, t] = sum((gold[b, u] - behavior[b, u]).item() for u in later) / len(later)
    if whiten:
        mean = sum(advantages.values()) / len(advantages)
        std = math.sqrt(sum((a - mean) ** 2 for a in advantages.values()) / len(advantages))
        advantages = {key: (a - mean) / (std + 1e-6) for key, a in advantages.items()}
    total = z64.new_zeros(())
    for b, t in counted.nonzero().tolist():
        single = bucket_reference("reverse-kl", z64[b, t], lp64[b, t], cached_ids(batch, b, t), min_tail=1.1920928955078125e-07)
        if (b, t) not in drawn:
            total = total + single
            continue
        advantage = advantages.get((b, t), 0.0)
        ratio = torch.exp(z64[b, t].log_softmax(-1)[batch["labels"][b, t]] - behavior[b, t])
        clipped = ratio.clamp(1 - clip, 1 + clip)
        total = total + clipped.detach() * single - torch.minimum(ratio * advantage, clipped * advantage)
    (grad,) = torch.autograd.grad(total, z64)
    return total.detach(), grad


@pytest.mark.parametrize(("clip", "baseline"), [(0.2, "whiten"), (0.5, "whiten"), (0.2, "none")])
def test_minillm_matches_its_loop_reference(clip: float, baseline: str) -> None:
    teacher = dense_teacher((3, 6))
    position_mask = torch.ones(3, 6, dtype=torch.bool)
    position_mask[2, 4] = False  # a position without targets between two drawn ones
    batch = topk_batch(teacher, 6, position_mask)
    logits = student_logits((3, 6))
    # drawn a little off the student's log-probabilities now: ratios below, inside and above 1 +- clip
    now = logits.detach().log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0]
    batch["behavior_logprob"] = now - torch.linspace(-1.2, 1.2, 18).reshape(6, 3).T  # each row spans the range
    batch["behavior_logprob"][:, 0] = math.nan  # prompt positions: not drawn
    batch["behavior_logprob"][1] = math.nan  # an off-policy row: reverse KL alone
    ratio = (now - batch["behavior_logprob"]).exp()[[0, 2], 1:]
    assert (ratio < 1 - clip).any() and ((ratio > 1 - clip) & (ratio < 1 + clip)).any() and (ratio > 1 + clip).any()
    total, grad = loss_and_grad("minillm", logits, batch, clip=clip, baseline=baseline)
    expected, expected_grad = minillm_reference(logits, batch, teacher, clip, whiten=baseline == "whiten")
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_minillm_on_fresh_samples_is_the_reverse_kl_policy_gradient() -> None:
    """Sampled by the student itself (behaviour = its log-probability now): every ratio is 1 and the gradient is
    ``sum_t [grad RKL_t - A_t grad log q(y_t)]``, MiniLLM's single-step and long-term terms."""
    teacher = dense_teacher((2, 5))
    logits = student_logits((2, 5))
    batch = topk_batch(teacher, 6)
    batch["behavior_logprob"] = logits.detach().log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0]
    total, grad = loss_and_grad("minillm", logits, batch, baseline="none")
    reverse, reverse_grad = loss_and_grad("reverse-kl", logits, batch)
    log_q = logits.log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0]
    reward = batch["gold_logprob"] - batch["behavior_logprob"]
    advantage = torch.zeros(2, 5)
    for t in range(4):
        advantage[:, t] = reward[:, t + 1 :].mean(-1)
    (policy_grad,) = torch.autograd.grad(-(advantage * log_q).sum(), logits)
    torch.testing.assert_close(total, reverse - advantage.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, reverse_grad + policy_grad, rtol=1e-4, atol=1e-6)


def test_minillm_future_rewards_stay_within_each_packed_sequence() -> None:
    from logitcache.losses.sparse import FUTURE_REWARD, with_future_rewards

    reward = torch.tensor([[0.5, -1.0, 2.0, 7.0, -3.0, 1.0, 4.0]])
    batch = {"position_mask": torch.tensor([[True, True, True, False, True, True, True]]),
             "gold_logprob": reward - 1.0, "behavior_logprob": torch.full((1, 7), -1.0),
             # two sequences packed in one row: tokens 0-3 and 4-7; position 3 (token 3 -> 4) crosses them
             "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])}
    batch["behavior_logprob"][0, 5] = math.nan  # not drawn: no reward, and no future of its own
    future = with_future_rewards(batch, "none")[FUTURE_REWARD][0]
    torch.testing.assert_close(future, torch.tensor([0.5, 2.0, 0.0, 0.0, 4.0, 0.0, 0.0]))
    unpacked = with_future_rewards({k: v for k, v in batch.items() if k != "position_ids"}, "none")[FUTURE_REWARD][0]
    assert unpacked[0].item() == pytest.approx((-1.0 + 2.0 - 3.0 + 4.0) / 4)  # without position ids: one sequence
    # whitened: the positions that have a future, standardised (0.5, 2.0, 4.0 -> mean 2.1667, sd 1.4337)
    whitened = with_future_rewards(batch, "whiten")[FUTURE_REWARD][0]
    scored = torch.tensor([0.5, 2.0, 4.0])
    torch.testing.assert_close(whitened[[0, 1, 4]], (scored - scored.mean()) / (scored.std(unbiased=False) + 1e-6))
    assert whitened[[2, 3, 5, 6]].eq(0).all()
    # a gold token of teacher probability 0 is floored like reverse KL's tail: nothing turns NaN
    batch["gold_logprob"][0, 2] = -math.inf
    assert torch.isfinite(with_future_rewards(batch, "whiten")[FUTURE_REWARD]).all()


def test_minillm_refuses_a_cache_without_sampling_logprobs() -> None:
    batch = topk_batch(dense_teacher((1, 3)), 4)
    del batch["behavior_logprob"]
    with pytest.raises(LogitcacheError, match="logitcache generate"):
        get_loss("minillm")(student_logits((1, 3)), batch)


# ---- RS-KD is unbiased, top-K is not ------------------------------------------------------


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def averaged_gradient(batch: dict[str, Tensor], logits: Tensor, name: str, **options: float) -> Tensor:
    """Gradient wrt logits shared by every row of ``batch`` (one row per sampling seed), averaged."""
    rows = batch["labels"].shape[0]
    shared = logits.detach().requires_grad_()
    out = get_loss(name)(shared.expand(rows, -1, -1), batch, **options)
    (grad,) = torch.autograd.grad(out.total / rows, shared)
    return grad


@pytest.mark.parametrize("proposal_temperature", [1.0, 1.5])
def test_rs_kd_average_gradient_approaches_full_kd_but_topk_does_not(proposal_temperature: float) -> None:
    # A student near its teacher, where top-K's bias (its missing tail) dominates the gradient.
    teacher = dense_teacher((1, 2), scale=1.5)
    logits = teacher + 0.2 * torch.randn(1, 2, V, generator=torch.Generator().manual_seed(5))
    full = logits.softmax(-1) - teacher.exp()  # gradient of the dense forward KL

    seeds = 1000
    samples = sample_batch(teacher.expand(seeds, -1, -1), 50, seed=6, proposal_temperature=proposal_temperature)
    averaged = averaged_gradient(samples, logits, "rs-kd", proposal_temperature=proposal_temperature)
    first_seed = {key: value[:1] for key, value in samples.items()}
    one_seed = averaged_gradient(first_seed, logits, "rs-kd", proposal_temperature=proposal_temperature)
    topk = averaged_gradient(topk_batch(teacher, 12), logits, "topk-renorm")

    assert cosine(averaged, full) > 0.98  # within ~11 degrees
    assert cosine(one_seed, full) < cosine(averaged, full)
    assert cosine(topk, full) < 0.7  # beyond ~45 degrees, whatever the number of steps


# ---- masks, empty batches, accumulation ---------------------------------------------------


def widen_with_garbage_padding(batch: dict[str, Tensor], extra: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(8)
    shape = (*batch["target_ids"].shape[:2], extra)
    widened = dict(batch)
    widened["target_ids"] = torch.cat([batch["target_ids"], torch.randint(0, V, shape, generator=g)], -1)
    widened["target_mask"] = torch.cat([batch["target_mask"], torch.zeros(shape, dtype=torch.bool)], -1)
    widened["target_logprobs"] = torch.cat([batch["target_logprobs"], 3.0 * torch.randn(shape, generator=g)], -1)
    widened["target_weights"] = torch.cat([batch["target_weights"], torch.rand(shape, generator=g)], -1)
    return widened


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padded_ids_change_nothing(name: str) -> None:
    teacher = dense_teacher((2, 3))
    logits = student_logits((2, 3))
    batch = topk_batch(teacher, 5)
    total, grad = loss_and_grad(name, logits, batch)
    padded_total, padded_grad = loss_and_grad(name, logits, widen_with_garbage_padding(batch, 4))
    torch.testing.assert_close(padded_total, total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded_grad, grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_positions_change_nothing_even_when_nan(name: str) -> None:
    teacher = dense_teacher((2, 3))
    position_mask = torch.tensor([[True, False, True], [False, True, True]])
    batch = topk_batch(teacher, 5, position_mask)
    logits = student_logits((2, 3))
    total, grad = loss_and_grad(name, logits, batch)

    poisoned = dict(batch)
    for key in ("target_logprobs", "target_weights", "tail_logprob"):
        counted = position_mask if batch[key].dim() == 2 else position_mask[..., None]
        poisoned[key] = batch[key].masked_fill(~counted, math.nan)
    poisoned_logits = logits.detach().masked_fill(~position_mask[..., None], math.nan).requires_grad_()
    poisoned_total, poisoned_grad = loss_and_grad(name, poisoned_logits, poisoned)

    assert get_loss(name)(logits, batch).tokens.item() == 4
    torch.testing.assert_close(poisoned_total, total)
    assert poisoned_grad[~position_mask].abs().max() == 0.0
    torch.testing.assert_close(poisoned_grad[position_mask], grad[position_mask])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_token_batch_gives_zero_and_finite_zero_gradient(name: str) -> None:
    teacher = dense_teacher((2, 3))
    batch = topk_batch(teacher, 5, torch.zeros(2, 3, dtype=torch.bool))
    logits = student_logits((2, 3))
    out = get_loss(name)(logits, batch)
    out.mean().backward()
    assert out.total.item() == 0.0 and out.tokens.item() == 0 and out.mean().item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_accumulation_equals_one_large_batch(name: str) -> None:
    teacher = dense_teacher((4, 3))
    position_mask = torch.tensor([[True, True, True], [True, False, False], [False, True, True], [True, True, False]])
    batch = topk_batch(teacher, 6, position_mask)
    logits = student_logits((4, 3))
    # minillm's whitened advantages are a statistic of each micro-batch (as MiniLLM's of each PPO mini-batch)
    loss = partial(get_loss(name), baseline="none") if name == "minillm" else get_loss(name)

    whole = loss(logits, batch)
    (expected,) = torch.autograd.grad(whole.total / whole.tokens, logits)

    micro = [loss(logits[i : i + 2], {k: v[i : i + 2] for k, v in batch.items()}) for i in (0, 2)]
    global_tokens = sum(out.tokens for out in micro)
    (accumulated,) = torch.autograd.grad(sum(out.total for out in micro) / global_tokens, logits)
    assert global_tokens.item() == whole.tokens.item() == 8
    torch.testing.assert_close(accumulated, expected)


def test_mean_divides_by_tokens() -> None:
    out = LossOutput(total=torch.tensor(6.0), tokens=torch.tensor(4))
    assert out.mean().item() == 1.5


def test_low_precision_logits_are_upcast() -> None:
    teacher = dense_teacher((2, 3))
    batch = topk_batch(teacher, 5)
    logits = student_logits((2, 3)).detach().bfloat16()
    out = get_loss("topk-ghost")(logits, batch)
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, get_loss("topk-ghost")(logits.float(), batch).total)


# ---- properties ---------------------------------------------------------------------------

cases = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 16), st.floats(0.1, 8.0))


@settings(max_examples=40, deadline=None)
@given(case=cases, noise=st.floats(0.0, 4.0))
def test_kl_family_is_non_negative_on_fp16_caches(case: tuple[int, int, float], noise: float) -> None:
    # Students near their teacher included: fp16 rounding leaves the stored masses summing off 1,
    # which would push an unnormalised divergence below 0.
    seed, k, scale = case
    teacher = dense_teacher((1, 2), scale=scale, seed=seed, vocab=16)
    logits = teacher + noise * torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(seed + 1))
    batch = fp16_cache(topk_batch(teacher, k))
    for name in KL_FAMILY:
        assert get_loss(name)(logits, batch).total.item() >= -1e-5, name


@settings(max_examples=15, deadline=None)
@given(case=cases)
def test_every_loss_is_invariant_to_shifting_student_logits(case: tuple[int, int, float]) -> None:
    seed, k, scale = case
    teacher = dense_teacher((1, 2), scale=scale, seed=seed, vocab=16)
    logits = student_logits((1, 2), seed=seed + 1, vocab=16).detach()
    shift = 10.0 * torch.randn(1, 2, 1, generator=torch.Generator().manual_seed(seed))
    batch = topk_batch(teacher, k)
    for name, loss in LOSSES.items():
        shifted, plain = loss(logits + shift, batch).total, loss(logits, batch).total
        torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-4, msg=name)
