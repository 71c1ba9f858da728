"""Windows → the dense batch of docs/CONTRACTS.md: ``[B, P, K]`` ids, log-probabilities, weights and mask
(K = the widest position in the batch), tails and gold; laid out in one compiled pass (:func:`dense_rows`)
or by numpy (bit-identical).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from logitcache.cache.format import WindowTargets
from logitcache.native.library import address, library


def dense_rows(lengths: np.ndarray, width: int, ids: np.ndarray, logprobs: np.ndarray, weights: np.ndarray,
               covered: np.ndarray | None = None) -> tuple[np.ndarray, ...] | None:
    """The loader's dense layout of flat per-id columns in one pass, or None without the library.

    ``lengths [...]`` entries per position (any shape; the outputs are ``lengths.shape + (width,)``),
    ``ids`` int32, ``logprobs`` and ``weights`` float32 ``[S]``; returns ids int64, logprobs, weights,
    mask bool (0 / False after each position's entries) and, with ``covered [S]`` float64, the
    per-position sum of it (``lengths.shape``, added in entry order like ``numpy.bincount``).
    """
    lib = library()
    if lib is None:
        return None
    lengths = np.asarray(lengths)
    low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
    if lengths.dtype.kind not in "ui" or not 0 <= low <= high <= 0xFFFF:
        raise ValueError(f"lengths must be integers in [0, 65535], not {lengths.dtype} from {low} to {high}")
    flat = np.ascontiguousarray(lengths, dtype=np.uint16).reshape(-1)
    entries = int(flat.sum(dtype=np.int64))
    columns = [np.ascontiguousarray(a, dtype=t) for a, t in ((ids, np.int32), (logprobs, np.float32), (weights, np.float32))]
    if covered is not None:
        columns.append(np.ascontiguousarray(covered, dtype=np.float64))
    # The C side reads exactly `entries` values of each column: flat columns of that size only.
    if any(c.ndim != 1 or c.size != entries for c in columns) or not high <= width:
        raise ValueError(f"lengths add up to {entries} entries of at most {high} per position; "
                         f"got columns of {[c.shape for c in columns]} and width {width}")
    shape = (*lengths.shape, width)
    out = (np.empty(shape, np.int64), np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.bool_))
    mass = np.empty(lengths.shape, np.float64) if covered is not None else None
    lib.lc_collate(address(flat), flat.size, width, *(address(c) for c in columns[:3]),
                   address(columns[3] if covered is not None else None), *(address(a) for a in out), address(mass))
    return (*out, mass) if covered is not None else out


def _scatter(values: np.ndarray, slots: np.ndarray, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Flat position-major ``values [S]`` into the flat ``slots`` of a zero array of ``shape``."""
    out = np.zeros(int(np.prod(shape)), dtype=dtype)
    out[slots] = values
    return out.reshape(shape)


def _dense(lengths: np.ndarray, width: int, ids: np.ndarray, logprobs: np.ndarray, weights: np.ndarray,
           covered: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Dense ``[..., width]`` ids (int64), logprobs, weights and mask of flat per-id columns, and the
    per-position sum of ``covered`` (None without it): compiled in one pass (:func:`dense_rows`),
    the same arrays by numpy where the library is unavailable."""
    done = dense_rows(lengths, width, ids, logprobs, weights, covered)
    if done is not None:
        return done if covered is not None else (*done, None)
    mask = np.arange(width) < lengths[..., None]
    slots = np.flatnonzero(mask)  # where each flat entry goes, found once for every column
    mass = None
    if covered is not None:
        mass = np.bincount(slots // max(width, 1), weights=covered, minlength=lengths.size).reshape(lengths.shape)
        mass = mass.astype(np.float64, copy=False)  # bincount gives int64 zeros when there are no entries
    dense = (_scatter(values, slots, mask.shape, dtype) for values, dtype in ((ids, np.int64), (logprobs, np.float32),
                                                                               (weights, np.float32)))
    return (*dense, mask, mass)


def collate(samples: Sequence[WindowTargets], manifest: Mapping) -> dict[str, torch.Tensor]:
    """The dense batch of docs/CONTRACTS.md for ``B`` windows of ``T`` tokens (``P = T - 1``).

    Returns ``input_ids [B, T]``, ``labels [B, P]``, ``sequence_id [B]`` int64;
    ``target_ids [B, P, K]`` int64 (padding 0), ``target_mask [B, P, K]`` bool,
    ``target_logprobs`` and ``target_weights [B, P, K]`` float32 (0 at padding);
    ``tail_logprob``, ``gold_logprob [B, P]`` float32 and ``position_mask [B, P]`` bool
    (a position counts when it has stored ids). ``K`` is the widest position in the batch.
    """
    batch = WindowTargets.concat(list(samples))
    lengths = batch.target_lengths
    width = int(lengths.max(initial=0))
    logprobs = batch.target_logprobs.astype(np.float32)
    covered = None
    if batch.method == "sample":
        weights = batch.target_counts.astype(np.float32) / np.float32(manifest["params"]["samples"])
        covered = np.exp(batch.target_logprobs.astype(np.float64))
    else:
        weights = np.exp(logprobs)
    ids, logprobs, weights, mask, mass = _dense(lengths, width, batch.target_ids, logprobs, weights, covered)
    if mass is not None:
        with np.errstate(divide="ignore"):
            tail = np.log(np.maximum(1.0 - mass, 0.0)).astype(np.float32)
    else:
        tail = batch.tail_logprob.astype(np.float32)
    dense = {
        "input_ids": batch.input_ids.astype(np.int64),
        "labels": batch.input_ids[:, 1:].astype(np.int64),
        "sequence_id": batch.sequence_ids.astype(np.int64),
        "target_ids": ids,
        "target_mask": mask,
        "target_logprobs": logprobs,
        "target_weights": weights,
        "tail_logprob": tail,
        "gold_logprob": batch.gold_logprob.astype(np.float32),
        "position_mask": lengths > 0,
    }
    return {name: torch.from_numpy(array) for name, array in dense.items()}
