"""Evaluation: mean LM loss on gold tokens, mean KD loss, ECE and top-1 agreement with the teacher.

Every ``--eval-every`` steps, over the counted positions of the eval batches (:class:`~.data.Data`).
Eval batches are split over the processes (:func:`eval_share`: every process runs the same number of
forward passes, as FSDP needs) and the sums all-reduced, so every process gets the metrics of all
of them. With the fused loss's head the logits are made by chunks of rows from the final hidden
states (:func:`head_stats`), as in training: ``[B, T, V]`` logits never exist. ECE is top-1, over
:data:`ECE_BINS` equal-width bins of confidence; the agreement compares the student's top-1 with the
teacher's most probable stored id (:func:`teacher_top_ids`), so it needs a cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from logitcache.losses.fused import default_chunk_rows
from logitcache.losses.sparse import ce_loss
from logitcache.train.data import Batch, Data, to_device
from logitcache.train.distributed import World, all_sum
from logitcache.train.objective import student_outputs

ECE_BINS = 15


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
    """``[B, P] int64``: the stored id with the highest teacher log-probability at each position (a sample
    cache without log-probabilities: the most drawn id)."""
    logprobs = batch["target_logprobs"]
    logprobs = torch.where(logprobs.isnan(), batch["target_weights"].log(), logprobs).masked_fill(~batch["target_mask"], -math.inf)
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
            outputs = student_outputs(model, batch, fused=head is not None)
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
