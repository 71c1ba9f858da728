"""``logitcache generate``: a model's responses to prompts, written as a corpus that ``build`` reads back.

Prompts are chat records whose messages end with the user's turn, or prompt records (see
:mod:`logitcache.chat`); a record that ends with an assistant turn (a reference answer) is prompted
with the messages before it. Prompts are rendered as the model's generation prompt, batched with left
padding and decoded with a KV cache, greedily (``temperature == 0``) or by sampling from
``softmax(logits / temperature)`` cut to its top-p nucleus and renormalised.

Sampling is deterministic: the uniform that picks token ``j`` of prompt ``i`` is a function of
``(seed, i, j)`` only (:mod:`logitcache.targets.rng`), so the responses do not depend on the batch
size or on where a resumed run starts (up to the float differences of differently padded batches).

Output: JSON Lines, one record per prompt in the prompts' order, each written whole and fsynced, so a
crash leaves at most a partial last line, which a rerun removes before it continues after the last
complete record. Records carry the input's fields for the response (chat: ``messages`` with the
assistant's turn appended; prompt-response: ``prompt`` and ``response``) and:

- ``index``: the prompt's position in the prompts corpus;
- ``response_ids``: the generated token ids, the stop token included when one was generated;
- ``response_logprobs``: the log-probability of each of those tokens under the distribution it was
  drawn from (after temperature and top-p; 0.0 for greedy decoding), the proposal probabilities that
  importance weighting of these samples needs;
- ``finished``: whether a stop token ended the response (else ``max_new_tokens`` did).

An empty response (the stop token first) has no text to train on and is left out, counted as ``empty``.
The settings are kept beside the output (:func:`settings_path`); a rerun with other settings is refused.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from logitcache.chat import ChatRenderer, Message, RecordFields, read_conversations, split_reference
from logitcache.corpus import Corpus
from logitcache.errors import LogitcacheError
from logitcache.files import write_json_atomic
from logitcache.targets.rng import row_keys, uniforms


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy when ``temperature == 0``, else sampled from the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def check(self) -> None:
        if self.temperature < 0:
            raise LogitcacheError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise LogitcacheError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise LogitcacheError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")


@dataclass(frozen=True)
class GenerateSettings:
    """``logitcache generate``'s options, one field per option."""

    model: Path
    prompts: Path
    out: Path
    format: str = "chat"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    chat_template: Path | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None

    @property
    def fields(self) -> RecordFields:
        return RecordFields(self.format, self.messages_field, self.prompt_field, self.response_field)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, self.seed)


@dataclass(frozen=True)
class Response:
    """One prompt's response: ``ids [m] int64`` (the stop token included when generated), ``logprobs [m]
    float32`` under the sampling distribution, the text without the stop token, and whether one ended it."""

    index: int
    ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finished: bool


def settings_path(out: Path) -> Path:
    """Where the settings of the generation that writes ``out`` are kept."""
    return out.with_name(out.name + ".settings.json")


# ---- the decoding loop ------------------------------------------------------------------------


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


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    cache = {_cache_argument(model): DynamicCache(config=model.config)}  # filled in place by each forward pass
    for step in range(sampling.max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
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
    """Responses to ``(index, place, messages)`` prompts, in their order, one list per ``batch_size`` prompts."""
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids = [renderer.prompt_ids(messages, where) for _, where, messages in batch]
        yield generate_batch(model, renderer.tokenizer, ids, [index for index, _, _ in batch], sampling)


# ---- the command ------------------------------------------------------------------------------


def read_prompts(corpus: Path, fields: RecordFields) -> list[tuple[int, str, list[Message], str | None]]:
    """Every record of ``corpus`` as ``(index, place, prompt messages, reference answer or None)``, checked."""
    prompts = []
    for index, (where, messages) in enumerate(read_conversations(Corpus.open(corpus), fields)):
        prompt, reference = split_reference(messages, where)
        prompts.append((index, where, prompt, reference))
    if not prompts:
        raise LogitcacheError(f"--prompts {corpus}: no records")
    return prompts


def output_record(prompt: list[Message], response: Response, fields: RecordFields) -> dict:
    """The JSON record for one response, in the prompts' own format (module docstring)."""
    if fields.format == "chat":
        text = {fields.messages_field: [*prompt, {"role": "assistant", "content": response.text}]}
    else:
        text = {fields.prompt_field: prompt[0]["content"], fields.response_field: response.text}
    return {"index": response.index, **text, "response_ids": response.ids.tolist(),
            "response_logprobs": [round(float(x), 6) for x in response.logprobs], "finished": response.finished}


def resume_point(out: Path) -> int:
    """The index after the last complete record in ``out`` (0 when there is none); a partial last line is cut off."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(out, "r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    lines = complete.splitlines()
    return json.loads(lines[-1])["index"] + 1 if lines else 0


def _settings_record(settings: GenerateSettings) -> dict:
    """The settings that decide the output (not the batch size or device), as JSON."""
    kept = {k: v for k, v in asdict(settings).items() if k not in ("out", "batch_size", "device")}
    return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in kept.items()}


def _check_resumable(settings: GenerateSettings) -> None:
    """Refuse an ``--out`` that another generation, or something else, wrote."""
    saved_path = settings_path(settings.out)
    if settings.out.exists() and not saved_path.exists():
        raise LogitcacheError(f"--out {settings.out} exists and was not written by `logitcache generate`; choose another file")
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        differ = [k for k, v in _settings_record(settings).items() if saved.get(k) != v]
        if differ:
            raise LogitcacheError(
                f"--out {settings.out} was generated with other settings ({', '.join(differ)}); "
                "rerun with those, or choose another file"
            )


def run_generate(settings: GenerateSettings, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate the responses into ``settings.out``, continuing a previous run; returns counts.

    ``on_progress(done, total)`` is called once before the first batch and after each.
    """
    from logitcache.teacher.hf import HFTeacher

    settings.sampling.check()
    if settings.batch_size < 1:
        raise LogitcacheError(f"--batch-size {settings.batch_size}: must be at least 1")
    prompts = read_prompts(settings.prompts, settings.fields)
    _check_resumable(settings)
    loaded = HFTeacher(settings.model, settings.device, settings.dtype)
    renderer = ChatRenderer(loaded.tokenizer, settings.fields, settings.chat_template)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path(settings.out), _settings_record(settings))
    start = resume_point(settings.out)
    todo = [(index, where, messages) for index, where, messages, _ in prompts if index >= start]
    counts = {"prompts": len(prompts), "resumed_at": start, "written": 0, "empty": 0, "unfinished": 0}
    progress = on_progress or (lambda done, total: None)
    progress(len(prompts) - len(todo), len(prompts))
    messages = {index: prompt for index, _, prompt in todo}
    with open(settings.out, "a", encoding="utf-8") as out:
        for batch in generate_responses(loaded.model, renderer, todo, settings.sampling, settings.batch_size):
            for response in batch:
                if not response.text.strip():
                    counts["empty"] += 1
                    continue
                counts["written"] += 1
                counts["unfinished"] += not response.finished
                record = output_record(messages[response.index], response, settings.fields)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())  # whole records only, in order: what a rerun continues after
            progress(batch[-1].index + 1, len(prompts))
    return counts
