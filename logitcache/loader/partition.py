"""Index math for streaming a cache: epoch order, rank and worker split, resume offsets.

Pure functions of sizes, seed, epoch and world: no I/O, no torch. Samples (windows) are
numbered in cache order, shard by shard and row by row; a *unit* is a run of consecutive
samples that is read and decoded together (one Parquet row group).

An epoch is laid out in three steps, as in mosaicml/streaming:

1. **Order** (:func:`epoch_order`): shuffle the units, cut the result into shuffle blocks of
   ``block_size`` samples and shuffle inside each block. A function of (seed, epoch) only.
2. **Global batches** (:func:`global_batches`): the order is cut into ``lanes`` contiguous
   lanes and global batch ``j`` takes the ``j``-th run of ``global_batch_size // lanes``
   samples of every lane. The last ``N % global_batch_size`` samples of the order are
   *dropped*, so every rank gets the same number of samples; a shuffled epoch drops
   different samples each epoch.
3. **Ranks and workers** (:func:`worker_samples`): rank ``r`` takes columns
   ``[r * b, (r + 1) * b)`` of every global batch (``b = global_batch_size // world_size``);
   DataLoader worker ``w`` of ``W`` takes the rank's batches ``w, w + W, ...``, the order in
   which torch's DataLoader collects them, so a rank's stream is the same for any ``W``.

Lanes keep reading local: with ``lanes == world_size`` each rank walks its own contiguous part
of the order and decodes only its own row groups. Lanes fix the order, not the ranks: any
world size that divides the global batch sees the same global batches, which is what makes a
resume on a different number of ranks exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from logitcache.errors import LogitcacheError


@dataclass(frozen=True)
class OrderSettings:
    """Everything besides (epoch, position) that fixes the sample stream; saved in a resume state."""

    seed: int
    global_batch_size: int
    lanes: int = 1
    shuffle: bool = True
    block_size: int = 1024

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise LogitcacheError(f"seed must be >= 0, got {self.seed}")
        if self.global_batch_size < 1 or self.block_size < 1:
            raise LogitcacheError(
                f"global_batch_size ({self.global_batch_size}) and block_size ({self.block_size}) must be >= 1"
            )
        if self.lanes < 1 or self.global_batch_size % self.lanes:
            raise LogitcacheError(
                f"lanes={self.lanes} must divide global_batch_size={self.global_batch_size}; "
                "use the world size or 1"
            )


def unit_bounds(unit_sizes: Sequence[int]) -> np.ndarray:
    """``[U + 1] int64`` offsets: unit ``u`` holds samples ``[bounds[u], bounds[u + 1])``."""
    bounds = np.zeros(len(unit_sizes) + 1, dtype=np.int64)
    np.cumsum(unit_sizes, out=bounds[1:])
    return bounds


def clip_units(bounds: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``[U'] int64`` sizes of the units restricted to samples ``[start, stop)``, empty ones removed."""
    sizes = np.diff(np.clip(bounds, start, stop))
    return sizes[sizes > 0]


def epoch_order(unit_sizes: Sequence[int], *, seed: int, epoch: int, block_size: int, shuffle: bool) -> np.ndarray:
    """``[N] int64`` permutation of the samples: the order epoch ``epoch`` visits them in."""
    bounds = unit_bounds(unit_sizes)
    n = int(bounds[-1])
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    units = rng.permutation(len(unit_sizes))
    sizes = np.diff(bounds)[units]
    unit_start_in_order = np.repeat(np.cumsum(sizes) - sizes, sizes)
    by_unit = np.repeat(bounds[units], sizes) + np.arange(n) - unit_start_in_order
    block = np.arange(n) // block_size
    return by_unit[np.lexsort((rng.random(n), block))]


def global_batches(order: np.ndarray, *, global_batch_size: int, lanes: int) -> np.ndarray:
    """``[S, global_batch_size] int64``: row ``j`` is global batch ``j``; ``S = N // global_batch_size``."""
    steps = len(order) // global_batch_size
    per_lane = global_batch_size // lanes
    kept = order[: steps * global_batch_size]
    return kept.reshape(lanes, steps, per_lane).transpose(1, 0, 2).reshape(steps, global_batch_size)


def resume_step(sample_in_epoch: int, *, global_batch_size: int, steps: int) -> int:
    """The global batch a stream continues with after ``sample_in_epoch`` samples of the epoch."""
    if sample_in_epoch % global_batch_size or not 0 <= sample_in_epoch <= steps * global_batch_size:
        raise LogitcacheError(
            f"sample_in_epoch={sample_in_epoch} is not a whole number of global batches of "
            f"{global_batch_size} within an epoch of {steps} batches"
        )
    return sample_in_epoch // global_batch_size


def check_world(rank: int, world_size: int, global_batch_size: int) -> None:
    """Refuse a rank outside the world, or a world that cannot split the global batch evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise LogitcacheError(f"rank {rank} is not in a world of size {world_size}")
    if global_batch_size % world_size:
        raise LogitcacheError(f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}")


def worker_samples(
    unit_sizes: Sequence[int],
    settings: OrderSettings,
    *,
    epoch: int,
    sample_in_epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> np.ndarray:
    """``[M] int64`` samples one DataLoader worker of one rank yields, in order, to finish the epoch.

    The worker yields whole per-rank batches of ``global_batch_size // world_size`` samples:
    batches ``k + worker, k + worker + num_workers, ...`` where ``k`` is :func:`resume_step`.
    """
    check_world(rank, world_size, settings.global_batch_size)
    order = epoch_order(
        unit_sizes, seed=settings.seed, epoch=epoch, block_size=settings.block_size, shuffle=settings.shuffle
    )
    batches = global_batches(order, global_batch_size=settings.global_batch_size, lanes=settings.lanes)
    start = resume_step(sample_in_epoch, global_batch_size=settings.global_batch_size, steps=len(batches))
    per_rank = settings.global_batch_size // world_size
    mine = batches[start + worker :: num_workers, rank * per_rank : (rank + 1) * per_rank]
    return mine.reshape(-1)


@dataclass(frozen=True)
class ReadPlan:
    """How a worker reads its samples unit by unit, decoding each unit once.

    ``rows[u]`` are the rows of unit ``u`` the worker needs (sorted, unique); sample ``i`` is
    row ``rows[unit[i]][slot[i]]``; ``last[i]`` is true where unit ``unit[i]`` is used for the
    last time, so its decoded rows can be dropped.
    """

    unit: np.ndarray  # [M] int64
    slot: np.ndarray  # [M] int64
    last: np.ndarray  # [M] bool
    rows: dict[int, np.ndarray]


def read_plan(samples: np.ndarray, bounds: np.ndarray) -> ReadPlan:
    """Plan reading ``samples`` (``[M] int64``, each at most once) from units with offsets ``bounds``."""
    unit = np.searchsorted(bounds, samples, side="right") - 1
    row = samples - bounds[unit]
    by_unit = np.lexsort((row, unit))
    group_start = np.flatnonzero(np.diff(unit[by_unit], prepend=-1))
    group_size = np.diff(group_start, append=len(samples))
    slot = np.empty(len(samples), dtype=np.int64)
    slot[by_unit] = np.arange(len(samples)) - np.repeat(group_start, group_size)
    last_use = np.zeros(len(samples), dtype=bool)
    _, reversed_first = np.unique(unit[::-1], return_index=True)
    last_use[len(samples) - 1 - reversed_first] = True
    rows = {int(unit[by_unit[s]]): row[by_unit[s : s + n]] for s, n in zip(group_start, group_size)}
    return ReadPlan(unit=unit, slot=slot, last=last_use, rows=rows)
