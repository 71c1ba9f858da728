"""``logitcache train``: a student from a cache (distillation) or from raw text (cross-entropy).

Two sources of data, one loop:

- ``--cache DIR --loss NAME``: step batches stream from the cache (:mod:`logitcache.loader`) and
  the loss (:mod:`logitcache.losses`) compares the student with the cached teacher targets.
  Eval windows come from ``--eval-cache`` or are the last ``--eval-windows`` windows of the cache,
  held out of training by the loader.
- ``--corpus PATH --tokenizer DIR``: the text is packed into windows (:mod:`logitcache.corpus`),
  the last ``--eval-windows`` are held out and the loss is cross-entropy on the next token. The
  windows are kept in memory: this mode is meant for small corpora (the demo pretrains its
  teacher with it).

One optimizer step takes a *global batch* of ``batch_size * grad_accum * processes`` windows: each
process takes ``grad_accum`` micro-batches of ``batch_size``. Losses return sums; every micro-batch
is divided by the counted positions of the WHOLE global step (summed over processes), so
accumulation and processes give the gradient of one large batch.

Distributed (``torchrun --nproc-per-node N -m logitcache train ...``): every process joins the
process group torchrun describes (gloo on CPU, nccl on ``cuda:LOCAL_RANK``), reads its own columns
of each global batch (:mod:`logitcache.partition`) and trains the student wrapped in DDP, or with
``--fsdp`` sharded by FSDP2 (``fully_shard`` per decoder layer, then the whole model). DDP and FSDP
*average* gradients over processes; the loss is scaled by the number of processes to undo that, so
the gradient is the sum over the global batch divided by its counted positions, as on one process.
Only the last micro-batch of a step synchronises gradients. Eval batches are split over processes
and the sums all-reduced. Process 0 alone writes metrics, checkpoints, the student and the plot.
The data order is fixed by (seed, epoch, ``lanes``), where ``lanes`` defaults to the number of
processes of the first run and is kept by every resume, so a checkpoint resumes exactly on any
number of processes that divides its global batch (with ``--batch-size`` and ``--grad-accum`` set
to keep the global batch).

Files under ``--out``::

    metrics.jsonl   one JSON object per train step {"kind": "train", ...} and per eval {"kind": "eval", ...}
    checkpoint/     the model (save_pretrained), trainer.pt (optimizer, scheduler, data position,
                    step, RNG state, settings) and settings.json; replaced atomically
    student/        the final student (+ its tokenizer when known): AutoModelForCausalLM loads it
    loss.png        train and eval losses against steps

Resume: the data order is a function of (seed, epoch), so the data position is two numbers; the
model, optimizer, scheduler and RNG state are restored exactly. On CPU a resumed run logs the same
loss at every step, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from logitcache.atomic import TMP_SUFFIX, fsync_path, write_atomic
from logitcache.corpus import Corpus, PackingStats, pack_windows, token_stream
from logitcache.errors import LogitcacheError
from logitcache.fused import default_chunk_rows, fused_loss, output_head, student_hidden, supports
from logitcache.loader import CacheDataset, collate
from logitcache.losses import LOSSES, LossOutput, ce_loss, check_options, default_temperature, get_loss
from logitcache.manifest import read_manifest
from logitcache.partition import OrderSettings, worker_samples
from logitcache.student import build_student, check_source, check_student, load_student
from logitcache.teacher import load_tokenizer, resolve_device, tokenizer_fingerprint

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint"
STUDENT_NAME = "student"
PLOT_NAME = "loss.png"
TRAINER_STATE = "trainer.pt"
ECE_BINS = 15
# Settings a resumed run may change: none of them alters what the steps compute. batch_size and
# grad_accum may change as long as the global batch does not (checked: see check_global_batch).
RESUMABLE_CHANGES = ("out", "resume", "device", "compile", "save_every", "batch_size", "grad_accum", "lanes")
# A folder: each process appends the sequence ids of every step it trains on to rank-R.jsonl there.
DEBUG_SEQUENCES_ENV = "LOGITCACHE_DEBUG_SEQUENCES"
# Loss-specific settings: field -> (CLI option, the loss's keyword, the losses that take it); None
# leaves the loss's own default.
LOSS_OPTIONS = {
    "skew": ("skew", "skew", ("skew-kl", "skew-reverse-kl")),
    "loss_k": ("loss-k", "k", ("bild", "rlkd")),
    "rank_temperature": ("rank-temperature", "rank_temperature", ("rlkd",)),
    "rlkd_base": ("rlkd-base", "base", ("rlkd",)),
}

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``logitcache train`` takes, one field per CLI option; saved in every checkpoint."""

    out: Path
    cache: Path | None = None
    loss: str | None = None
    corpus: Path | None = None
    tokenizer: Path | None = None
    seq_len: int = 512
    text_field: str = "text"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: default_warmup(steps)
    weight_decay: float = 0.1
    clip: float = 1.0
    alpha: float = 0.0
    temperature: float | None = None
    skew: float | None = None
    loss_k: int | None = None
    rank_temperature: float | None = None
    rlkd_base: str | None = None
    eval_every: int = 100
    eval_windows: int = 64
    eval_cache: Path | None = None
    save_every: int = 500
    resume: bool = False
    seed: int = 0
    student: str | None = None
    student_config: Path | None = None
    init_from: Path | None = None
    compile: bool = False
    fused_loss: bool = True
    device: str | None = None
    fsdp: bool = False
    lanes: int | None = None

    def check(self) -> None:
        """Reject settings that can never work, before anything is loaded or written."""
        if (self.cache is None) == (self.corpus is None):
            raise LogitcacheError(
                "give --cache DIR (distil from a cache) or --corpus PATH --tokenizer DIR (cross-entropy on text), not both"
            )
        if self.cache is not None:
            if self.loss is None:
                raise LogitcacheError("--cache needs --loss: e.g. rs-kd for a sampled cache, topk-ghost for a top-k one")
            get_loss(self.loss)
        else:
            rules = [
                (self.tokenizer is not None, "--corpus needs --tokenizer DIR to turn the text into tokens"),
                (self.loss in (None, "ce"), f"--loss {self.loss} needs a teacher: with --corpus only ce works"),
                (self.eval_cache is None, "--eval-cache goes with --cache; --corpus holds out its own last windows"),
                (self.seq_len >= 2, f"--seq-len {self.seq_len}: need at least 2 tokens per window"),
            ]
            _enforce(rules)
        _enforce([
            (not Path(self.out).exists() or Path(self.out).is_dir(), f"--out {self.out} is a file; give a folder"),
            (self.steps >= 1, f"--steps {self.steps}: must be at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.grad_accum >= 1, f"--grad-accum {self.grad_accum}: must be at least 1"),
            (self.lr > 0, f"--lr {self.lr}: must be positive"),
            (0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio {self.min_lr_ratio}: must lie in [0, 1]"),
            (self.warmup_steps is None or 0 <= self.warmup_steps < self.steps,
             f"--warmup-steps {self.warmup_steps}: must be >= 0 and below --steps {self.steps} (else the LR never decays)"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0"),
            (self.clip >= 0, f"--clip {self.clip}: must be >= 0 (0 turns clipping off)"),
            (0 <= self.alpha <= 1, f"--alpha {self.alpha}: must lie in [0, 1] ((1 - alpha) * kd + alpha * ce)"),
            (self.temperature is None or self.temperature > 0, f"--temperature {self.temperature}: must be positive"),
            (self.eval_every >= 0, f"--eval-every {self.eval_every}: must be >= 0 (0 turns eval off)"),
            (self.eval_windows >= 1 or not self.eval_every, f"--eval-windows {self.eval_windows}: must be at least 1"),
            (self.save_every >= 0, f"--save-every {self.save_every}: must be >= 0 (0: only at the end)"),
            (self.seed >= 0, f"--seed {self.seed}: must be >= 0"),
            (self.lanes is None or self.lanes >= 1, f"--lanes {self.lanes}: must be at least 1"),
        ])
        check_source(self.student, self.student_config, self.init_from)
        for field, (option, _, losses) in LOSS_OPTIONS.items():
            if getattr(self, field) is not None and self.loss not in losses:
                raise LogitcacheError(f"--{option} goes with --loss {' or '.join(losses)}, not --loss {self.loss or 'ce'}")
        check_options(self.loss or "ce", alpha=self.alpha, temperature=self.temperature, **self.loss_options())
        if self.cache is not None:  # the loss must suit how each cache was built (rs-kd needs a sampled one)
            make_loss(self, read_manifest(self.cache), self.alpha)
            if self.eval_cache is not None and self.eval_every:
                make_loss(self, read_manifest(self.eval_cache), 0.0, source="--eval-cache")

    @property
    def warmup(self) -> int:
        """``--warmup-steps``, else :func:`default_warmup` of ``--steps``."""
        return default_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps

    def loss_options(self) -> dict[str, float | str]:
        """The loss-specific options given (``skew``, ``k``, ...), as the loss's keyword arguments."""
        given = {field: getattr(self, field) for field in LOSS_OPTIONS}
        return {LOSS_OPTIONS[field][1]: value for field, value in given.items() if value is not None}

    def to_json(self) -> dict:
        """The settings as JSON values (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def default_warmup(steps: int) -> int:
    """Warmup steps when ``--warmup-steps`` is not given: 100, or a tenth of the run if that is less."""
    return min(100, steps // 10)


def _enforce(rules: list[tuple[bool, str]]) -> None:
    for ok, message in rules:
        if not ok:
            raise LogitcacheError(message)


# ---- processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` in ``[0, size)``."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Process 0 writes the files; the others only train."""
        return self.rank == 0


@contextmanager
def process_group(requested_device: str | None) -> Iterator[tuple[World, torch.device]]:
    """The world and this process's device; under torchrun (``WORLD_SIZE`` > 1), inside its process group.

    Joins the group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``)
    with gloo on CPU and nccl on CUDA, where process ``LOCAL_RANK`` of a node takes
    ``cuda:LOCAL_RANK``; leaves it on exit. A group the caller set up is used as it is.
    """
    device = resolve_device(requested_device)
    joined = dist.is_available() and dist.is_initialized()
    if not joined and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield World(), device
        return
    if device.type == "cuda":
        if device.index is not None:
            raise LogitcacheError(f"--device {device} under torchrun: pass --device cuda; each process takes cuda:LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not joined:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield World(rank=dist.get_rank(), size=dist.get_world_size()), device
    finally:
        if not joined:
            dist.destroy_process_group()


def all_sum(value: Tensor, world: World) -> Tensor:
    """``value`` summed over the processes (in place; itself on one process)."""
    if world.size > 1:
        dist.all_reduce(value)
    return value


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def distribute(student: torch.nn.Module, world: World, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """The module the loop calls, on ``device``: the student itself on one process, else DDP or FSDP2.

    FSDP2 (``fsdp``) shards every block the model names in ``_no_split_modules`` (decoder layers),
    then the rest (a model naming none is one block); it moves the weights block by block, so the
    whole student never sits on one GPU. Both change ``student`` in place or wrap it: keep using
    ``student`` for saving and eval.
    """
    if world.size == 1:
        return student.to(device)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world.size,))
        blocks = set(getattr(student, "_no_split_modules", None) or ())
        for module in student.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        return fully_shard(student, mesh=mesh)
    return DistributedDataParallel(student.to(device), device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: with ``sync`` False, DDP/FSDP keep the gradient local."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def check_same_start(world: World, checkpoint: Mapping | None) -> None:
    """Refuse processes that found different checkpoints (an ``--out`` that not every node shares)."""
    if world.size == 1:
        return
    steps = [None] * world.size
    dist.all_gather_object(steps, None if checkpoint is None else checkpoint["step"])
    if len(set(steps)) > 1:
        raise LogitcacheError(
            f"the processes found different checkpoints in --out (step by rank: {steps}); "
            "put --out on a filesystem that every node shares"
        )


def check_global_batch(settings: TrainSettings, world: World, checkpoint: Mapping) -> None:
    """Refuse a resume whose steps would take another number of windows than the checkpoint's."""
    saved = checkpoint["data"]["global_batch_size"]
    now = settings.batch_size * settings.grad_accum * world.size
    if now == saved:
        return
    base = (
        f"cannot resume: the checkpoint's steps take {saved} windows but --batch-size {settings.batch_size} "
        f"x --grad-accum {settings.grad_accum} x {world.size} processes = {now}"
    )
    if saved % world.size:
        raise LogitcacheError(
            f"{base}; {saved} windows do not split over {world.size} processes: use a number of processes dividing {saved}"
        )
    per_process = saved // world.size
    accum = settings.grad_accum if per_process % settings.grad_accum == 0 else 1
    raise LogitcacheError(
        f"{base}; on {world.size} processes pass --batch-size x --grad-accum = {per_process}, "
        f"e.g. --batch-size {per_process // accum} --grad-accum {accum}"
    )


# ---- data --------------------------------------------------------------------------------


def corpus_batch(windows: np.ndarray, sequence_ids: np.ndarray) -> Batch:
    """The collated batch of docs/CONTRACTS.md for text without a teacher: ``K = 0`` targets.

    ``windows [B, T]`` token ids. Every position counts (``position_mask`` all true); the target
    tensors are ``[B, P, 0]`` and there is no ``gold_logprob``: only ``ce`` applies.
    """
    input_ids = torch.from_numpy(windows.astype(np.int64))
    b, p = input_ids.shape[0], input_ids.shape[1] - 1
    return {
        "input_ids": input_ids,
        "labels": input_ids[:, 1:].contiguous(),
        "sequence_id": torch.from_numpy(sequence_ids.astype(np.int64)),
        "target_ids": torch.zeros(b, p, 0, dtype=torch.int64),
        "target_mask": torch.zeros(b, p, 0, dtype=torch.bool),
        "target_logprobs": torch.zeros(b, p, 0),
        "target_weights": torch.zeros(b, p, 0),
        "tail_logprob": torch.zeros(b, p),
        "position_mask": torch.ones(b, p, dtype=torch.bool),
    }


class CorpusStream:
    """Endless step batches of in-memory windows ``[N, T]``, reshuffled each epoch from (seed, epoch).

    The order is :func:`logitcache.partition.worker_samples` over one unit of ``N`` windows, so the
    position in the stream is ``(epoch, sample_in_epoch)``, as for a cache; a process takes its
    ``global_batch_size // world.size`` columns of every global batch.
    """

    def __init__(self, windows: np.ndarray, *, seed: int, global_batch_size: int, world: World, lanes: int) -> None:
        self.windows = windows
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
                yield corpus_batch(self.windows[ids], ids)
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
    return [collate(chunk, other) for chunk in _chunks(windows, settings.batch_size)], other


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
    eval_batches, eval_manifest = _eval_cache_batches(settings, manifest, holdout, world) if settings.eval_every else ([], manifest)
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
    stats = PackingStats()
    documents = Corpus.open(settings.corpus, settings.text_field).documents()
    pieces = token_stream(documents, tokenizer, tokenizer.eos_token_id, stats)
    windows = list(pack_windows(pieces, settings.seq_len, stats))
    holdout = settings.eval_windows if settings.eval_every else 0
    if len(windows) < holdout + step_windows:
        raise LogitcacheError(
            f"--corpus {settings.corpus} gives {len(windows)} windows of --seq-len {settings.seq_len}; "
            f"need {holdout} for eval plus {step_windows} for one step of all processes (lower --eval-windows or --batch-size)"
        )
    windows = np.stack(windows).astype(np.int32)
    cut = len(windows) - holdout
    held_out = np.split(np.arange(cut, len(windows)), range(settings.batch_size, holdout, settings.batch_size))
    eval_batches = [corpus_batch(windows[ids], ids) for ids in held_out] if holdout else []
    return Data(
        train=CorpusStream(windows[:cut], seed=settings.seed, global_batch_size=step_windows, world=world, lanes=lanes),
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


# ---- optimisation ------------------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step ``step + 1`` (``step`` counts from 0).

    Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, projections) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def make_loss(
    settings: TrainSettings, manifest: Mapping | None, alpha: float, head: torch.nn.Linear | None = None, source: str = "--cache"
) -> Callable[[Tensor, Batch], LossOutput]:
    """The named loss bound to its options; ``rs-kd`` gets the proposal temperature the cache was sampled at.

    With ``head`` the loss is fused with the output head (chunked, never holding ``[B, T, V]`` logits)
    and takes final hidden states ``[B, P, H]`` instead of logits. ``source`` names the option
    ``manifest`` came from (``--cache`` or ``--eval-cache``), for the error messages.
    """
    name = settings.loss or "ce"
    options = {}
    where = f"--eval-cache {settings.eval_cache}" if source == "--eval-cache" and settings.eval_cache else f"--cache {settings.cache}"
    if name == "rs-kd":
        if manifest["method"] != "sample":
            raise LogitcacheError(
                f"--loss rs-kd needs a cache built with --method sample; {where} is {manifest['method']} "
                "(use topk-ghost, topk-renorm or kl)"
            )
        options["proposal_temperature"] = manifest["params"]["proposal_temperature"]
    if settings.temperature is not None:
        options["temperature"] = settings.temperature  # else each loss's own default (BiLD: 3)
    options.update(settings.loss_options())
    if head is not None:
        return lambda hidden, batch: fused_loss(name, hidden, head.weight, batch, head_bias=head.bias, alpha=alpha, **options)
    return partial(get_loss(name), alpha=alpha, **options)


# ---- evaluation --------------------------------------------------------------------------


def calibration_bins(confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> Tensor:
    """``[3, bins] float64``: count, summed confidence and summed correctness per equal-width bin.

    ``confidence [N]`` float in [0, 1] (top-1 probability), ``correct [N]`` bool. Bin ``b`` holds
    confidences in ``(b / bins, (b + 1) / bins]`` (0 goes to the first).
    """
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    stats = torch.zeros(3, bins, dtype=torch.float64, device=confidence.device)
    stats[0].index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
    stats[1].index_add_(0, index, confidence.double())
    stats[2].index_add_(0, index, correct.double())
    return stats


def expected_calibration_error(stats: Tensor) -> float:
    """ECE ``sum_b (n_b / N) |acc_b - conf_b|`` from :func:`calibration_bins` (0 for no positions)."""
    count, confidence, correct = stats
    return float((correct - confidence).abs().sum() / count.sum().clamp_min(1))


def teacher_top_ids(batch: Batch) -> Tensor:
    """``[B, P] int64``: the stored id with the highest teacher log-probability at each position."""
    logprobs = batch["target_logprobs"].masked_fill(~batch["target_mask"], -math.inf)
    return batch["target_ids"].gather(-1, logprobs.argmax(-1, keepdim=True)).squeeze(-1)


def eval_share(batches: list[Batch], world: World) -> list[tuple[Batch, bool]]:
    """This process's eval batches ``rank, rank + size, ...``, each with whether it counts.

    Every process runs the same number of forward passes (FSDP gathers weights inside each): one
    short of a batch repeats the first and does not count it.
    """
    mine = batches[world.rank :: world.size]
    padding = -(-len(batches) // world.size) - len(mine)
    return [(batch, True) for batch in mine] + [(batches[0], False)] * padding


def head_stats(hidden_rows: Tensor, head: torch.nn.Linear, labels: Tensor, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(cross-entropy at labels, top-1 probability, top-1 id)``, each ``[R]``, of the logits
    ``head(hidden_rows [R, H])``, made ``chunk_rows`` rows at a time: the ``[R, V]`` logits never exist."""
    losses, confidences, predictions = [], [], []
    for start in range(0, hidden_rows.shape[0], chunk_rows):
        logits = head(hidden_rows[start : start + chunk_rows]).float()
        lse = logits.logsumexp(-1)
        top, prediction = logits.max(-1)
        gold = logits.gather(-1, labels[start : start + chunk_rows, None]).squeeze(-1)
        losses.append(lse - gold)
        confidences.append((top - lse).exp())
        predictions.append(prediction)
    if not losses:
        return (hidden_rows.new_zeros(0, dtype=torch.float32),) * 2 + (labels.new_zeros(0),)
    return torch.cat(losses), torch.cat(confidences), torch.cat(predictions)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Data, kd_loss: Callable | None, device: torch.device, autocast, world: World = World(),
    head: torch.nn.Linear | None = None,
) -> dict:
    """Mean LM loss on gold tokens, mean KD loss, ECE and top-1 agreement with the teacher.

    Over the counted positions of ``data.eval_batches``, split over the processes and summed;
    ``kd_loss`` None skips the KD loss; the agreement needs a teacher (a cache). With ``head``
    (the fused loss's) the logits are made in chunks of rows from the final hidden states, as in
    training, and ``kd_loss`` takes hidden states; else from the model's ``[B, T, V]`` logits.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # LM loss, KD loss, agreement, positions
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)
    for batch, counts in eval_share(data.eval_batches, world):
        batch = to_device(batch, device)
        with autocast:
            if head is not None:
                outputs = student_hidden(model, batch["input_ids"])[:, :-1]
            else:
                outputs = model(input_ids=batch["input_ids"]).logits[:, :-1]
        if not counts:
            continue
        keep = batch["position_mask"]
        if head is not None:
            chunk_rows = default_chunk_rows(head.weight.shape[0], head.weight.shape[1], device)
            with autocast:
                lm, confidence, prediction = head_stats(outputs[keep], head, batch["labels"][keep], chunk_rows)
            sums[0] += lm.double().sum()
        else:
            outputs = outputs.float()
            confidence, prediction = outputs[keep].softmax(-1).max(-1)
            sums[0] += ce_loss(outputs, batch).total.double()
        bins += calibration_bins(confidence, prediction == batch["labels"][keep])
        if kd_loss is not None:
            with autocast if head is not None else nullcontext():  # the fused loss's matmuls as in training
                sums[1] += kd_loss(outputs, batch).total.double()
        if data.manifest is not None:
            sums[2] += (prediction == teacher_top_ids(batch)[keep]).sum()
        sums[3] += keep.sum()
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward without backward
        model.reshard()
    model.train()
    lm, kd, agree, tokens = all_sum(sums, world).tolist()
    all_sum(bins, world)
    n = max(tokens, 1)
    metrics = {"lm_loss": lm / n, "ece": expected_calibration_error(bins)}
    if kd_loss is not None:
        metrics["kd_loss"] = kd / n
    if data.manifest is not None:
        metrics["top1_agreement"] = agree / n
    return {**metrics, "tokens": int(tokens)}


# ---- files: metrics, checkpoints, the student, the plot ----------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def restart_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (what a checkpoint has seen) and drop the ones after it."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def _fsync_folder(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fsync_path(path)


def replace_folder(final: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on an empty temporary folder, then swap it in for ``final``.

    A crash leaves either the previous ``final`` or ``final.old`` complete (see :func:`find_checkpoint`).
    """
    tmp, old = final.with_name(final.name + TMP_SUFFIX), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_folder(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(final.parent)


def find_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint folder under ``out``, if any (``checkpoint.old`` after a crash mid-swap)."""
    for name in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".old"):
        if (out / name / TRAINER_STATE).is_file():
            return out / name
    return None


def save_checkpoint(out: Path, model: torch.nn.Module, state: dict, weights: dict | None = None) -> None:
    """``OUT/checkpoint``: the model via ``save_pretrained``, ``trainer.pt`` and ``settings.json``.

    ``weights``: the full state dict of a sharded model (:func:`full_weights`); None saves ``model``'s own.
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=weights)
        torch.save(state, folder / TRAINER_STATE)
        (folder / "settings.json").write_text(json.dumps(state["settings"], indent=2) + "\n")

    replace_folder(out / CHECKPOINT_NAME, write)


def full_weights(student: torch.nn.Module, world: World, fsdp: bool) -> dict | None:
    """The whole state dict of an FSDP-sharded student on process 0 (every process must call this);
    None where the student is whole (one process, or DDP)."""
    if not fsdp or world.size == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World, fsdp: bool) -> dict:
    """The optimizer's state to save (every process must call this).

    Under ``fsdp`` the whole, unsharded state keyed by parameter names (on process 0), which loads
    on any number of processes; else ``optimizer.state_dict()``.
    """
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=world.size > 1)
    return get_optimizer_state_dict(student, optimizer, options=options)


def load_optimizer_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Restore what :func:`optimizer_state` saved; under ``fsdp`` every process keeps its own shard."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(settings: Mapping) -> dict:
    """Settings as a resume compares them: paths resolved, the loss's default temperature filled in."""
    paths = {f.name for f in fields(TrainSettings) if "Path" in str(f.type)}
    values = {k: str(Path(v).resolve()) if k in paths and v is not None else v for k, v in settings.items()}
    if values.get("temperature") is None and values.get("loss") in LOSSES:
        values["temperature"] = default_temperature(values["loss"])
    if values.get("warmup_steps") is None and isinstance(values.get("steps"), int):
        values["warmup_steps"] = default_warmup(values["steps"])
    return values


def _check_resumable(saved: Mapping, settings: TrainSettings) -> None:
    current, saved = _comparable(settings.to_json()), _comparable(saved)
    adopted = {"warmup_steps"} if settings.warmup_steps is None else set()  # not given: the checkpoint's (resumed)
    for key, value in saved.items():
        if key not in RESUMABLE_CHANGES and key not in adopted and current.get(key) != value:
            raise LogitcacheError(
                f"cannot resume: the checkpoint was trained with {key}={value!r} but this run has "
                f"{key}={current.get(key)!r}; pass the options of the interrupted run"
            )


def resumed(settings: TrainSettings, saved: Mapping) -> TrainSettings:
    """``settings`` with what a resume takes from the checkpoint's ``saved`` settings when not given:
    the warmup (a checkpoint from before its default became ``default_warmup`` keeps its 100)."""
    if settings.warmup_steps is not None:
        return settings
    return replace(settings, warmup_steps=_comparable(saved)["warmup_steps"])


def prepare_out(settings: TrainSettings, world: World = World()) -> tuple[Path | None, dict | None]:
    """Claim ``--out``: the checkpoint folder and trainer state to resume from, or ``(None, None)``.

    Refuses a folder holding a run unless ``--resume``; ``--resume`` without a checkpoint starts
    from step 0. Every process reads the checkpoint; process 0 cuts ``metrics.jsonl`` back to its step.
    Nothing is created here: the folder appears when training starts (see :func:`train_student`), so
    a run refused by a later check leaves no trace.
    """
    out = Path(settings.out)
    found = find_checkpoint(out)
    if found is not None and not settings.resume:
        raise LogitcacheError(f"--out {out} holds a training run ({found.name}/); pass --resume to continue it or choose another --out")
    if found is None and (out / STUDENT_NAME / "config.json").is_file():  # its checkpoint deleted to save space
        raise LogitcacheError(
            f"--out {out} holds a trained student ({STUDENT_NAME}/) and no checkpoint to resume it from; "
            f"choose another --out (or delete {out / STUDENT_NAME} to train there from scratch)"
        )
    state = None
    if settings.resume and found is not None:
        state = torch.load(found / TRAINER_STATE, map_location="cpu", weights_only=True)
        _check_resumable(state["settings"], settings)
        check_global_batch(settings, world, state)
    elif settings.resume and world.main:
        log.info("no checkpoint in %s: starting from step 0", out)
    if world.main and (out / METRICS_NAME).exists():
        restart_metrics(out / METRICS_NAME, 0 if state is None else state["step"])
    return found if state is not None else None, state


def save_student(out: Path, model: torch.nn.Module, tokenizer, weights: dict | None = None) -> Path:
    """``OUT/student``: the model (and the tokenizer when known), loadable with ``from_pretrained``.

    ``weights`` as for :func:`save_checkpoint`.
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    replace_folder(out / STUDENT_NAME, write)
    return out / STUDENT_NAME


def plot_losses(records: list[dict], path: Path, loss_name: str) -> None:
    """Train loss per step and eval losses per eval, as a PNG (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    train = [r for r in records if r["kind"] == "train"]
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=f"train ({loss_name})")
    evals = [r for r in records if r["kind"] == "eval"]
    for key in ("lm_loss", "kd_loss"):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axes.plot(*zip(*points), marker="o", label=f"eval {key.replace('_', ' ')}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def final_metrics(records: list[dict], student: Path) -> dict:
    """The last train record's step and loss and the last eval's metrics (``eval_*``)."""
    last_train = next((r for r in reversed(records) if r["kind"] == "train"), {})
    last_eval = next((r for r in reversed(records) if r["kind"] == "eval"), {})
    metrics = {"step": last_train.get("step", 0), "loss": last_train.get("loss")}
    metrics.update({f"eval_{k}": v for k, v in last_eval.items() if k not in ("kind", "step")})
    return {**metrics, "student": str(student)}


# ---- the loop ----------------------------------------------------------------------------


def run_train(settings: TrainSettings, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train (or with ``resume``, continue) a student; return the final metrics.

    ``on_step(record)`` is called with every record written to ``metrics.jsonl`` (on process 0).
    Under torchrun every process calls this; see the module docstring.
    """
    settings.check()
    with process_group(settings.device) as (world, device):
        return train_student(settings, world, device, on_step)


def train_student(settings: TrainSettings, world: World, device: torch.device, on_step: Callable[[dict], None] | None) -> dict:
    """The loop of :func:`run_train` for process ``world.rank`` on ``device``."""
    out = Path(settings.out)
    checkpoint_dir, checkpoint = prepare_out(settings, world)
    if checkpoint is not None:
        settings = resumed(settings, checkpoint["settings"])
    check_same_start(world, checkpoint)
    # The order depends on lanes, so a resume keeps the checkpoint's whatever the number of processes.
    lanes = settings.lanes or (checkpoint["data"]["lanes"] if checkpoint is not None else world.size)
    step_windows = settings.batch_size * settings.grad_accum * world.size
    open_data = open_cache if settings.cache is not None else open_corpus
    data = open_data(settings, step_windows, world, lanes)

    # The student: fresh from the seed (the same on every process), or the checkpoint's weights.
    torch.manual_seed(settings.seed)
    if checkpoint_dir is not None:
        student = load_student(checkpoint_dir)
    else:
        student = build_student(
            preset=settings.student, config_file=settings.student_config, init_from=settings.init_from,
            vocab_size=data.vocab_size, max_positions=max(1024, data.seq_len),
            eos_token_id=data.eos_token_id, pad_token_id=getattr(data.tokenizer, "pad_token_id", None),
        )
    check_student(student, data.manifest, data.tokenizer, data.seq_len)
    if settings.fsdp and world.size == 1:
        log.info("--fsdp on one process: nothing to shard, the student stays whole")
    model = distribute(student, world, device, settings.fsdp)
    optimizer = make_optimizer(student, settings, device)
    schedule = partial(lr_factor, warmup_steps=settings.warmup, steps=settings.steps, min_lr_ratio=settings.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step = 0
    if checkpoint is not None:
        load_optimizer_state(student, optimizer, checkpoint["optimizer"], settings.fsdp)
        scheduler.load_state_dict(checkpoint["scheduler"])
        data.train.load_state_dict(checkpoint["data"])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]

    head = None
    if settings.fused_loss and supports(settings.loss or "ce") and not settings.fsdp:
        head = output_head(student, (torch.arange(8, device=device) % data.vocab_size)[None])
        if head is None:
            log.info("this student's logits are not its head applied to its hidden states: plain loss")
    train_loss = make_loss(settings, data.manifest, settings.alpha, head)
    # The eval KD loss reads the eval cache's targets by that cache's own build (its proposal temperature).
    kd_loss = make_loss(settings, data.eval_manifest, 0.0, head, source="--eval-cache") if settings.loss not in (None, "ce") else None
    forward = torch.compile(model) if settings.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in float32
    batches = iter(data.train)

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as files:
        metrics_file = files.enter_context(open(out / METRICS_NAME, "a")) if world.main else None
        trace_dir = os.environ.get(DEBUG_SEQUENCES_ENV)
        trace = files.enter_context(open(Path(trace_dir) / f"rank-{world.rank}.jsonl", "a")) if trace_dir else None

        def record(entry: dict) -> None:
            if metrics_file is None:
                return
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()
            if on_step is not None:
                on_step(entry)

        while step < settings.steps:
            batch = next(batches)  # this process's batch_size * grad_accum windows of the global batch
            if trace is not None:
                trace.write(json.dumps({"step": step + 1, "sequence_ids": batch["sequence_id"].tolist()}) + "\n")
            # Losses are sums: divide every micro-batch by the positions of the whole global step
            # (all micro-batches of all processes), so that accumulation and processes give exactly
            # the gradient of one batch. DDP and FSDP average gradients over the processes:
            # multiplying by their number turns that average back into the sum.
            step_tokens = all_sum(batch["position_mask"].sum().to(device), world).clamp_min(1)
            step_loss = torch.zeros((), device=device)
            micros = split_batch(batch, settings.grad_accum)
            for i, micro in enumerate(micros):
                micro = to_device(micro, device)
                with gradient_sync(model, sync=i == len(micros) - 1):
                    with autocast:  # the fused loss runs the head's matmuls in autocast's dtype too
                        if head is not None:
                            loss = train_loss(student_hidden(forward, micro["input_ids"])[:, :-1], micro)
                        else:
                            loss = train_loss(forward(input_ids=micro["input_ids"]).logits[:, :-1], micro)
                    (loss.total * world.size / step_tokens).backward()
                step_loss += loss.total.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip or math.inf)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            step_loss = all_sum(step_loss, world)
            record({"kind": "train", "step": step, "loss": (step_loss / step_tokens).item(), "lr": lr,
                    "grad_norm": grad_norm.item(), "tokens": int(step_tokens)})
            if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
                record({"kind": "eval", "step": step, **evaluate(student, data, kd_loss, device, autocast, world, head)})
            if (settings.save_every and step % settings.save_every == 0) or step == settings.steps:
                state = {"step": step, "optimizer": optimizer_state(student, optimizer, world, settings.fsdp),
                         "scheduler": scheduler.state_dict(), "data": data.train.state_dict(), "rng": rng_state(),
                         "settings": settings.to_json(), "world_size": world.size}
                weights = full_weights(student, world, settings.fsdp)
                if world.main:
                    save_checkpoint(out, student, state, weights)
                barrier(world)

    weights = full_weights(student, world, settings.fsdp)
    if world.main:
        save_student(out, student, data.tokenizer, weights)
        plot_losses(read_metrics(out / METRICS_NAME), out / PLOT_NAME, settings.loss or "ce")
    barrier(world)
    return final_metrics(read_metrics(out / METRICS_NAME), out / STUDENT_NAME)
