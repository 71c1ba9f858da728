"""What a teacher backend gives the build: the :class:`Teacher` protocol (:mod:`.load` loads one).

A backend turns rows of token ids into sparse targets: ``compute(input_ids [B, n] int64,
sequence_ids [B] int64, spec, token_counts [B] int64 | None) -> WindowTargets``, or ``compute_async``
returning something whose ``result()`` gives them (so the device can run ahead of the host). Rows
shorter than ``n`` (``token_counts``) are right-padded; each is one context of its own. Only the
positions of ``target_mask [B, n-1]`` (None: every real one) get targets; the others store nothing. ``hf`` (:mod:`.hf`) runs a
transformers model on CPU or GPU; ``vllm`` (:mod:`.vllm`) runs a vLLM engine on GPUs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from logitcache.cache.format import WindowTargets
from logitcache.targets.spec import TargetSpec


class PendingResult(Protocol):
    def result(self) -> WindowTargets: ...


class Teacher(Protocol):
    backend: str
    tokenizer: object  # a transformers tokenizer
    vocab_size: int  # the logits dimension: target ids lie in [0, vocab_size)
    max_positions: int | None  # the longest window the model takes (None: unknown)

    def describe(self) -> dict:
        """What the manifest records under ``teacher``: backend, path, name, architecture, dtype, fingerprint, ..."""
        ...

    def compute_async(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                      token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> PendingResult: ...

    def compute(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> WindowTargets: ...
