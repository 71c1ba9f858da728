"""The teacher stage: hidden states → output head in row chunks → sparse targets.

Full ``[batch, seq, vocab]`` float32 logits are never held. The ``hf`` backend runs the model's
decoder to get final hidden states ``[B, T, H]`` (small: H ≪ V), then applies the output head,
log-softmax and target extraction to ``chunk_rows`` positions at a time. Peak memory beyond the
model and its activations is about ``chunk_rows × V × 4 bytes × 3`` (logits, log-probabilities and
the sampler's probabilities) plus, for ``sample``, the sampler's scratch per draw (it matters for
large N; see :func:`logitcache.targets.row_bytes`). ``chunk_mib`` bounds it: 16 MiB on CPU by default
(cache-sized chunks were fastest there), 1 GiB on CUDA, whatever the batch, sequence length or
vocabulary (a 128k vocabulary gives 10 rows per chunk on CPU).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from logitcache.errors import LogitcacheError
from logitcache.shards import FLOAT16_MANTISSA_BITS, WindowTargets, round_float16
from logitcache.targets import RowTargets, TargetSpec, row_bytes, row_keys, row_targets

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FULL_HASH_LIMIT = 256 << 20
EDGE_BYTES = 16 << 20


def weights_fingerprint(path: Path) -> str:
    """sha256 over config and weight files: full contents up to 256 MiB a file, else size + first and last 16 MiB.

    The shortcut keeps fingerprinting a 140 GB teacher to seconds; it still changes with any
    retrained or re-quantised checkpoint in practice.
    """
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(EDGE_BYTES))
                fh.seek(size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, normalisation, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if not Path(path).is_dir():
            raise LogitcacheError(
                f"cannot load a tokenizer from {path}: there is no such folder (nor a model of that name in the "
                "local Hugging Face cache; nothing is downloaded)"
            ) from exc
        raise LogitcacheError(f"cannot load a tokenizer from {path}: {exc}") from exc


def head_chunk_rows(chunk_mib: int, vocab_size: int, spec: TargetSpec | None = None) -> int:
    """Rows per output-head chunk so that the rows' working memory stays within ``chunk_mib``:
    ``rows × V × 4 B × 3``, plus the sampler's per-draw scratch for ``spec`` (see :func:`row_bytes`)."""
    per_row = row_bytes(spec, vocab_size) if spec is not None else vocab_size * 4 * 3
    return max(1, (chunk_mib << 20) // per_row)


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


def output_head(hidden: torch.Tensor, weight: torch.Tensor, config) -> torch.Tensor:
    """Output head on ``[R, H]`` hidden states → ``[R, V] float32`` logits, with the model's logit scaling
    (``logit_scale``) and soft-capping (``final_logit_softcapping``)."""
    logits = linear(hidden, weight).float()
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


# Config attributes that hold a model's context length, by architecture family (Llama, GPT-2, MPT, ...).
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def context_length(config) -> int | None:
    """The longest input the model takes, from the first of :data:`CONTEXT_LENGTH_KEYS` it sets (None: unknown)."""
    for key in CONTEXT_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(device: str | None) -> torch.device:
    """``--device`` as a torch device (default: cuda if present, else cpu); a bad or absent one is refused."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise LogitcacheError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LogitcacheError(f"--device {device}: this machine's torch has no CUDA device; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise LogitcacheError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return resolved


class HFTeacher:
    """A causal LM in Hugging Face format, loaded from a local directory (no hub access)."""

    backend = "hf"

    def __init__(self, path: str | Path, device: str | None = None, dtype: str | None = None, chunk_mib: int | None = None):
        from transformers import AutoModelForCausalLM

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise LogitcacheError(f"teacher {self.path}: no config.json; give a Hugging Face model directory")
        self.device = resolve_device(device)
        self.torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = load_tokenizer(self.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self.torch_dtype, local_files_only=True)
        except Exception as exc:
            raise LogitcacheError(f"cannot load teacher from {self.path}: {exc}") from exc
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu" and self.torch_dtype == torch.float32:
            route_linears(self.model)  # oneDNN on x86 (see linear); the model is only ever run for inference here
        self.config = model.config
        self.head_weight = model.get_output_embeddings().weight
        self.vocab_size = int(self.head_weight.shape[0])
        self.max_positions = context_length(self.config)
        self.chunk_mib = chunk_mib or (1024 if self.device.type == "cuda" else 16)
        self.name = getattr(self.config, "_name_or_path", "") or self.path.name
        self._verified = False

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "path": str(self.path.resolve()),  # train finds the tokenizer here, from any folder
            "name": self.path.name,
            "architecture": (self.config.architectures or [type(self.model).__name__])[0],
            "dtype": self.dtype,
            "fingerprint": weights_fingerprint(self.path),
            "vocab_size": self.vocab_size,
        }

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_head(hidden, self.head_weight, self.config)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the last norm) of ``input_ids [B, T]``."""
        return self.model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def verify_head(self, input_ids: torch.Tensor) -> None:
        """Check the chunked head against the model's own logits on one window; refuse a mismatch.

        Catches a logit scaling or soft-capping the head does not know, instead of caching wrong targets.
        """
        ids = input_ids[:1]
        reference = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        ours = torch.log_softmax(self.head(self.hidden_states(ids)[0]), -1)
        if torch.isnan(reference).any():
            raise LogitcacheError(
                f"teacher {self.path}: its logits on the first window hold NaN (weights holding NaN, or an overflow "
                f"in {self.dtype}: try --dtype bfloat16 or float32); nothing was written"
            )
        tolerance = 1e-3 if self.torch_dtype == torch.float32 else 5e-2
        gap = float((reference - ours).abs().max())
        if not gap <= tolerance:  # NaN fails too
            raise LogitcacheError(
                f"teacher {self.path}: chunked output head differs from the model's logits by {gap:.3g} "
                f"(tolerance {tolerance}); this architecture post-processes logits in a way logitcache does not know"
            )
        self._verified = True

    @torch.inference_mode()
    def compute_async(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec) -> PendingTargets:
        """Queue the targets of windows ``input_ids [B, n] int64`` with ids ``sequence_ids [B] int64``.

        On CUDA this returns as soon as the work is queued, so the next batch can be queued while
        the host finishes this one; :meth:`PendingTargets.result` waits for the copies.
        """
        ids = torch.from_numpy(input_ids).to(self.device)
        if not self._verified:
            self.verify_head(ids)
        hidden = self.hidden_states(ids)[:, :-1]
        return targets_from_hidden(hidden, ids, sequence_ids, self.head, spec, head_chunk_rows(self.chunk_mib, self.vocab_size, spec))

    def compute(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec) -> WindowTargets:
        return self.compute_async(input_ids, sequence_ids, spec).result()


def targets_from_hidden(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    sequence_ids: np.ndarray,
    head: Callable[[torch.Tensor], torch.Tensor],
    spec: TargetSpec,
    chunk_rows: int,
) -> PendingTargets:
    """Apply ``head`` to ``hidden [B, n-1, H]`` in chunks of rows and extract sparse targets.

    Shared by every backend that can give final hidden states (``hf``, and vLLM's sampling path).
    Nothing here waits for the device: padded per-row results go to host memory asynchronously.
    """
    b, positions, _ = hidden.shape
    rows = hidden.reshape(b * positions, -1)
    labels = input_ids[:, 1:].reshape(-1)
    seq = torch.from_numpy(np.asarray(sequence_ids, dtype=np.int64)).repeat_interleave(positions).to(hidden.device)
    pos = torch.arange(positions, device=hidden.device).repeat(b)
    keys = row_keys(spec.seed, seq, pos)
    parts = []
    for start in range(0, rows.shape[0], chunk_rows):
        end = start + chunk_rows
        targets, gold = row_targets(head(rows[start:end]), labels[start:end], keys[start:end], spec)
        part = _to_host(targets, gold, spec.stored_logprob_bits)
        # On the host already: drop the padding now, so a batch never holds [rows, N] padded results.
        parts.append(_compact(part) if hidden.device.type == "cpu" else part)
    return PendingTargets(parts, _host(input_ids, torch.int32), np.asarray(sequence_ids, dtype=np.int64), hidden.device,
                          spec.stored_logprob_bits)


def _host(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Start copying ``tensor`` (narrowed to ``dtype`` on its device) to host memory without waiting."""
    narrowed = tensor.to(dtype)
    if narrowed.device.type == "cpu":
        return narrowed
    out = torch.empty(narrowed.shape, dtype=dtype, pin_memory=True)
    return out.copy_(narrowed, non_blocking=True)


def _to_host(rows: RowTargets, gold: torch.Tensor, logprob_bits: int = FLOAT16_MANTISSA_BITS) -> dict[str, torch.Tensor]:
    # Log-probs to be rounded to fewer bits go over as float32, so that they are rounded once (on the host).
    narrow = torch.float16 if logprob_bits >= FLOAT16_MANTISSA_BITS else torch.float32
    out = {
        "ids": _host(rows.ids, torch.int32),
        "logprobs": _host(rows.logprobs, narrow),
        "lengths": _host(rows.lengths, torch.int32),
        "gold": _host(gold, torch.float16),
    }
    if rows.counts is not None:
        out["counts"] = _host(rows.counts, torch.int32)
    if rows.tail_logprob is not None:
        out["tail"] = _host(rows.tail_logprob, torch.float16)
    return out


def _compact(part: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A chunk's host results as numpy, per-id columns without their padding (``lengths`` per row)."""
    lengths = part["lengths"].numpy()
    if lengths.size and lengths.min() == part["ids"].shape[1]:  # top-k: every row full, nothing to drop
        return {name: tensor.numpy().reshape(-1) for name, tensor in part.items()}
    real = np.arange(part["ids"].shape[1])[None, :] < lengths[:, None]
    return {name: tensor.numpy()[real] if tensor.ndim == 2 else tensor.numpy() for name, tensor in part.items()}


class PendingTargets:
    """Targets whose device-to-host copies may still be in flight; :meth:`result` assembles them."""

    def __init__(self, parts: list[dict[str, torch.Tensor]], input_ids: torch.Tensor, sequence_ids: np.ndarray,
                 device: torch.device, logprob_bits: int = FLOAT16_MANTISSA_BITS):
        self.parts = parts
        self.logprob_bits = logprob_bits
        self.input_ids = input_ids
        self.sequence_ids = sequence_ids
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> WindowTargets:
        """Wait for the copies, drop the padding, and return the windows' :class:`WindowTargets`."""
        if self.event is not None:
            self.event.synchronize()
        flat: dict[str, list[np.ndarray]] = {}
        for part in self.parts:
            for name, array in (part if isinstance(part["lengths"], np.ndarray) else _compact(part)).items():
                flat.setdefault(name, []).append(array)
        joined = {name: np.concatenate(arrays) for name, arrays in flat.items()}
        joined["logprobs"] = round_float16(joined["logprobs"], self.logprob_bits)
        input_ids = self.input_ids.numpy()
        b, positions = input_ids.shape[0], input_ids.shape[1] - 1
        return WindowTargets(
            sequence_ids=self.sequence_ids,
            input_ids=input_ids,
            target_lengths=joined["lengths"].astype(np.uint16).reshape(b, positions),
            target_ids=joined["ids"],
            target_logprobs=joined["logprobs"],
            gold_logprob=joined["gold"].reshape(b, positions),
            tail_logprob=joined["tail"].reshape(b, positions) if "tail" in joined else None,
            target_counts=joined["counts"].astype(np.uint16) if "counts" in joined else None,
        )
