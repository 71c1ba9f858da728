"""Windows → the dense batch of docs/CONTRACTS.md: ``[B, P, K]`` ids, log-probabilities, weights and mask
(K = the widest position in the batch), tails and gold; laid out in one compiled pass (:func:`dense_rows`)
or by numpy (bit-identical).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from logitcache.cache.format import WindowTargets, stores_logprobs
from logitcache.errors import LogitcacheError
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
    (a position counts when it has stored ids), ``token_counts [B]`` int64 (each row's tokens; the
    rest is right padding). ``K`` is the widest position in the batch. A cache with behaviour
    log-probabilities (format v3, chat corpora) adds ``behavior_logprob [B, P]`` float32 (NaN where the
    token was not drawn by a recorded sampler). A sample cache without log-probabilities (format v4,
    ``--logprob-bits 0``) gives NaN ``target_logprobs`` at its stored ids and NaN ``tail_logprob``: only
    RS-KD's weights are known (the training settings refuse every other loss on it).
    """
    batch = WindowTargets.concat(list(samples))
    lengths = batch.target_lengths
    width = int(lengths.max(initial=0))
    known = batch.target_logprobs is not None
    if known != stores_logprobs(batch.method, manifest["params"]):
        raise LogitcacheError(f"windows {'with' if known else 'without'} target_logprobs, but the manifest's "
                              f"params {manifest['params']} say otherwise")
    logprobs = batch.target_logprobs.astype(np.float32) if known else np.full(len(batch.target_ids), np.nan, np.float32)
    covered = None
    if batch.method == "sample":
        weights = batch.target_counts.astype(np.float32) / np.float32(manifest["params"]["samples"])
        covered = np.exp(batch.target_logprobs.astype(np.float64)) if known else None
    else:
        weights = np.exp(logprobs)
    ids, logprobs, weights, mask, mass = _dense(lengths, width, batch.target_ids, logprobs, weights, covered)
    if mass is not None:
        with np.errstate(divide="ignore"):
            tail = np.log(np.maximum(1.0 - mass, 0.0)).astype(np.float32)
    elif batch.tail_logprob is not None:
        tail = batch.tail_logprob.astype(np.float32)
    else:  # sample without log-probabilities: the mass the draws missed is unknown
        tail = np.full(lengths.shape, np.nan, np.float32)
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
        "token_counts": batch.tokens().astype(np.int64),
    }
    if batch.behavior_logprob is not None:
        dense["behavior_logprob"] = batch.behavior_logprob.astype(np.float32)
    return {name: torch.from_numpy(array) for name, array in dense.items()}


def pack_plan(tokens: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of ``tokens [B]`` tokens packed first-fit, longest first, into rows of at most ``capacity``
    tokens: the row indices of each packed row, in packing order (a pure function of ``tokens``)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(tokens)), key=lambda r: -int(tokens[r])):
        fit = next((i for i, free in enumerate(room) if free >= tokens[row]), None)
        if fit is None:
            bins.append([row])
            room.append(capacity - int(tokens[row]))
        else:
            bins[fit].append(row)
            room[fit] -= int(tokens[row])
    return bins


def pack_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch of right-padded rows (``token_counts [B]``) repacked into fewer rows of the same
    width ``T``, several rows one after another in each, with ``position_ids [B', T]`` restarting at
    every row: the student sees each row alone (transformers builds a block-diagonal causal mask from
    restarting position ids; ``tests/test_loader.py`` checks the logits equal the rows' own), and
    padding falls from ``B × T`` to about the tokens the rows hold.

    Per-position tensors follow their rows; a row's last position (whose next token is the next row's)
    and the padding are out of ``position_mask`` and hold 0 (``behavior_logprob``: NaN, not drawn). ``sequence_id [B', S]`` lists each packed row's
    sequence ids (-1 after them).
    """
    tokens = batch["token_counts"].numpy()
    width = batch["input_ids"].shape[1]
    if (tokens == width).all():  # nothing padded: nothing to gain
        return dict(batch)
    bins = pack_plan(tokens, width)
    src_row = np.full((len(bins), width), -1, dtype=np.int64)
    src_col = np.zeros((len(bins), width), dtype=np.int64)
    for packed, rows in enumerate(bins):
        offset = 0
        for row in rows:
            n = int(tokens[row])
            src_row[packed, offset : offset + n] = row
            src_col[packed, offset : offset + n] = np.arange(n)
            offset += n
    real = torch.from_numpy(src_row >= 0)
    rows, cols = torch.from_numpy(np.maximum(src_row, 0)), torch.from_numpy(src_col)
    # position t predicts token t + 1: it counts only where both are the same row's
    same = real[:, :-1] & real[:, 1:] & (rows[:, :-1] == rows[:, 1:])
    pos_rows, pos_cols = rows[:, :-1], cols[:, :-1].clamp_max(width - 2)

    def gather(name: str) -> torch.Tensor:
        values = batch[name][pos_rows, pos_cols]
        keep = same.reshape(*same.shape, *([1] * (values.dim() - 2)))
        padding = math.nan if name == "behavior_logprob" else 0  # not drawn, as in the rows' own padding
        return torch.where(keep, values, torch.full((), padding, dtype=values.dtype))

    input_ids = torch.where(real, batch["input_ids"][rows, cols], 0)
    out = {name: gather(name) for name in batch if batch[name].dim() >= 2 and batch[name].shape[1] == width - 1}
    out["position_mask"] = out["position_mask"] & same
    segments = max(len(b) for b in bins)
    sequence_ids = torch.full((len(bins), segments), -1, dtype=torch.int64)
    for packed, members in enumerate(bins):
        sequence_ids[packed, : len(members)] = batch["sequence_id"][members]
    out.update(input_ids=input_ids, labels=input_ids[:, 1:].contiguous(), position_ids=torch.where(real, cols, 0),
               sequence_id=sequence_ids, token_counts=torch.from_numpy(np.array([tokens[b].sum() for b in bins])))
    return out
