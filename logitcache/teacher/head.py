"""The output head of a CPU or GPU teacher, applied by chunks of rows: ``hidden [R, H]`` → ``logits [R, V]``
with the model's logit transforms (scaling, division, soft-capping; see :func:`output_head`); float32 linears
on x86 CPUs through oneDNN.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

from logitcache.targets.rows import row_bytes
from logitcache.targets.spec import TargetSpec
from logitcache.teacher.options import CPU_CHUNK_MIB, CPU_MIN_CHUNK_ROWS, CUDA_CHUNK_MIB

log = logging.getLogger(__name__)


def head_chunk_rows(chunk_mib: int | None, vocab_size: int, spec: TargetSpec | None = None, device_type: str = "cpu") -> int:
    """Rows per output-head chunk so that the rows' working memory stays within ``chunk_mib``:
    ``rows × V × 4 B × 3``, plus the sampler's per-draw scratch for ``spec`` (see :func:`row_bytes`).

    ``chunk_mib`` None: the default of ``device_type``: :data:`CUDA_CHUNK_MIB` on CUDA; on CPU
    :data:`CPU_CHUNK_MIB` but at least :data:`CPU_MIN_CHUNK_ROWS` rows. A given ``chunk_mib`` is a
    bound, kept even where it allows a single row.
    """
    per_row = row_bytes(spec, vocab_size) if spec is not None else vocab_size * 4 * 3
    if chunk_mib is None and device_type != "cuda":
        return max(CPU_MIN_CHUNK_ROWS, (CPU_CHUNK_MIB << 20) // per_row)
    return max(1, ((chunk_mib or CUDA_CHUNK_MIB) << 20) // per_row)


ONEDNN_SWITCH = "LOGITCACHE_ONEDNN"


def _onednn_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(hidden, weight, bias, "none", [], "")


@functools.cache
def onednn_usable() -> bool:
    """Whether this process's torch runs oneDNN's linear: decided once, by a small probe against
    ``torch.nn.functional.linear``, so that a build never mixes the two kinds of linears across its shards."""
    if platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available():
        return False
    probe = torch.linspace(-1.0, 1.0, 3 * 16).reshape(3, 16)
    try:
        with torch.inference_mode():
            ok = torch.allclose(_onednn_linear(probe, probe), torch.nn.functional.linear(probe, probe), rtol=1e-5, atol=1e-5)
    except (RuntimeError, AttributeError, TypeError) as exc:  # a torch without the op, or with another signature
        log.warning("oneDNN linear is unavailable (%s); CPU teachers use torch.nn.functional.linear", exc)
        return False
    if not ok:
        log.warning("oneDNN linear disagrees with torch.nn.functional.linear; CPU teachers use the latter")
    return ok


def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)``; float32 on x86 CPUs through oneDNN rather than torch's default BLAS.

    torch's CPU ``linear`` calls MKL, which runs its AVX2 kernels on AMD processors; oneDNN (shipped
    inside torch) uses AVX-512 where the CPU has it: 2.1-2.3× faster for output heads on this
    project's AMD machine (``bench_build.py --tables head``, benchmarks/RESULTS.md). Results agree to float32 rounding,
    not bit for bit. Inference only (the op has no gradient): anything needing one, other dtypes and
    devices, ``LOGITCACHE_ONEDNN=0``, ``torch.backends.mkldnn.enabled = False`` and a torch without
    the op (:func:`onednn_usable`) take ``torch.nn.functional.linear``.
    """
    if (hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)))
            and os.environ.get(ONEDNN_SWITCH) != "0" and torch.backends.mkldnn.enabled and onednn_usable()):
        return _onednn_linear(hidden, weight, bias)
    return torch.nn.functional.linear(hidden, weight, bias)


def _linear_forward(module: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return linear(hidden, module.weight, module.bias)


def route_linears(model: torch.nn.Module) -> int:
    """Run every plain ``nn.Linear`` of an inference-only CPU ``model`` through :func:`linear`; returns how many.

    The decoder's projections are most of a small teacher's compute and hit the same AVX2 path as
    the output head. Subclasses (quantised layers and the like) keep their own forward.
    """
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for layer in layers:
        layer.forward = functools.partial(_linear_forward, layer)
    return len(layers)


def _declared(config, field: str) -> float | None:
    """``config.field`` if it holds a number (``None``, a string such as MPT's ``"inv_sqrt_d_model"``: not)."""
    value = getattr(config, field, None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# Model types whose ``logits_scaling`` multiplies the logits; Granite's family divides by it.
SCALING_MULTIPLIES = frozenset({"hyperclovax"})


def output_head(hidden: torch.Tensor, weight: torch.Tensor, config, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Output head on ``hidden [R, H]`` (model dtype) → ``logits [R, V] float32``: the linear with
    ``weight [V, H]`` and the head's own ``bias [V]`` if it has one (Phi, GPT-J), then the logit
    transforms that ``config`` (the model's text config) declares, in float32.

    transformers' causal LMs apply these after the linear (read in transformers 5.24's modeling code):

    =========================== ========================== ==============================================
    config field                 logits become              architectures
    =========================== ========================== ==============================================
    ``logit_scale``              ``logits * s``             Cohere, Cohere 2
    ``logits_scaling``           ``logits / s``             Granite, GraniteMoE, GraniteMoeShared/Hybrid
    ``logits_scaling``           ``logits * s``             HyperCLOVAX (:data:`SCALING_MULTIPLIES`)
    ``final_logit_softcapping``  ``s * tanh(logits / s)``   Gemma 2, Gemma 3, Gemma 3n, VaultGemma
    =========================== ========================== ==============================================

    No architecture sets more than one; a field that is not a number is skipped. Everything else
    between the decoder and the logits in the architectures tested (``tests/test_architectures.py``)
    is inside what ``get_decoder()`` returns, so its hidden states are what the head consumes: the
    final norm (``norm``, ``ln_f``, ``final_layer_norm``) and OPT's ``project_out`` (when
    ``word_embed_proj_dim`` differs from ``hidden_size``). Tied embeddings need nothing: the head
    weight is the embedding matrix. Any other transform (a multiplier under another name; a number in
    MPT's ``logit_scale``, which its transformers class ignores) makes the backends' first-window
    checks refuse the teacher.
    """
    logits = linear(hidden, weight, bias).float()
    scale = _declared(config, "logit_scale")
    if scale is not None:
        logits = logits * scale
    scaling = _declared(config, "logits_scaling")
    if scaling is not None:
        logits = logits * scaling if getattr(config, "model_type", None) in SCALING_MULTIPLIES else logits / scaling
    cap = _declared(config, "final_logit_softcapping")
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
