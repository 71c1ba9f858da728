"""The loss a run trains with: a loss of :mod:`logitcache.losses` bound to its options and to the cache it reads.

A loss takes the student's outputs for the positions that have a next token (:func:`student_outputs`)
and a collated batch (docs/CONTRACTS.md) and returns a :class:`~logitcache.losses.sparse.LossOutput`:
a SUM over the counted positions and their number; the loop divides by the positions of the whole
global step. Plain, it takes logits ``[B, T-1, V]``; fused with the output head (``--fused-loss``,
:mod:`logitcache.losses.fused`) it takes final hidden states ``[B, T-1, H]`` and makes the logits by
chunks of rows, so the ``[B, T-1, V]`` logits never exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor

from logitcache.losses.fused import fused_loss, packed_inputs, student_hidden
from logitcache.losses.sparse import LossOutput, get_loss
from logitcache.train.settings import TrainSettings, options_from_cache


def make_loss(
    settings: TrainSettings, manifest: Mapping | None, alpha: float, head: torch.nn.Linear | None = None, source: str = "--cache"
) -> Callable[[Tensor, Mapping[str, Tensor]], LossOutput]:
    """The named loss bound to its options; ``rs-kd`` gets the proposal temperature the cache was sampled at.

    With ``head`` the loss is fused with the output head (chunked, never holding ``[B, T, V]`` logits)
    and takes final hidden states ``[B, P, H]`` instead of logits. ``source`` names the option
    ``manifest`` came from (``--cache`` or ``--eval-cache``), for the error messages.
    """
    name = settings.loss or "ce"
    options = options_from_cache(name, manifest, settings.cache_option(source))
    if settings.temperature is not None:
        options["temperature"] = settings.temperature  # else each loss's own default (BiLD: 3)
    options.update(settings.loss_options())
    if head is not None:
        return lambda hidden, batch: fused_loss(name, hidden, head.weight, batch, head_bias=head.bias, alpha=alpha, **options)
    return partial(get_loss(name), alpha=alpha, **options)


def student_outputs(model: torch.nn.Module, batch: dict[str, Tensor], fused: bool) -> Tensor:
    """What a loss takes from the student for ``batch["input_ids"] [B, T] int64`` (with its
    ``position_ids`` where rows are packed), at the ``T - 1`` positions that have a next token: final
    hidden states ``[B, T-1, H]`` for a ``fused`` loss, else logits ``[B, T-1, V]``."""
    position_ids = batch.get("position_ids")
    if fused:
        return student_hidden(model, batch["input_ids"], position_ids)[:, :-1]
    return model(input_ids=batch["input_ids"], **packed_inputs(position_ids)).logits[:, :-1]
