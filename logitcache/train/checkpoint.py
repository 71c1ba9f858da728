"""Checkpoints: claiming ``--out``, saving ``checkpoint/`` and the final ``student/``, resuming exactly.

``OUT/checkpoint`` holds the model (``save_pretrained``), ``trainer.pt`` (optimizer, scheduler, data
position, step, RNG state, settings; :func:`trainer_state`) and ``settings.json``; it and
``OUT/student`` are replaced atomically (:func:`logitcache.files.replace_folder`: a crash mid-swap
leaves ``checkpoint.old``, which :func:`find_checkpoint` still finds). Under FSDP the weights and
optimizer state are gathered whole on process 0, so a checkpoint always holds the whole model and
loads on any number of processes.

Resume: the data order is a function of (seed, epoch, ``lanes``), so the data position is two
numbers; the model, optimizer, scheduler and RNG state are restored exactly
(:func:`restore_trainer`). On CPU a resumed run logs the same loss at every step, bit for bit, as an
uninterrupted one. ``lanes`` defaults to the number of processes of the first run and is kept by
every resume, so a checkpoint resumes exactly on any number of processes that divides its global
batch (with ``--batch-size`` and ``--grad-accum`` set to keep the global batch:
:func:`~logitcache.train.distributed.check_global_batch`). Only the settings in
:data:`RESUMABLE_CHANGES` may differ from the checkpoint's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path

import torch

from logitcache.errors import LogitcacheError
from logitcache.files import replace_folder
from logitcache.losses.sparse import LOSSES, default_temperature
from logitcache.train.data import CacheStream, CorpusStream
from logitcache.train.distributed import World, check_global_batch
from logitcache.train.metrics import METRICS_NAME, restart_metrics
from logitcache.train.settings import TrainSettings, default_warmup

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint"
STUDENT_NAME = "student"
TRAINER_STATE = "trainer.pt"

# Settings a resumed run may change: none of them alters what the steps compute. batch_size and
# grad_accum may change as long as the global batch does not (checked: see check_global_batch).
RESUMABLE_CHANGES = ("out", "resume", "device", "compile", "save_every", "batch_size", "grad_accum", "lanes")


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


def trainer_state(
    step: int, student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    stream: CorpusStream | CacheStream, settings: TrainSettings, world: World,
) -> dict:
    """What ``trainer.pt`` holds after ``step`` optimizer steps (every process must call this: see
    :func:`optimizer_state`)."""
    return {"step": step, "optimizer": optimizer_state(student, optimizer, world, settings.fsdp),
            "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng_state(),
            "settings": settings.to_json(), "world_size": world.size}


def restore_trainer(
    state: Mapping, student: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    stream: CorpusStream | CacheStream, fsdp: bool,
) -> int:
    """Put back what :func:`trainer_state` saved (the RNG state last); return its step."""
    load_optimizer_state(student, optimizer, state["optimizer"], fsdp)
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return state["step"]


def rng_state() -> dict:
    """torch's RNG state on CPU, and on every CUDA device when there are any."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` saved (the CUDA states only where this machine has CUDA)."""
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
    Nothing is created here: the folder appears when training starts (:func:`logitcache.train.loop.train_student`), so
    a run refused by a later check leaves no trace.
    """
    out = Path(settings.out)
    found = find_checkpoint(out)
    if found is not None and not settings.resume:
        raise LogitcacheError(
            f"--out {out} holds a training run ({found.name}/); pass --resume to continue it or choose another --out"
        )
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
