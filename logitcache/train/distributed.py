"""Several training processes: the process group, the student wrapped for it, and sums over processes.

Under ``torchrun --nproc-per-node N -m logitcache train ...`` every process joins the process group
torchrun describes (gloo on CPU, nccl on ``cuda:LOCAL_RANK``) and trains the student wrapped in DDP,
or with ``--fsdp`` sharded by FSDP2 (``fully_shard`` per decoder layer, then the whole model). DDP
and FSDP *average* gradients over processes; the loop scales the loss by the number of processes to
undo that, so the gradient is the sum over the global batch divided by its counted positions, as on
one process. Only the last micro-batch of a step synchronises gradients (:func:`gradient_sync`).
Process 0 alone writes files (:attr:`World.main`); the others only train. On one process nothing
here communicates: the student is not wrapped and :func:`all_sum` and :func:`barrier` do nothing.
Before training, :func:`check_same_start` and :func:`check_global_batch` refuse processes that found
different checkpoints and a resume whose steps would take another number of windows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from logitcache.device import resolve_device
from logitcache.errors import LogitcacheError
from logitcache.train.settings import TrainSettings

log = logging.getLogger(__name__)


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
    """Wait for every process (after process 0 writes a checkpoint or the student)."""
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
        if fsdp:
            log.info("--fsdp on one process: nothing to shard, the student stays whole")
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
