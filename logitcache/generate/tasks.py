"""Task evaluation: a model's greedy answers to held-out prompts, scored against reference answers.

Prompts with references are chat records that end with the assistant's reference answer, or
prompt-response records (:mod:`logitcache.chat`); answers are generated greedily by
:mod:`.decode`. Scores, means over the prompts:

- ``exact_match``: the answer equals the reference after :func:`normalise` (surrounding whitespace
  removed, inner runs of whitespace made one space; case and punctuation are kept, as a task may be
  about them);
- ``rouge_l``: ROUGE-L F1 from the ``rouge-score`` package, with its own tokenisation (lower-cased
  runs of letters and digits) and no stemming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from logitcache.chat import ChatRenderer, Message, RecordFields
from logitcache.errors import LogitcacheError
from logitcache.generate.decode import generate_responses, load_generator
from logitcache.generate.run import read_prompts
from logitcache.generate.settings import EvaluateSettings, Sampling

def normalise(text: str) -> str:
    """``text`` as exact match compares it: surrounding whitespace removed, inner runs of whitespace one space."""
    return " ".join(text.split())


def score_answers(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ``exact_match`` and ``rouge_l`` (F1) of ``answers`` against ``references`` (module docstring)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    exact = [normalise(a) == normalise(r) for a, r in zip(answers, references, strict=True)]
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]
    return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge)}


def evaluate_tasks(
    model: torch.nn.Module, renderer: ChatRenderer, prompts: Sequence[tuple[int, str, list[Message], str]],
    max_new_tokens: int, batch_size: int, on_answers: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Greedy answers of ``model`` to ``(index, place, prompt messages, reference)`` prompts, scored.

    ``on_answers(n)`` is called after each batch with the number of prompts answered so far.
    """
    answers = []
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
    for batch in generate_responses(model, renderer, [p[:3] for p in prompts], sampling, batch_size):
        answers.extend(response.text for response in batch)
        if on_answers is not None:
            on_answers(len(answers))
    return {"prompts": len(prompts), **score_answers(answers, [p[3] for p in prompts])}


def read_references(corpus: Path, fields: RecordFields) -> list[tuple[int, str, list[Message], str]]:
    """The prompts of ``corpus`` with their reference answers; a record without one is refused."""
    prompts = read_prompts(corpus, fields)
    for _, where, _, reference in prompts:
        if reference is None:
            raise LogitcacheError(f"{where}: no reference answer (a final assistant turn, or a response) to score against")
    return prompts


def run_evaluate(settings: EvaluateSettings, on_progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Score a model folder's greedy answers to ``settings.prompts``; ``on_progress(done, total)`` after each batch."""
    settings.check()
    prompts = read_references(settings.prompts, settings.fields)
    model, renderer = load_generator(settings.model, settings.fields, settings.chat_template, settings.device, settings.dtype)
    report = None if on_progress is None else (lambda done: on_progress(done, len(prompts)))
    return evaluate_tasks(model, renderer, prompts, settings.max_new_tokens, settings.batch_size, report)
