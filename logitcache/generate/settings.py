"""The options of ``logitcache generate`` and ``logitcache evaluate``: frozen dataclasses, one field per CLI option."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from logitcache.chat import RecordFields
from logitcache.errors import LogitcacheError


def settings_path(out: Path) -> Path:
    """Where the settings of the generation that writes ``out`` are kept (a build of ``out`` reads them too)."""
    return out.with_name(out.name + ".settings.json")


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy when ``temperature == 0``, else sampled from the top-p nucleus of
    ``softmax(logits / temperature)``; draws depend only on ``(seed, prompt index, token position)``."""

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
class _Prompting:
    """What both commands take: the model, the prompts and how their records read."""

    model: Path
    prompts: Path
    format: str = "chat"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    chat_template: Path | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None

    @property
    def fields(self) -> RecordFields:
        return RecordFields(self.format, self.messages_field, self.prompt_field, self.response_field)

    def check(self) -> None:
        self.fields.check()
        Sampling(max_new_tokens=self.max_new_tokens).check()
        if self.batch_size < 1:
            raise LogitcacheError(f"--batch-size {self.batch_size}: must be at least 1")


@dataclass(frozen=True)
class EvaluateSettings(_Prompting):
    """``logitcache evaluate``'s options: greedy answers to ``prompts``, scored against their references."""


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(_Prompting):
    """``logitcache generate``'s options: responses to ``prompts`` written to ``out``."""

    out: Path
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, self.seed)

    def check(self) -> None:
        super().check()
        self.sampling.check()
