"""``logitcache generate``: a model's responses to prompts, written as a corpus that ``build`` reads back.

Prompts are chat records whose messages end with the user's turn, or prompt records (see
:mod:`logitcache.chat`); a record that ends with an assistant turn (a reference answer) is prompted
with the messages before it. Prompts are rendered as the model's generation prompt and decoded by
:mod:`.decode`, greedily (``--temperature 0``) or sampled, deterministically for a ``--seed``.

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

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from logitcache.chat import Message, RecordFields, read_conversations, split_reference
from logitcache.corpus import Corpus
from logitcache.errors import LogitcacheError
from logitcache.files import write_json_atomic
from logitcache.generate.decode import Response, generate_responses, load_generator
from logitcache.generate.settings import GenerateSettings, settings_path
from logitcache.teacher.folder import weights_fingerprint




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
    record = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in kept.items()}
    return {**record, "model_fingerprint": weights_fingerprint(settings.model)}  # which checkpoint answered


def _check_resumable(settings: GenerateSettings, record: dict) -> None:
    """Refuse an ``--out`` that another generation (other settings ``record``), or something else, wrote."""
    saved_path = settings_path(settings.out)
    if settings.out.exists() and not saved_path.exists():
        raise LogitcacheError(f"--out {settings.out} exists and was not written by `logitcache generate`; choose another file")
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        differ = [k for k, v in record.items() if saved.get(k) != v]
        if differ:
            raise LogitcacheError(
                f"--out {settings.out} was generated with other settings ({', '.join(differ)}); "
                "rerun with those, or choose another file"
            )


def run_generate(settings: GenerateSettings, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate the responses into ``settings.out``, continuing a previous run; returns counts.

    ``on_progress(done, total)`` is called once before the first batch and after each.
    """
    settings.check()
    prompts = read_prompts(settings.prompts, settings.fields)
    settings_record = _settings_record(settings)  # hashes the model's weights: once a run
    _check_resumable(settings, settings_record)
    model, renderer = load_generator(settings.model, settings.fields, settings.chat_template, settings.device, settings.dtype)
    start = resume_point(settings.out)
    todo = [(index, where, messages) for index, where, messages, _ in prompts if index >= start]
    batches = generate_responses(model, renderer, todo, settings.sampling, settings.batch_size)  # checks every prompt
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path(settings.out), settings_record)
    counts = {"prompts": len(prompts), "resumed_at": start, "written": 0, "empty": 0, "unfinished": 0}
    progress = on_progress or (lambda done, total: None)
    progress(len(prompts) - len(todo), len(prompts))
    messages = {index: prompt for index, _, prompt in todo}
    with open(settings.out, "a", encoding="utf-8") as out:
        for batch in batches:
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
