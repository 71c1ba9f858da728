"""The data a run trains and evaluates on: an endless stream of step batches, and the eval batches.

One optimizer step takes a global batch of ``batch_size * grad_accum * processes`` windows; each
process's step batch is its own columns of it (:mod:`logitcache.loader.partition`), a collated dict
of docs/CONTRACTS.md (``input_ids [B, T] int64``, targets ``[B, T-1, K]``) with
``B = batch_size * grad_accum``, which the loop cuts into micro-batches (:func:`split_batch`).

- ``--cache``: :class:`CacheStream` over a :class:`~logitcache.loader.dataset.CacheDataset`; eval
  windows are the first ``--eval-windows`` of ``--eval-cache``, else the cache's last ones, held
  out of training by the loader.
- ``--corpus``: :class:`CorpusStream` over windows packed in memory (small corpora), the last
  ``--eval-windows`` held out; ``K = 0`` targets, so only cross-entropy applies.

Either way the order is a pure function of (seed, epoch, ``lanes``) and the position in the stream
is ``(epoch, sample_in_epoch)``: ``state_dict()`` is all a resume needs. Every process holds all the
eval batches; :mod:`.evaluate` splits them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from logitcache.cache.format import leading_mask
from logitcache.cache.manifest import read_manifest
from logitcache.chat import ChatStats, chat_rows, pad_examples
from logitcache.corpus import Corpus, PackingStats, layout_rows, pad_rows, resolve_layout
from logitcache.errors import LogitcacheError
from logitcache.loader.collate import collate, pack_batch
from logitcache.loader.dataset import CacheDataset
from logitcache.loader.partition import OrderSettings, worker_samples
from logitcache.teacher.folder import load_tokenizer, tokenizer_fingerprint
from logitcache.train.distributed import World
from logitcache.train.settings import TrainSettings

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]


def corpus_batch(windows: np.ndarray, sequence_ids: np.ndarray, position_mask: np.ndarray | None = None) -> Batch:
    """The collated batch of docs/CONTRACTS.md for text without a teacher: ``K = 0`` targets.

    ``windows [B, T]`` token ids; ``position_mask [B, T-1] bool``: the positions that count (right
    padding and, in a chat, the non-assistant tokens do not; None: all). The target tensors are
    ``[B, P, 0]`` and there is no ``gold_logprob``: only ``ce`` applies.
    """
    input_ids = torch.from_numpy(windows.astype(np.int64))
    b, p = input_ids.shape[0], input_ids.shape[1] - 1
    mask = torch.ones(b, p, dtype=torch.bool) if position_mask is None else torch.from_numpy(position_mask)
    return {
        "input_ids": input_ids,
        "labels": input_ids[:, 1:].contiguous(),
        "sequence_id": torch.from_numpy(sequence_ids.astype(np.int64)),
        "target_ids": torch.zeros(b, p, 0, dtype=torch.int64),
        "target_mask": torch.zeros(b, p, 0, dtype=torch.bool),
        "target_logprobs": torch.zeros(b, p, 0),
        "target_weights": torch.zeros(b, p, 0),
        "tail_logprob": torch.zeros(b, p),
        "position_mask": mask,
    }


class CorpusStream:
    """Endless step batches of in-memory windows ``[N, T]`` (the positions of ``position_mask [N, T-1]``
    counting, or all), reshuffled each epoch from (seed, epoch).

    The order is :func:`logitcache.loader.partition.worker_samples` over one unit of ``N`` windows, so the
    position in the stream is ``(epoch, sample_in_epoch)``, as for a cache; a process takes its
    ``global_batch_size // world.size`` columns of every global batch.
    """

    def __init__(self, windows: np.ndarray, *, seed: int, global_batch_size: int, world: World, lanes: int,
                 position_mask: np.ndarray | None = None) -> None:
        self.windows = windows
        self.position_mask = position_mask
        self.world = world
        self.order = OrderSettings(seed=seed, global_batch_size=global_batch_size, lanes=lanes, block_size=len(windows))
        self.epoch = self.sample_in_epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        gbs = self.order.global_batch_size
        while True:
            samples = worker_samples(
                [len(self.windows)], self.order, epoch=self.epoch, sample_in_epoch=self.sample_in_epoch,
                rank=self.world.rank, world_size=self.world.size, worker=0, num_workers=1,
            )
            for ids in samples.reshape(-1, gbs // self.world.size):
                self.sample_in_epoch += gbs
                yield corpus_batch(self.windows[ids], ids, None if self.position_mask is None else self.position_mask[ids])
            self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch, "windows": len(self.windows), **asdict(self.order)}

    def load_state_dict(self, state: Mapping) -> None:
        mine = self.state_dict()
        for key in ("windows", "seed", "global_batch_size", "lanes"):
            if state[key] != mine[key]:
                raise LogitcacheError(f"cannot resume: the checkpoint has {key}={state[key]} but this corpus gives {mine[key]}")
        self.epoch, self.sample_in_epoch = state["epoch"], state["sample_in_epoch"]


class CacheStream:
    """Endless step batches of a :class:`CacheDataset`, epoch after epoch, with a resumable position."""

    def __init__(self, dataset: CacheDataset) -> None:
        self.dataset = dataset
        self.taken = 0  # batches taken since the last set_epoch / load_state_dict

    def __iter__(self) -> Iterator[Batch]:
        while True:
            for batch in self.dataset.dataloader():
                self.taken += 1
                yield batch
            self.dataset.set_epoch(self.dataset.epoch + 1)
            self.taken = 0

    def state_dict(self) -> dict:
        return self.dataset.state_dict(batches_consumed=self.taken)

    def load_state_dict(self, state: Mapping) -> None:
        self.dataset.load_state_dict(state)
        self.taken = 0


@dataclass
class Data:
    """What the loop trains and evaluates on. ``manifest`` is None for raw text (no teacher)."""

    train: CorpusStream | CacheStream
    eval_batches: list[Batch]
    manifest: dict | None
    eval_manifest: dict | None  # the cache eval_batches come from (--eval-cache's or manifest)
    vocab_size: int
    seq_len: int
    tokenizer: object | None
    eos_token_id: int | None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _cache_tokenizer(settings: TrainSettings, manifest: Mapping, world: World):
    """``--tokenizer``, else the teacher folder's if it is still there and is the cache's; else None."""
    if settings.tokenizer is not None:
        return load_tokenizer(settings.tokenizer)
    teacher_path = manifest["teacher"].get("path")
    if teacher_path and Path(teacher_path).is_dir():
        try:
            tokenizer = load_tokenizer(Path(teacher_path))
        except LogitcacheError:
            tokenizer = None
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) == manifest["tokenizer"]["fingerprint"]:
            return tokenizer
    if world.main:
        log.info("no tokenizer for the student: pass --tokenizer to save one beside it")
    return None


def _eval_cache_batches(settings: TrainSettings, manifest: Mapping, holdout: int, world: World) -> tuple[list[Batch], dict]:
    """The first ``eval_windows`` windows of ``--eval-cache`` (or the cache's held-out split), in order,
    and the manifest of the cache they come from."""
    source = settings.eval_cache or settings.cache
    dataset = CacheDataset(
        source, seed=settings.seed, global_batch_size=1, shuffle=False, rank=0, world_size=1,
        holdout=holdout, split="train" if settings.eval_cache else "eval",
    )
    other = dataset.manifest
    if other["vocab_size"] != manifest["vocab_size"] or other["tokenizer"]["fingerprint"] != manifest["tokenizer"]["fingerprint"]:
        raise LogitcacheError(
            f"--eval-cache {source} has vocab_size {other['vocab_size']} and another tokenizer than --cache "
            f"{settings.cache} (vocab_size {manifest['vocab_size']}); evaluate on a cache built with the same tokenizer"
        )
    windows = list(itertools.islice(dataset, settings.eval_windows))
    if len(windows) < settings.eval_windows and world.main:
        log.info("--eval-cache %s has %d windows, fewer than --eval-windows %d: evaluating on those",
                 source, len(windows), settings.eval_windows)
    batches = [collate(chunk, other) for chunk in _chunks(windows, settings.batch_size)]
    return [pack_batch(b) if settings.pack else b for b in batches], other


def open_data(settings: TrainSettings, world: World, checkpoint: Mapping | None) -> Data:
    """The run's data, from ``--cache`` or ``--corpus``, in global batches of ``batch_size * grad_accum * world.size``.

    The order depends on ``lanes``: ``--lanes``, else the checkpoint's (a resume keeps it whatever the
    number of processes), else the number of processes.
    """
    lanes = settings.lanes or (checkpoint["data"]["lanes"] if checkpoint is not None else world.size)
    step_windows = settings.batch_size * settings.grad_accum * world.size
    open_source = open_cache if settings.cache is not None else open_corpus
    return open_source(settings, step_windows, world, lanes)


def open_cache(settings: TrainSettings, step_windows: int, world: World, lanes: int) -> Data:
    """Train stream (this process's part of global batches of ``step_windows``) and eval batches from
    ``--cache`` (eval: ``--eval-cache`` or a held-out split; every process holds all of them)."""
    holdout = settings.eval_windows if settings.eval_every and settings.eval_cache is None else 0
    sequences = read_manifest(settings.cache)["totals"]["sequences"]
    if holdout >= sequences:
        raise LogitcacheError(
            f"--eval-windows {holdout} holds out that many windows of --cache {settings.cache} for eval, but it has "
            f"{sequences}; lower --eval-windows, or evaluate on another cache with --eval-cache"
        )
    dataset = CacheDataset(
        settings.cache, seed=settings.seed, global_batch_size=step_windows, lanes=lanes,
        rank=world.rank, world_size=world.size, holdout=holdout,
    )
    manifest = dataset.manifest
    if dataset.steps_per_epoch == 0:
        raise LogitcacheError(
            f"--cache {settings.cache} has {manifest['totals']['sequences'] - holdout} training windows "
            f"({holdout} held out for eval), fewer than one step's --batch-size x --grad-accum x processes = {step_windows}"
        )
    eval_batches, eval_manifest = [], manifest
    if settings.eval_every:
        eval_batches, eval_manifest = _eval_cache_batches(settings, manifest, holdout, world)
    return Data(
        train=CacheStream(dataset),
        eval_batches=eval_batches,
        manifest=manifest,
        eval_manifest=eval_manifest,
        vocab_size=manifest["vocab_size"],
        seq_len=manifest["seq_len"],
        tokenizer=_cache_tokenizer(settings, manifest, world),
        eos_token_id=manifest["tokenizer"]["eos_token_id"],
    )


def open_corpus(settings: TrainSettings, step_windows: int, world: World, lanes: int) -> Data:
    """Train stream and eval batches from raw text: windows packed in memory, the last held out."""
    tokenizer = load_tokenizer(settings.tokenizer)
    if tokenizer.eos_token_id is None:
        raise LogitcacheError(f"the tokenizer in {settings.tokenizer} has no EOS token to separate documents")
    corpus = Corpus.open(settings.corpus, settings.text_field)
    if settings.format == "text":
        layout = resolve_layout(tokenizer, settings.bos, settings.packing)
        rows = list(layout_rows(corpus.documents(), tokenizer, layout, settings.seq_len, PackingStats()))
        windows, counts = pad_rows(rows) if rows else (np.zeros((0, 2), dtype=np.int64), None)
        mask = None if counts is None else leading_mask(counts - 1, windows.shape[1] - 1)
    else:  # SFT: cross-entropy on the assistant's (the response's) tokens only
        rows = list(chat_rows(corpus, tokenizer, settings.record_fields, settings.chat_template, settings.seq_len,
                              settings.too_long, ChatStats()))
        windows, _, mask = pad_examples(rows) if rows else (np.zeros((0, 2), dtype=np.int64), None, None)
    holdout = settings.eval_windows if settings.eval_every else 0
    if len(rows) < holdout + step_windows:
        raise LogitcacheError(
            f"--corpus {settings.corpus} gives {len(windows)} windows of --seq-len {settings.seq_len}; "
            f"need {holdout} for eval plus {step_windows} for one step of all processes (lower --eval-windows or --batch-size)"
        )
    windows = windows.astype(np.int32)
    cut = len(windows) - holdout
    held_out = np.split(np.arange(cut, len(windows)), range(settings.batch_size, holdout, settings.batch_size))
    eval_batches = [corpus_batch(windows[ids], ids, None if mask is None else mask[ids]) for ids in held_out] if holdout else []
    return Data(
        train=CorpusStream(windows[:cut], seed=settings.seed, global_batch_size=step_windows, world=world, lanes=lanes,
                           position_mask=None if mask is None else mask[:cut]),
        eval_batches=eval_batches,
        manifest=None,
        eval_manifest=None,
        vocab_size=len(tokenizer),
        seq_len=settings.seq_len,
        tokenizer=tokenizer,
        eos_token_id=tokenizer.eos_token_id,
    )


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``parts`` equal micro-batches of a step batch, cut along the batch dimension."""
    pieces = {name: value.chunk(parts) for name, value in batch.items()}
    return [{name: pieces[name][i] for name in batch} for i in range(parts)]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}
