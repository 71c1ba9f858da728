"""Optimisation: AdamW (weight decay on matrices only) and its LR schedule, linear warmup then cosine decay.

The schedule is a pure function of the optimizer step (:func:`lr_factor`), so the scheduler's state
is a step count and a resumed run follows the same LRs.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from logitcache.train.settings import TrainSettings


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


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR of every optimizer step: ``--lr`` times :func:`lr_factor` (warmup ``settings.warmup``)."""
    schedule = partial(lr_factor, warmup_steps=settings.warmup, steps=settings.steps, min_lr_ratio=settings.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
