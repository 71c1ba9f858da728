"""The ``hf`` backend: a causal LM in Hugging Face format run by transformers, on CPU or GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from logitcache.cache.format import WindowTargets
from logitcache.device import resolve_device
from logitcache.errors import LogitcacheError
from logitcache.targets.spec import TargetSpec
from logitcache.teacher.folder import context_length, load_tokenizer, weights_fingerprint
from logitcache.teacher.head import head_chunk_rows, output_head, route_linears
from logitcache.teacher.host import PendingTargets, targets_from_hidden


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
        self.text_config = model.config.get_text_config()  # where multimodal models keep their head transforms
        head = model.get_output_embeddings()
        self.head_weight, self.head_bias = head.weight, getattr(head, "bias", None)
        self.vocab_size = int(self.head_weight.shape[0])
        self.max_positions = context_length(self.config)
        self.chunk_mib = chunk_mib  # None: the device's default (head_chunk_rows)
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
        """``hidden [R, H]`` → ``logits [R, V] float32``, with the head transforms of :func:`output_head`."""
        return output_head(hidden, self.head_weight, self.text_config, self.head_bias)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the last norm) of ``input_ids [B, T]``."""
        return self.model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def verify_head(self, input_ids: torch.Tensor) -> None:
        """Check the chunked head against the model's own logits on one window; refuse a mismatch.

        Catches a logit transform :func:`output_head` does not know, instead of caching wrong targets.
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
    def compute_async(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                      token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> PendingTargets:
        """Queue the targets of rows ``input_ids [B, n] int64`` with ids ``sequence_ids [B] int64``.

        ``token_counts [B]``: tokens of each row, right-padded to ``n`` (None: all full); ``target_mask
        [B, n-1]``: the positions that get targets (None: all real ones). No attention mask is
        needed: attention is causal, so no real token sees the padding after it. On CUDA this
        returns as soon as the work is queued, so the next batch can be queued while the host
        finishes this one; :meth:`PendingTargets.result` waits for the copies.
        """
        ids = torch.from_numpy(input_ids).to(self.device)
        if not self._verified:
            self.verify_head(ids[:1, : None if token_counts is None else int(token_counts[0])])
        hidden = self.hidden_states(ids)[:, :-1]
        return targets_from_hidden(hidden, ids, sequence_ids, self.head, spec,
                                   head_chunk_rows(self.chunk_mib, self.vocab_size, spec, self.device.type),
                                   token_counts, target_mask)

    def compute(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> WindowTargets:
        return self.compute_async(input_ids, sequence_ids, spec, token_counts, target_mask).result()
