"""Batched decoding: prompts' token ids → responses, greedy or sampled, with their log-probabilities.

Prompts are left-padded into one batch and decoded with a KV cache. Sampling draws from
``softmax(logits / temperature)`` cut to its top-p nucleus and renormalised, by inverse CDF with the
uniform of ``(seed, prompt index, token position)`` (:mod:`logitcache.targets.rng`), so a response does
not depend on the batch size or on where a resumed run starts (up to the float differences of
differently padded batches). A response ends with the first stop token (:func:`stop_ids`) or after
``max_new_tokens``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from logitcache.chat import ChatRenderer, Message, RecordFields
from logitcache.errors import LogitcacheError
from logitcache.generate.settings import Sampling
from logitcache.targets.rng import row_keys, uniforms
from logitcache.teacher.folder import context_length


@dataclass(frozen=True)
class Response:
    """One prompt's response: ``ids [m] int64`` (the stop token included when generated), ``logprobs [m]
    float32`` under the sampling distribution, the text without the stop token, and whether one ended it."""

    index: int
    ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finished: bool


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *ids] if i is not None})


def pick_tokens(logits: torch.Tensor, sampling: Sampling, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens for a batch of rows and their log-probabilities under the sampling distribution.

    ``logits [B, V]``, ``keys [B] int64`` (one counter-based key per row and step) → ``ids [B] int64``,
    ``logprobs [B] float32``. Inverse-CDF sampling over the nucleus sorted by probability.
    """
    if sampling.temperature == 0:
        return logits.argmax(-1), torch.zeros(len(logits), dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
    nucleus = torch.where(before < sampling.top_p, sorted_probs, torch.zeros_like(sorted_probs))
    cumulative = nucleus.cumsum(-1)
    mass = cumulative[:, -1:]
    u = uniforms(keys, 1).to(logits.device) * mass
    last = (nucleus > 0).sum(-1, keepdim=True) - 1  # the nucleus leads the sorted order; rounding may not leave it
    slot = torch.minimum(torch.searchsorted(cumulative, u, right=True), last)
    chosen = nucleus.gather(-1, slot) / mass
    return order.gather(-1, slot).squeeze(-1), chosen.squeeze(-1).log().float()


def _left_padded(prompts: Sequence[np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, L] int64`` and ``attention_mask [B, L] int64`` with the prompts aligned on the right."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), length), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.from_numpy(prompt)
        mask[row, length - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _forward_options(model) -> dict:
    """A fresh KV cache under the name the forward pass takes (``cache`` in recent transformers,
    ``past_key_values`` before), and logits of the last position only where it can say so."""
    accepted = inspect.signature(model.forward).parameters
    options = {"cache" if "cache" in accepted else "past_key_values": DynamicCache(config=model.config)}
    if "logits_to_keep" in accepted:
        options["logits_to_keep"] = 1
    return options


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: Sequence[np.ndarray], indices: Sequence[int], sampling: Sampling
) -> list[Response]:
    """Responses to ``prompts`` (``[n_i] int64`` token ids each) whose corpus positions are ``indices``."""
    device = next(model.parameters()).device
    stops = torch.tensor(stop_ids(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    ids, mask = _left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    sequence_ids = torch.tensor(list(indices), dtype=torch.int64)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    picked, logprobs = [], []
    options = _forward_options(model)  # the cache in it is filled in place by each forward pass
    for step in range(sampling.max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **options)
        keys = row_keys(sampling.seed, sequence_ids, torch.full_like(sequence_ids, step))
        token, logprob = pick_tokens(out.logits[:, -1].float(), sampling, keys)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        picked.append(token)
        logprobs.append(logprob)
        done |= torch.isin(token, stops)
        if done.all():
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return _responses(tokenizer, torch.stack(picked, 1).cpu(), torch.stack(logprobs, 1).cpu(), stops.cpu(), indices)


def _responses(tokenizer, picked: torch.Tensor, logprobs: torch.Tensor, stops: torch.Tensor, indices: Sequence[int]) -> list[Response]:
    """Each row of ``picked [B, S]`` cut after its first stop token."""
    responses = []
    for row, index in enumerate(indices):
        stopped = torch.isin(picked[row], stops).nonzero()
        length = int(stopped[0]) + 1 if len(stopped) else picked.shape[1]
        ids = picked[row, :length].numpy()
        text = tokenizer.decode(ids[: length - 1] if len(stopped) else ids, skip_special_tokens=True)
        responses.append(Response(index, ids, logprobs[row, :length].numpy(), text, bool(len(stopped))))
    return responses


def generate_responses(
    model, renderer: ChatRenderer, prompts: Sequence[tuple[int, str, list[Message]]], sampling: Sampling, batch_size: int
) -> Iterator[list[Response]]:
    """Responses to ``(index, place, messages)`` prompts, in their order, one list per ``batch_size`` prompts.

    Every prompt is rendered and checked against the model's context here, before the first batch.
    """
    ids = [renderer.prompt_ids(messages, where) for _, where, messages in prompts]
    context = context_length(model.config)
    for (_, where, _), prompt in zip(prompts, ids):
        if context is not None and len(prompt) + sampling.max_new_tokens > context:
            raise LogitcacheError(
                f"{where}: the prompt is {len(prompt)} tokens; with --max-new-tokens {sampling.max_new_tokens} "
                f"that passes the model's context of {context} tokens"
            )
    indices = [index for index, _, _ in prompts]
    return (
        generate_batch(model, renderer.tokenizer, ids[start : start + batch_size], indices[start : start + batch_size], sampling)
        for start in range(0, len(prompts), batch_size)
    )


def load_generator(
    model: Path, fields: RecordFields, chat_template: Path | None, device: str | None, dtype: str | None
) -> tuple[torch.nn.Module, ChatRenderer]:
    """A model folder's causal LM (in eval mode, on ``device``) and the renderer of its prompts."""
    from logitcache.teacher.hf import HFTeacher

    loaded = HFTeacher(model, device, dtype)
    return loaded.model, ChatRenderer(loaded.tokenizer, fields, chat_template)


