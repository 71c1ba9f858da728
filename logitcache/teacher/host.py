"""Hidden states → targets on the host: the chunked head and target extraction shared by the ``hf`` and
``vllm`` backends, and the device-to-host copies that let the device run ahead of the host.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from logitcache.cache.format import WindowTargets, leading_mask
from logitcache.targets.rng import row_keys
from logitcache.targets.rows import row_targets
from logitcache.targets.spec import TargetSpec
from logitcache.targets.topk import RowTargets


def targets_from_hidden(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    sequence_ids: np.ndarray,
    head: Callable[[torch.Tensor], torch.Tensor],
    spec: TargetSpec,
    chunk_rows: int,
    token_counts: np.ndarray | None = None,
    target_mask: np.ndarray | None = None,
) -> PendingTargets:
    """Apply ``head`` to ``hidden [B, n-1, H]`` in chunks of rows and extract sparse targets.

    ``token_counts [B]``: the tokens of each row of ``input_ids [B, n]`` (right padding after them
    gets no targets, and costs no head work); None: every row is full. ``target_mask [B, n-1] bool``:
    the only positions that get targets (the rest store nothing; a chat's non-assistant tokens). Shared by every backend
    that can give final hidden states (``hf``, and vLLM's sampling path). Nothing here waits for
    the device: padded per-row results go to host memory asynchronously.
    """
    b, positions, _ = hidden.shape
    seq = torch.from_numpy(np.asarray(sequence_ids, dtype=np.int64)).to(hidden.device)[:, None].expand(b, positions)
    pos = torch.arange(positions, device=hidden.device)[None, :].expand(b, positions)
    real = target_mask
    if real is None and token_counts is not None:
        real = leading_mask(np.asarray(token_counts) - 1, positions)
    if real is None:
        rows, labels = hidden.reshape(b * positions, -1), input_ids[:, 1:].reshape(-1)
        seq, pos = seq.reshape(-1), pos.reshape(-1)
    else:
        on_device = torch.from_numpy(real).to(hidden.device)
        rows, labels, seq, pos = hidden[on_device], input_ids[:, 1:][on_device], seq[on_device], pos[on_device]
    keys = row_keys(spec.seed, seq, pos)
    parts = []
    for start in range(0, rows.shape[0], chunk_rows):
        end = start + chunk_rows
        targets, gold = row_targets(head(rows[start:end]), labels[start:end], keys[start:end], spec)
        part = _to_host(targets, gold)
        # On the host already: drop the padding now, so a batch never holds [rows, N] padded results.
        parts.append(_compact(part) if hidden.device.type == "cpu" else part)
    return PendingTargets(parts, _host(input_ids, torch.int32), np.asarray(sequence_ids, dtype=np.int64), hidden.device,
                          real, token_counts)


def _host(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Start copying ``tensor`` (narrowed to ``dtype`` on its device) to host memory without waiting."""
    narrowed = tensor.to(dtype)
    if narrowed.device.type == "cpu":
        return narrowed
    out = torch.empty(narrowed.shape, dtype=dtype, pin_memory=True)
    return out.copy_(narrowed, non_blocking=True)


def _to_host(rows: RowTargets, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    # Log-probabilities go over as float32 so that the shard writer rounds them once, to its fixed-point codes.
    out = {
        "ids": _host(rows.ids, torch.int32),
        "logprobs": _host(rows.logprobs, torch.float32),
        "lengths": _host(rows.lengths, torch.int32),
        "gold": _host(gold, torch.float32),
    }
    if rows.counts is not None:
        out["counts"] = _host(rows.counts, torch.int32)
    if rows.tail_logprob is not None:
        out["tail"] = _host(rows.tail_logprob, torch.float32)
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
                 device: torch.device, real: np.ndarray | None = None, token_counts: np.ndarray | None = None):
        self.parts = parts
        self.real = real  # [B, n-1] bool: the positions that have targets (None: all)
        self.token_counts = None if token_counts is None else np.asarray(token_counts, dtype=np.int64)
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
        input_ids = self.input_ids.numpy()
        b, positions = input_ids.shape[0], input_ids.shape[1] - 1

        def per_position(values: np.ndarray, dtype: type) -> np.ndarray:
            if self.real is None:
                return values.astype(dtype, copy=False).reshape(b, positions)
            out = np.zeros((b, positions), dtype=dtype)
            out[self.real] = values
            return out

        if self.token_counts is not None:  # padding: input id 0, as the shard reader gives it back
            input_ids = np.where(leading_mask(self.token_counts, positions + 1), input_ids, 0).astype(np.int32)
        return WindowTargets(
            sequence_ids=self.sequence_ids,
            input_ids=input_ids,
            target_lengths=per_position(joined["lengths"], np.uint16),
            target_ids=joined["ids"],
            target_logprobs=joined["logprobs"],
            gold_logprob=per_position(joined["gold"], np.float32),
            tail_logprob=per_position(joined["tail"], np.float32) if "tail" in joined else None,
            target_counts=joined["counts"].astype(np.uint16) if "counts" in joined else None,  # narrowed by the writer
            token_counts=self.token_counts,
        )
