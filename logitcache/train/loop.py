"""The training loop: :func:`run_train` sets a run up from its settings, then trains it step by step.

A step takes this process's part of the global batch, cut into ``grad_accum`` micro-batches. Losses
are sums: each micro-batch's is divided by the counted positions of the WHOLE global step (all
micro-batches of all processes) and multiplied by the number of processes (DDP and FSDP average
gradients), so accumulation and processes give exactly the gradient of one large batch. Then the
gradient is clipped, AdamW steps and the LR follows its schedule. Every ``--eval-every`` steps an
eval, every ``--save-every`` steps and at the end a checkpoint; at the end the student and the plot.

The results depend on the order of the set-up: torch is seeded just before the student is built
(the same initial weights on every process), and a resume restores the saved RNG state after that,
so that a resumed run computes what an uninterrupted one does, bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from logitcache.errors import LogitcacheError
from logitcache.loader.collate import pack_batch
from logitcache.losses.fused import linear_head, supports
from logitcache.train.checkpoint import (
    STUDENT_NAME,
    full_weights,
    prepare_out,
    restore_trainer,
    resumed,
    save_checkpoint,
    save_student,
    trainer_state,
)
from logitcache.train.data import Batch, Data, open_data, split_batch, to_device
from logitcache.train.distributed import World, all_sum, barrier, check_same_start, distribute, gradient_sync, process_group
from logitcache.train.evaluate import evaluate
from logitcache.train.metrics import METRICS_NAME, PLOT_NAME, final_metrics, metrics_log, plot_losses, read_metrics
from logitcache.train.objective import make_loss, student_outputs
from logitcache.train.optim import make_optimizer, make_scheduler
from logitcache.train.settings import TrainSettings
from logitcache.train.student import build_student, check_student, load_student

log = logging.getLogger(__name__)

# A folder: each process appends the sequence ids of every step it trains on to rank-R.jsonl there.
DEBUG_SEQUENCES_ENV = "LOGITCACHE_DEBUG_SEQUENCES"


def run_train(settings: TrainSettings, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train (or with ``resume``, continue) a student; return the final metrics.

    ``on_step(record)`` is called with every record written to ``metrics.jsonl`` (on process 0).
    Under torchrun every process calls this; see :mod:`logitcache.train`.
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
    data = open_data(settings, world, checkpoint)
    student = make_student(settings, data, checkpoint_dir)
    model = distribute(student, world, device, settings.fsdp)
    optimizer = make_optimizer(student, settings, device)
    scheduler = make_scheduler(optimizer, settings)
    step = 0
    if checkpoint is not None:
        step = restore_trainer(checkpoint, student, optimizer, scheduler, data.train, settings.fsdp)
    head = fused_head(settings, student, data.vocab_size, device)
    train_loss, kd_loss = make_losses(settings, data, head)
    tasks = task_prompts(settings, data, world)
    forward = torch.compile(model) if settings.compile else model
    autocast = mixed_precision(device)
    batches = iter(data.train)

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    with metrics_log(out / METRICS_NAME if world.main else None, on_step) as record, sequence_trace(world) as trace:
        while step < settings.steps:
            batch = next(batches)  # this process's batch_size * grad_accum windows of the global batch
            trace(step + 1, batch)
            # Losses are sums: divide every micro-batch by the positions of the whole global step
            # (all micro-batches of all processes), so that accumulation and processes give exactly
            # the gradient of one batch. DDP and FSDP average gradients over the processes:
            # multiplying by their number turns that average back into the sum.
            step_tokens = all_sum(batch["position_mask"].sum().to(device), world).clamp_min(1)
            step_loss = torch.zeros((), device=device)
            micros = split_batch(batch, settings.grad_accum)
            for i, micro in enumerate(micros):
                micro = to_device(pack_batch(micro) if settings.pack and "token_counts" in micro else micro, device)
                with gradient_sync(model, sync=i == len(micros) - 1):
                    with autocast:  # the fused loss runs the head's matmuls in autocast's dtype too
                        loss = train_loss(student_outputs(forward, micro, fused=head is not None), micro)
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
                scores = evaluate(student, data, kd_loss, device, autocast, world, head)
                if tasks is not None:
                    scores.update(task_scores(student, tasks, settings))
                record({"kind": "eval", "step": step, **scores})
            if (settings.save_every and step % settings.save_every == 0) or step == settings.steps:
                state = trainer_state(step, student, optimizer, scheduler, data.train, settings, world)
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


# ---- set-up, in the order train_student calls it ----


def task_prompts(settings: TrainSettings, data, world: World):
    """``--eval-prompts``: the renderer of the student's prompts and the prompts with their references (or None)."""
    if settings.eval_prompts is None:
        return None
    from logitcache.chat import ChatRenderer
    from logitcache.generate.tasks import read_references

    if world.size > 1:
        raise LogitcacheError("--eval-prompts runs in one process; score a multi-process run's student with `logitcache evaluate`")
    if data.tokenizer is None:
        raise LogitcacheError("--eval-prompts needs the student's tokenizer: pass --tokenizer DIR (the cache's teacher folder is gone)")
    fields = settings.record_fields if settings.format != "text" else replace(settings.record_fields, format="chat")
    renderer = ChatRenderer(data.tokenizer, fields, settings.chat_template)
    return renderer, read_references(settings.eval_prompts, fields)


def task_scores(student: torch.nn.Module, tasks, settings: TrainSettings) -> dict[str, float]:
    """The student's greedy answers to the ``--eval-prompts``, scored: ``task_exact_match``, ``task_rouge_l``."""
    from logitcache.generate.tasks import evaluate_tasks

    renderer, prompts = tasks
    was_training = student.training
    student.eval()
    try:
        scores = evaluate_tasks(student, renderer, prompts, settings.eval_max_new_tokens, settings.batch_size)
    finally:
        student.train(was_training)
    return {f"task_{name}": value for name, value in scores.items() if name != "prompts"}


def make_student(settings: TrainSettings, data: Data, checkpoint_dir: Path | None) -> torch.nn.Module:
    """The student, checked against the data: the checkpoint's weights, or fresh from ``--seed``.

    Seeds torch first, so a fresh student is the same on every process and in every run.
    """
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
    return student


def fused_head(
    settings: TrainSettings, student: torch.nn.Module, vocab_size: int, device: torch.device
) -> torch.nn.Linear | None:
    """The output head the loss is fused with, or None for the plain loss on ``[B, T, V]`` logits.

    None without ``--fused-loss``, under ``--fsdp``, for a loss with no fused form, and for a student
    whose logits are not its head applied to its final hidden states (checked on a few token ids).
    """
    if not (settings.fused_loss and supports(settings.loss or "ce") and not settings.fsdp):
        return None
    head = linear_head(student, (torch.arange(8, device=device) % vocab_size)[None])
    if head is None:
        log.info("this student's logits are not its head applied to its hidden states: plain loss")
    return head


def make_losses(settings: TrainSettings, data: Data, head: torch.nn.Linear | None) -> tuple[Callable, Callable | None]:
    """The training loss and the KD loss eval reports (None when training with ``ce``: eval's LM loss is that)."""
    train_loss = make_loss(settings, data.manifest, settings.alpha, head)
    if settings.loss in (None, "ce"):
        return train_loss, None
    # The eval KD loss reads the eval cache's targets by that cache's own build (its proposal temperature).
    return train_loss, make_loss(settings, data.eval_manifest, 0.0, head, source="--eval-cache")


def mixed_precision(device: torch.device) -> AbstractContextManager:
    """The context the forward passes run in: bf16 autocast on CUDA (TF32 for the matmuls it leaves
    in float32), nothing on CPU."""
    if device.type != "cuda":
        return nullcontext()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.set_float32_matmul_precision("high")
    return autocast


@contextmanager
def sequence_trace(world: World) -> Iterator[Callable[[int, Batch], None]]:
    """``trace(step, batch)``: where ``$LOGITCACHE_DEBUG_SEQUENCES`` names a folder, append the step's
    sequence ids to ``rank-R.jsonl`` there (a debugging aid: which windows each process trains on)."""
    folder = os.environ.get(DEBUG_SEQUENCES_ENV)
    if not folder:
        yield lambda step, batch: None
        return
    with open(Path(folder) / f"rank-{world.rank}.jsonl", "a") as file:
        yield lambda step, batch: file.write(json.dumps({"step": step, "sequence_ids": batch["sequence_id"].tolist()}) + "\n")
