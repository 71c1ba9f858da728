"""Stream a cache into training batches: row group by row group, shuffled, sharded, resumable.

:class:`CacheDataset` is a torch ``IterableDataset`` of windows (one-window
:class:`~logitcache.cache.format.WindowTargets`); :func:`~logitcache.loader.collate.collate` turns a list of them into the dense
batch of docs/CONTRACTS.md. The order comes from :mod:`logitcache.loader.partition`; this module only
reads what a worker's order asks for, decoding each row group once per worker and keeping only
the rows still to be yielded, so memory follows ``block_size``, never the number of shards.

DataLoader workers take the rank's batches in turn (worker ``w`` the batches ``w, w + W, ...``, so
that the order does not depend on ``W``), and consecutive batches share row groups: with ``W``
workers a row group is decoded by up to ``W`` of them, so decode work grows with ``W`` while it
spreads over ``W`` processes. One process decodes far faster than a GPU trains
(benchmarks/RESULTS.md); ``logitcache train`` reads in-process (no workers).

Checkpointing with DataLoader workers: the dataset object in the trainer's process never sees
the workers' progress, so the trainer says how many batches it took::

    dataset = CacheDataset(cache_dir, seed=0, global_batch_size=64)
    loader = dataset.dataloader(num_workers=4)
    if checkpoint:
        dataset.load_state_dict(checkpoint["data"])
    while dataset.epoch < epochs:
        for taken, batch in enumerate(loader, start=1):
            train_step(batch)
            if time_to_save:
                save({"data": dataset.state_dict(batches_consumed=taken), ...})
        dataset.set_epoch(dataset.epoch + 1)

``batches_consumed`` counts the batches taken from the iterator begun since the last
``set_epoch`` / ``load_state_dict`` (the same on every rank). Keep ``persistent_workers`` off:
persistent workers keep the dataset copy of their first epoch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitcache.cache.format import METADATA_KEY, ROW_GROUP_ROWS, WindowTargets, from_table
from logitcache.cache.manifest import read_manifest
from logitcache.errors import LogitcacheError
from logitcache.loader.collate import collate
from logitcache.loader.partition import (
    OrderSettings,
    check_world,
    clip_units,
    read_plan,
    resume_step,
    unit_bounds,
    worker_samples,
)

SPLITS = ("train", "eval")


# What fixes the stream besides the position: a resume state must agree on all of them.
_STREAM_KEYS = ("fingerprint", "seed", "global_batch_size", "lanes", "shuffle", "block_size", "holdout")


def check_student_vocab(manifest: Mapping, vocab_size: int, tokenizer_fingerprint: str | None = None) -> None:
    """Refuse a student whose logits dimension or tokenizer differs from the cache's teacher."""
    if vocab_size != manifest["vocab_size"]:
        raise LogitcacheError(
            f"student vocab_size {vocab_size} does not match the cache's vocab_size {manifest['vocab_size']}: "
            "target ids index the teacher's logits, so the student needs the same logits dimension"
        )
    cache_tokenizer = manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != cache_tokenizer:
        raise LogitcacheError(
            f"student tokenizer fingerprint {tokenizer_fingerprint} does not match the cache's tokenizer "
            f"fingerprint {cache_tokenizer}: distil with the tokenizer the cache was built with"
        )


@dataclass(frozen=True)
class _Unit:
    """The rows of one row group a worker still needs, decoded; ``offsets [R + 1]`` index flat ids."""

    targets: WindowTargets
    offsets: np.ndarray

    def window(self, i: int) -> WindowTargets:
        t, lo, hi = self.targets, self.offsets[i], self.offsets[i + 1]
        per_window = slice(i, i + 1)
        return WindowTargets(
            sequence_ids=t.sequence_ids[per_window],
            input_ids=t.input_ids[per_window],
            target_lengths=t.target_lengths[per_window],
            target_ids=t.target_ids[lo:hi],
            target_logprobs=None if t.target_logprobs is None else t.target_logprobs[lo:hi],
            gold_logprob=t.gold_logprob[per_window],
            tail_logprob=None if t.tail_logprob is None else t.tail_logprob[per_window],
            target_counts=None if t.target_counts is None else t.target_counts[lo:hi],
            token_counts=None if t.token_counts is None else t.token_counts[per_window],
            behavior_logprob=None if t.behavior_logprob is None else t.behavior_logprob[per_window],
        )


def _row_groups(manifest: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row group of the cache in order: ``(shard [U], group [U], rows [U])`` int64."""
    shard_rows = np.array([entry["rows"] for entry in manifest["shards"]], dtype=np.int64)
    groups_per_shard = -(-shard_rows // ROW_GROUP_ROWS)
    shard = np.repeat(np.arange(len(shard_rows)), groups_per_shard)
    group = np.arange(len(shard)) - np.repeat(np.cumsum(groups_per_shard) - groups_per_shard, groups_per_shard)
    return shard, group, np.minimum(ROW_GROUP_ROWS, shard_rows[shard] - group * ROW_GROUP_ROWS)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise LogitcacheError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _split_range(num_samples: int, holdout: int, split: str) -> tuple[int, int]:
    if split not in SPLITS:
        raise LogitcacheError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0 <= holdout < num_samples or (split == "eval" and holdout == 0):
        raise LogitcacheError(
            f"holdout={holdout} windows does not fit a cache of {num_samples} windows "
            "(the eval split needs holdout >= 1 and the train split at least one window)"
        )
    cut = num_samples - holdout
    return (0, cut) if split == "train" else (cut, num_samples)


class CacheDataset(IterableDataset):
    """Windows of a cache, in the order of :mod:`logitcache.loader.partition`, for one rank.

    Each DataLoader worker yields whole per-rank batches of ``batch_size`` windows, so the loader
    must batch with exactly ``batch_size`` (use :meth:`dataloader`). Samples are one-window
    :class:`WindowTargets`; :func:`collate` makes the dense batch.

    ``lanes`` (default: the world size) sets how many contiguous runs of the order feed a global
    batch; it keeps each rank reading its own row groups and is part of the order, so a resume on
    another number of ranks passes the old ``lanes``. ``block_size`` windows are shuffled
    together; a rank keeps at most about ``block_size * lanes / world_size`` windows decoded.
    ``holdout`` reserves the last windows of the cache for ``split="eval"``.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        seed: int,
        global_batch_size: int,
        shuffle: bool = True,
        block_size: int = 1024,
        lanes: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        holdout: int = 0,
        split: str = "train",
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        self.rank, self.world_size = _world(rank, world_size)
        self.settings = OrderSettings(
            seed=seed,
            global_batch_size=global_batch_size,
            lanes=self.world_size if lanes is None else lanes,
            shuffle=shuffle,
            block_size=block_size,
        )
        check_world(self.rank, self.world_size, global_batch_size)
        self.holdout = holdout
        self._shard, self._group, rows = _row_groups(self.manifest)
        self._bounds = unit_bounds(rows)
        self._start, stop = _split_range(int(self._bounds[-1]), holdout, split)
        self._unit_sizes = clip_units(self._bounds, self._start, stop)
        self.epoch = 0
        self.sample_in_epoch = 0

    @property
    def batch_size(self) -> int:
        """Windows per rank per step: ``global_batch_size // world_size``."""
        return self.settings.global_batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last ``N % global_batch_size`` windows are dropped)."""
        return int(self._unit_sizes.sum()) // self.settings.global_batch_size

    def __len__(self) -> int:
        """Windows this rank yields in the next iteration."""
        start = self.sample_in_epoch // self.settings.global_batch_size
        return (self.steps_per_epoch - start) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.epoch, self.sample_in_epoch = epoch, 0

    def state_dict(self, *, batches_consumed: int) -> dict:
        """Where the stream stands after the trainer took ``batches_consumed`` batches of this iteration."""
        gbs = self.settings.global_batch_size
        sample = self.sample_in_epoch + batches_consumed * gbs
        resume_step(sample, global_batch_size=gbs, steps=self.steps_per_epoch)
        epoch = self.epoch
        if sample == self.steps_per_epoch * gbs:
            epoch, sample = epoch + 1, 0
        return {
            "epoch": epoch,
            "sample_in_epoch": sample,
            "fingerprint": self.manifest["fingerprint"],
            "holdout": self.holdout,
            **asdict(self.settings),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue with exactly the samples after ``state``; refuse a state of another stream."""
        mine = self.state_dict(batches_consumed=0)
        for key in _STREAM_KEYS:
            if state.get(key) != mine[key]:
                hint = " (lanes defaults to the world size: pass the old lanes)" if key == "lanes" else ""
                raise LogitcacheError(
                    f"cannot resume: the state has {key}={state.get(key)!r} "
                    f"but this dataset has {key}={mine[key]!r}{hint}"
                )
        gbs = self.settings.global_batch_size
        resume_step(state["sample_in_epoch"], global_batch_size=gbs, steps=self.steps_per_epoch)
        self.epoch, self.sample_in_epoch = state["epoch"], state["sample_in_epoch"]

    def dataloader(self, num_workers: int = 0, **kwargs: object) -> DataLoader:
        """A DataLoader that batches exactly as this dataset's order expects (``kwargs`` go to DataLoader)."""
        if kwargs.get("persistent_workers"):
            raise LogitcacheError(
                "persistent_workers=True would keep each worker's first copy of the dataset, so set_epoch "
                "and load_state_dict would not reach it; leave it off"
            )
        return DataLoader(
            self,
            batch_size=self.batch_size,
            num_workers=num_workers,
            collate_fn=functools.partial(collate, manifest=self.manifest),
            **kwargs,
        )

    def __iter__(self) -> Iterator[WindowTargets]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        samples = self._start + worker_samples(
            self._unit_sizes,
            self.settings,
            epoch=self.epoch,
            sample_in_epoch=self.sample_in_epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
        )
        plan = read_plan(samples, self._bounds)
        live: dict[int, _Unit] = {}
        for unit, slot, last in zip(plan.unit.tolist(), plan.slot.tolist(), plan.last.tolist()):
            if unit not in live:
                live[unit] = self._read(unit, plan.rows[unit])
            yield live[unit].window(slot)
            if last:
                del live[unit]

    def _read(self, unit: int, rows: np.ndarray) -> _Unit:
        """Decode ``rows`` (sorted) of row group ``unit``; keep only those rows."""
        parquet, group = self._open(unit)
        try:
            table = parquet.read_row_group(group)
        except (OSError, pa.ArrowException) as exc:
            raise LogitcacheError(
                f"{self._shard_path(unit)}: row group {group} cannot be decoded ({exc}); the shard is damaged: "
                "`logitcache validate` checks every shard, and a rebuild or re-download replaces it"
            ) from exc
        targets = from_table(table if len(rows) == table.num_rows else table.take(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(targets.target_lengths.sum(axis=1, dtype=np.int64), out=offsets[1:])
        return _Unit(targets=targets, offsets=offsets)

    def _shard_path(self, unit: int) -> Path:
        return self.cache_dir / self.manifest["shards"][self._shard[unit]]["file"]

    def _open(self, unit: int) -> tuple[pq.ParquetFile, int]:
        """The shard holding row group ``unit`` and the group's index in it, checked against the manifest."""
        entry = self.manifest["shards"][self._shard[unit]]
        path, group = self._shard_path(unit), int(self._group[unit])
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise LogitcacheError(f"{path}: cannot open a shard the manifest lists ({exc})") from exc
        expected = int(self._bounds[unit + 1] - self._bounds[unit])
        found = parquet.metadata.row_group(group).num_rows if group < parquet.num_row_groups else 0
        if parquet.metadata.num_rows != entry["rows"] or found != expected:
            raise LogitcacheError(
                f"{path}: {parquet.metadata.num_rows} rows with {found} in row group {group}, but the manifest "
                f"says {entry['rows']} rows and {expected} in that group; rebuild or re-download the cache"
            )
        # Where the shard's own metadata (in the footer just read) names its build and its place, they
        # must be the manifest's: a file swapped for another shard, or another build's, is refused.
        try:
            own = json.loads((parquet.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}"))
        except ValueError:
            own = {}
        index, build = int(self._shard[unit]), self.manifest.get("fingerprint")
        if own.get("shard_index", index) != index or own.get("build_fingerprint", build) != build:
            raise LogitcacheError(
                f"{path}: the shard's metadata says it is shard {own.get('shard_index')} of build "
                f"{str(own.get('build_fingerprint'))[:12]}, but the manifest lists it as shard {index} of build "
                f"{str(build)[:12]}; rebuild or re-download the cache"
            )
        return parquet, group
