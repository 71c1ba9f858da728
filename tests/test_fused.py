"""The fused, chunked head + loss against the plain path ``get_loss(name)(hidden @ W.T, batch)``.

Value and gradients with respect to the hidden states and the head must match in float32, with
masked positions, ragged rows, alpha mixing, temperatures, chunk sizes that do not divide the
rows, a bias, an empty batch and a real tiny Llama. Batches come from the dense-teacher builders
of test_losses.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_losses import dense_teacher, fp16_cache, sample_batch, sample_counts, sparse_batch, topk_batch, zero_probability_batch
from torch import Tensor

from logitcache.errors import LogitcacheError
from logitcache.losses.fused import default_chunk_rows, fused_loss, linear_head, student_hidden, supports
from logitcache.losses.sparse import LOSSES, get_loss

B, P, H, V = 3, 7, 16, 40
CLOSED_FORMS = [
    ("ce", {}),
    ("rs-kd", {}),
    ("rs-kd", {"proposal_temperature": 2.0}),
    ("topk-renorm", {}),
    ("topk-renorm", {"temperature": 2.0}),
    ("kl", {}),
    ("kl", {"temperature": 0.5}),
    ("topk-ghost", {}),
]
PER_CHUNK = ["reverse-kl", "skew-kl", "skew-reverse-kl", "bild", "rlkd"]


def position_mask() -> Tensor:
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[0, 4:] = False  # a padded window
    mask[2, 1] = False
    return mask


def batch_for(name: str, options: dict, seed: int = 0) -> dict[str, Tensor]:
    """rs-kd: a sampled cache; others: ragged top ids (5..12 per position) with their tail, fp16-rounded."""
    teacher = dense_teacher((B, P), seed=seed)
    if name == "rs-kd":
        batch = sample_batch(teacher, 20, seed=seed, proposal_temperature=options.get("proposal_temperature", 1.0))
    else:
        keep = sample_counts(teacher, 12, seed=seed) > 0
        keep |= torch.zeros_like(keep).scatter_(-1, teacher.topk(5, -1).indices, True)
        batch = fp16_cache(sparse_batch(teacher, keep, teacher.exp()))
    batch["position_mask"] = position_mask()
    return batch


def student(seed: int = 1, bias: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """hidden [B, P, H], head weight [V, H] and bias [V] (or None), all float32 leaves."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, P, H, generator=g).requires_grad_()
    weight = (0.7 * torch.randn(V, H, generator=g)).requires_grad_()
    head_bias = torch.randn(V, generator=g).requires_grad_() if bias else None
    return hidden, weight, head_bias


def grads(total: Tensor, tensors: list[Tensor | None]) -> list[Tensor]:
    """Gradients of ``total / 3`` (backward's incoming gradient is not 1, as in training)."""
    leaves = [t for t in tensors if t is not None]
    return list(torch.autograd.grad(total / 3.0, leaves))


def assert_matches_plain(name: str, batch: dict, *, bias: bool = False, chunk_rows: int | None = 3, **options) -> None:
    hidden, weight, head_bias = student(bias=bias)
    logits = hidden @ weight.T + (0.0 if head_bias is None else head_bias)
    plain = get_loss(name)(logits, batch, **options)
    fused = fused_loss(name, hidden, weight, batch, chunk_rows=chunk_rows, head_bias=head_bias, **options)
    assert fused.tokens == plain.tokens
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-5)
    leaves = [hidden, weight, head_bias]
    for got, want in zip(grads(fused.total, leaves), grads(plain.total, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- parity with the plain path ----------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [3, 5, None])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("name", "options"), CLOSED_FORMS)
def test_closed_forms_match_plain(name: str, options: dict, alpha: float, chunk_rows: int | None) -> None:
    # 18 counted rows: chunks of 3 divide them, chunks of 5 leave a last chunk of 3.
    assert_matches_plain(name, batch_for(name, options), chunk_rows=chunk_rows, alpha=alpha, **options)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("name", PER_CHUNK)
def test_other_losses_run_plain_per_chunk(name: str, alpha: float) -> None:
    assert_matches_plain(name, batch_for(name, {}), alpha=alpha)


@pytest.mark.parametrize("name", ["ce", "kl", "topk-ghost", "bild"])
def test_head_bias(name: str) -> None:
    assert_matches_plain(name, batch_for(name, {}), bias=True)


def test_one_row_chunks_and_one_chunk_for_all() -> None:
    batch = batch_for("topk-ghost", {})
    for chunk_rows in (1, 1000):
        assert_matches_plain("topk-ghost", batch, chunk_rows=chunk_rows, alpha=0.2)


# ---- edge cases of the closed forms ------------------------------------------------------


def test_ghost_when_the_ids_cover_the_vocabulary_or_the_tail_is_zero() -> None:
    teacher = dense_teacher((B, P))
    covering = topk_batch(teacher, V)  # no outside bucket
    assert_matches_plain("topk-ghost", covering)
    zero_tail = topk_batch(teacher, 6)
    zero_tail["tail_logprob"] = torch.full((B, P), -math.inf)
    zero_tail["target_logprobs"] = zero_tail["target_logprobs"].log_softmax(-1)
    assert_matches_plain("topk-ghost", zero_tail)
    assert_matches_plain("kl", zero_tail)


def test_cached_id_zero_beside_padding() -> None:
    """Padding ids are 0 too: a real cached id 0 in a padded row must still count once."""
    teacher = dense_teacher((B, P))
    keep = torch.zeros(B, P, V, dtype=torch.bool)
    keep[..., 0] = True
    keep[..., 5:8] = True
    keep[1, :, 9:20] = True  # window 1 is wider: the others are padded
    batch = sparse_batch(teacher, keep, teacher.exp(), position_mask())
    assert (batch["target_ids"] == 0).any(-1).all() and not batch["target_mask"].all()
    for name in ("topk-ghost", "kl", "rs-kd"):
        assert_matches_plain(name, batch)


def test_ghost_when_the_student_puts_no_mass_outside() -> None:
    """p_out underflows (log p_out ~ -200): the gradient stays finite and equal to the plain one."""
    batch = topk_batch(dense_teacher((B, P)), 6)
    hidden, weight, _ = student()
    on_cached = torch.zeros(B, P, V).scatter_(-1, batch["target_ids"], 200.0)
    offset = torch.linalg.lstsq(weight.detach(), on_cached.reshape(-1, V).T).solution.T.reshape(B, P, H)
    hidden = (hidden.detach() + offset).requires_grad_()
    weight = weight.detach().requires_grad_()
    plain = get_loss("topk-ghost")(hidden @ weight.T, batch)
    fused = fused_loss("topk-ghost", hidden, weight, batch, chunk_rows=4)
    assert torch.isfinite(fused.total)
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-3)
    for got, want in zip(grads(fused.total, [hidden, weight]), grads(plain.total, [hidden, weight])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cached_ids_of_teacher_probability_zero(name: str) -> None:
    batch = dict(zero_probability_batch((B, P)), position_mask=position_mask())
    assert_matches_plain(name, batch)


@pytest.mark.parametrize("name", ["ce", "rs-kd", "topk-ghost", "rlkd"])
def test_no_counted_position_gives_zero_and_zero_gradients(name: str) -> None:
    batch = batch_for(name, {})
    batch["position_mask"] = torch.zeros(B, P, dtype=torch.bool)
    hidden, weight, _ = student()
    out = fused_loss(name, hidden, weight, batch)
    assert out.total.item() == 0.0 and out.tokens.item() == 0 and out.mean().item() == 0.0
    for grad in grads(out.total, [hidden, weight]):
        assert not grad.any()


def test_without_grad_the_value_is_the_same() -> None:
    batch = batch_for("topk-ghost", {})
    hidden, weight, _ = student()
    with_grad = fused_loss("topk-ghost", hidden, weight, batch, alpha=0.5).total
    with torch.no_grad():
        without = fused_loss("topk-ghost", hidden, weight, batch, alpha=0.5).total
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


def test_bitwise_deterministic() -> None:
    batch = batch_for("kl", {})
    runs = []
    for _ in range(2):
        hidden, weight, _ = student()
        out = fused_loss("kl", hidden, weight, batch, alpha=0.3, temperature=2.0)
        runs.append([out.total.detach(), *grads(out.total, [hidden, weight])])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_backward_runs_once() -> None:
    """The gradients made in forward are scaled in place, so a second backward must refuse."""
    hidden, weight, _ = student()
    out = fused_loss("ce", hidden, weight, batch_for("ce", {}))
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.total.backward()


# ---- a real student ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "alpha"), [("rs-kd", 0.0), ("topk-ghost", 0.3)])
def test_tiny_llama_parameter_gradients_match_plain(name: str, alpha: float) -> None:
    from transformers import LlamaForCausalLM

    from logitcache.train.student import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(V, "nano", 64))
    input_ids = torch.randint(0, V, (B, P + 1), generator=torch.Generator().manual_seed(3))
    batch = {**batch_for(name, {}), "input_ids": input_ids, "labels": input_ids[:, 1:]}

    plain = get_loss(name)(model(input_ids=input_ids).logits[:, :-1], batch, alpha=alpha)
    want = grads(plain.total, list(model.parameters()))
    hidden = student_hidden(model, input_ids)[:, :-1]
    fused = fused_loss(name, hidden, linear_head(model, input_ids).weight, batch, alpha=alpha, chunk_rows=4)
    got = grads(fused.total, list(model.parameters()))

    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-5)
    for (param_name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=param_name)


def test_output_head_finds_llamas_and_refuses_scaled_logits() -> None:
    from transformers import LlamaForCausalLM

    from logitcache.train.student import llama_config

    class ScaledLogits(LlamaForCausalLM):
        def forward(self, **kwargs):  # noqa: ANN003, ANN202
            out = super().forward(**kwargs)
            out.logits = out.logits / 2.0
            return out

    input_ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(0))
    model = LlamaForCausalLM(llama_config(V, "nano", 64))
    assert linear_head(model, input_ids) is model.lm_head and model.training
    torch.testing.assert_close(student_hidden(model, input_ids), model.model(input_ids=input_ids).last_hidden_state)
    assert linear_head(ScaledLogits(llama_config(V, "nano", 64)), input_ids) is None


def test_bf16_autocast_matches_plain_autocast() -> None:
    """Under autocast the head runs in bf16 and the loss in float32, on both paths."""
    batch = batch_for("topk-ghost", {})
    hidden, weight, _ = student()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
        fused = fused_loss("topk-ghost", hidden, weight, batch, alpha=0.3)
    assert logits.dtype == torch.bfloat16 and fused.total.dtype == torch.float32
    plain = get_loss("topk-ghost")(logits, batch, alpha=0.3)
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads(fused.total, [hidden, weight]), grads(plain.total, [hidden, weight])):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", ["rs-kd", "topk-ghost", "kl"])
def test_cuda_matches_plain(name: str, autocast: bool) -> None:
    batch = {key: value.cuda() for key, value in batch_for(name, {}).items()}
    hidden, weight = (t.detach().cuda().requires_grad_() for t in student()[:2])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = hidden @ weight.T
        fused = fused_loss(name, hidden, weight, batch, alpha=0.3, chunk_rows=5)
    plain = get_loss(name)(logits, batch, alpha=0.3)
    tolerance = 2e-2 if autocast else 1e-4
    torch.testing.assert_close(fused.total, plain.total, rtol=tolerance, atol=tolerance)
    for got, want in zip(grads(fused.total, [hidden, weight]), grads(plain.total, [hidden, weight])):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


# ---- the API -----------------------------------------------------------------------------


def test_supports_every_registered_loss_and_nothing_else() -> None:
    assert all(supports(name) for name in LOSSES)
    assert not supports("forward-kl")


def test_default_chunk_rows() -> None:
    assert default_chunk_rows(32768, 64, "cpu") == 128
    assert default_chunk_rows(2048, 64, "cpu") == 128
    assert default_chunk_rows(128, 64, "cpu") == 1024
    assert default_chunk_rows(32768, 4096, "cuda") == 2048
    assert default_chunk_rows(262144, 4096, "cuda") == 512


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("rs-kd", {"temperature": 2.0}, "no temperature"),
        ("kl", {"alpha": 1.5}, "alpha"),
        ("skew-kl", {"skew": 0.0}, "skew"),
        ("forward-kl", {}, "choose one of"),
        ("ce", {"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_bad_options_raise_as_the_plain_loss_does(name: str, kwargs: dict, message: str) -> None:
    hidden, weight, _ = student()
    with pytest.raises(LogitcacheError, match=message):
        fused_loss(name, hidden, weight, batch_for("ce", {}), **kwargs)


def test_hidden_states_for_every_token_are_refused_with_a_hint() -> None:
    hidden, weight, _ = student()
    longer = torch.cat([hidden, hidden[:, :1]], 1)
    with pytest.raises(LogitcacheError, match=r"hidden\[:, :-1\]"):
        fused_loss("ce", longer, weight, batch_for("ce", {}))
