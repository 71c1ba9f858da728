"""Chat and prompt/response records → the tokens a teacher sees, and the positions that get targets.

Two record formats, read from any corpus :class:`~logitcache.corpus.Corpus` opens except plain text:

- ``chat``: a field (default ``messages``) holding a list of ``{"role", "content"}`` messages, the
  OpenAI / Hugging Face layout (roles: :data:`ROLES`). Rendered with the teacher tokenizer's own chat
  template, or with a Jinja template from a file (``--chat-template``) for a teacher without one.
- ``prompt-response``: fields ``prompt`` and ``response`` (names overridable). Rendered as plain text,
  ``prompt + response + EOS``, with no chat template (:data:`PLAIN_TEMPLATE`): the format for base
  models that continue a text. To use a chat template, write the records as ``chat``.

Targets go where the next token belongs to an assistant turn: position ``t`` of the ``target_mask``
is True when token ``t + 1`` is part of an assistant turn's rendered content, its end-of-turn text
included, in every assistant turn of a conversation.

How the assistant turns are found: the template renders the conversation up to each assistant turn
twice, with the generation prompt (where the answer starts) and with the turn (where it ends); each
must be a prefix of the whole conversation's text, which gives the turn's character span. The whole
text is tokenized once, and a token is the assistant's when its characters (the tokenizer's offset
mapping) overlap a span. Comparing token prefixes instead would break where BPE merges across a turn
boundary; ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers most templates lack.

Generated records: a record of ``logitcache generate``'s output (it has ``response_ids`` and
``response_logprobs``) is scored on the tokens the model drew, not on a re-tokenisation of its text
(which BPE need not give back): the example is the prompt as generate rendered it (the messages before
the last, with the generation prompt) followed by ``response_ids``. Only those response tokens get
targets, and each carries the log-probability it was drawn with (``ChatExample.behavior_logprobs``),
which on-policy losses importance-weight by; every other position's is NaN.

Special tokens: what the template renders is what the teacher sees. The text is tokenized without the
tokenizer's special tokens, and those the tokenizer adds around a text (a BOS, say) are added only
where the rendered text does not already start (or end) with them, so a template that writes the BOS
and a tokenizer that adds one give one BOS, not two.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitcache.cache.format import leading_mask
from logitcache.corpus import Corpus, pad_rows
from logitcache.errors import LogitcacheError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("chat", "prompt-response")
CORPUS_FORMATS = ("text", *FORMATS)  # what `build --format` and `train --format` take: text is corpus.py's
LENGTH_POLICIES = ("truncate", "skip")
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

Message = dict[str, str]


@dataclass(frozen=True)
class RecordFields:
    """The record format and the names of its fields."""

    format: str = "chat"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"

    def check(self) -> None:
        if self.format not in FORMATS:
            raise LogitcacheError(f"--format {self.format}: use one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ChatExample:
    """One rendered conversation: ``input_ids [n] int64`` and ``target_mask [n-1] bool`` (True at ``t``
    when token ``t + 1`` is an assistant's); ``behavior_logprobs [n-1] float32`` for a generated record:
    the log-probability token ``t + 1`` was drawn with, NaN where it was not drawn (None: not generated)."""

    input_ids: np.ndarray
    target_mask: np.ndarray
    behavior_logprobs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def cut(self, max_len: int) -> ChatExample:
        """The first ``max_len`` tokens."""
        behavior = None if self.behavior_logprobs is None else self.behavior_logprobs[: max_len - 1]
        return ChatExample(self.input_ids[:max_len], self.target_mask[: max_len - 1], behavior)


@dataclass(frozen=True)
class Sampled:
    """A generated response as drawn: its token ids ``[m] int64`` and the log-probability each was drawn
    with ``[m] float32`` (``logitcache generate``'s ``response_ids`` and ``response_logprobs``)."""

    ids: np.ndarray
    logprobs: np.ndarray


SAMPLED_FIELDS = ("response_ids", "response_logprobs")


@dataclass
class ChatStats:
    """What rendering saw: records read, examples kept, truncated and skipped (too long), tokens and target positions kept."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    dropped_tokens: int = 0  # cut off by truncation, or in skipped examples
    target_positions: int = 0
    sampled: int = 0  # examples kept of generated records, scored on their drawn tokens


# ---- records → messages -----------------------------------------------------------------------


def _field(record: dict, name: str, where: str, option: str) -> object:
    if name not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise LogitcacheError(f"{where}: no field {name!r} (fields: {fields}); pick one with {option}")
    return record[name]


def _text(value: object, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise LogitcacheError(f"{where}: {what} is {type(value).__name__}, not text")
    return value


def _messages(value: object, where: str, name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise LogitcacheError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LogitcacheError(f"{where}: message {i} is not a {{role, content}} object")
        role = message["role"]
        if role not in ROLES:
            raise LogitcacheError(f"{where}: message {i} has the unknown role {role!r}; roles are {', '.join(ROLES)}")
        content = _text(message["content"], where, f"the content of message {i}")
        if role == "assistant" and not content.strip():
            raise LogitcacheError(f"{where}: message {i} is an empty assistant turn")
        messages.append({"role": role, "content": content})
    return messages


def conversation(record: dict, fields: RecordFields, where: str) -> list[Message]:
    """A record's messages, checked. A prompt-response record is a user turn and, when the record has a
    response, an assistant turn."""
    if fields.format == "chat":
        return _messages(_field(record, fields.messages_field, where, "--messages-field"), where, fields.messages_field)
    prompt = _text(_field(record, fields.prompt_field, where, "--prompt-field"), where, f"field {fields.prompt_field!r}")
    messages = [{"role": "user", "content": prompt}]
    if fields.response_field in record:
        response = _text(record[fields.response_field], where, f"field {fields.response_field!r}")
        messages.append({"role": "assistant", "content": response})
    return _messages(messages, where, fields.response_field)


def sampled_response(record: dict, where: str) -> Sampled | None:
    """The generated tokens of a record of ``logitcache generate``'s output, checked; None for any other record."""
    if not any(name in record for name in SAMPLED_FIELDS):
        return None
    ids, logprobs = (_field(record, name, where, "logitcache generate") for name in SAMPLED_FIELDS)
    if (not isinstance(ids, list) or not isinstance(logprobs, list) or len(ids) != len(logprobs) or not ids
            or not all(isinstance(i, int) and i >= 0 for i in ids)
            or not all(isinstance(x, (int, float)) and x <= 0 for x in logprobs)):
        raise LogitcacheError(f"{where}: response_ids and response_logprobs must be lists of the same non-zero length, "
                              "of token ids and of log-probabilities (<= 0)")
    return Sampled(np.asarray(ids, dtype=np.int64), np.asarray(logprobs, dtype=np.float32))


def read_conversations(corpus: Corpus, fields: RecordFields) -> Iterator[tuple[str, list[Message]]]:
    """Each record's place and checked messages, in the corpus order."""
    for where, _, messages in read_chats(corpus, fields):
        yield where, messages


def read_chats(corpus: Corpus, fields: RecordFields) -> Iterator[tuple[str, dict, list[Message]]]:
    """Each record's place, the record itself and its checked messages, in the corpus order."""
    for where, record in corpus.records():
        yield where, record, conversation(record, fields, where)


def split_reference(messages: list[Message], where: str) -> tuple[list[Message], str | None]:
    """``(prompt messages, reference answer)``: a final assistant turn is the reference (None without one);
    the prompt must end with the user's turn."""
    reference = None
    if messages[-1]["role"] == "assistant":
        messages, reference = messages[:-1], messages[-1]["content"]
    if not messages or messages[-1]["role"] != "user":
        raise LogitcacheError(f"{where}: a prompt must end with a user turn (before the reference answer, if any)")
    return messages, reference


# ---- messages → tokens ------------------------------------------------------------------------


def chat_template(tokenizer, fields: RecordFields, template_file: Path | None) -> str:
    """The Jinja template that renders ``fields.format`` records for ``tokenizer``."""
    if fields.format == "prompt-response":
        if template_file is not None:
            raise LogitcacheError("--chat-template goes with --format chat; prompt-response records are plain text")
        return PLAIN_TEMPLATE
    if template_file is not None:
        try:
            return Path(template_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise LogitcacheError(f"--chat-template {template_file}: cannot read it ({exc.strerror})") from exc
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise LogitcacheError(
            "the teacher's tokenizer has no chat template; pass one as a Jinja file with --chat-template FILE"
        )
    return tokenizer.chat_template


def _added_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (a BOS, an EOS, or none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(s for s in range(len(full) - len(plain) + 1) if full[s : s + len(plain)] == plain)
    return full[:start], full[start + len(plain) :]


def rendering_identity(tokenizer, fields: RecordFields, template_file: Path | None) -> dict:
    """What decides how records become tokens besides the tokenizer's vocabulary: the template (a file's, the
    tokenizer's own or the plain one) and the special tokens the tokenizer adds around a text (a build's identity)."""
    import hashlib

    before, after = _added_tokens(tokenizer)
    template = chat_template(tokenizer, fields, template_file)
    return {"template_sha256": hashlib.sha256(template.encode()).hexdigest(), "added_before": before, "added_after": after}


class ChatRenderer:
    """Renders checked conversations with one tokenizer and template into token ids and target masks."""

    def __init__(self, tokenizer, fields: RecordFields = RecordFields(), template_file: Path | None = None) -> None:
        fields.check()
        self.tokenizer = tokenizer
        self.template = chat_template(tokenizer, fields, template_file)
        self.before, self.after = _added_tokens(tokenizer)

    def render(self, messages: list[Message], where: str, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``; a template that fails is named with the record."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:
            raise LogitcacheError(f"{where}: the chat template failed to render this record ({exc})") from exc

    def _tokens(self, text: str, with_after: bool) -> tuple[list[int], np.ndarray, int]:
        """``(ids, offsets [m, 2] int64 of the text's own tokens, number of tokens added before them)``."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        before = [] if ids[: len(self.before)] == self.before else self.before
        after = [] if not with_after or ids[len(ids) - len(self.after) :] == self.after else self.after
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return [*before, *ids, *after], offsets, len(before)

    def prompt_ids(self, messages: list[Message], where: str) -> np.ndarray:
        """The generation prompt for ``messages`` (ending with a user turn): ``[n] int64``."""
        ids, _, _ = self._tokens(self.render(messages, where, add_generation_prompt=True), with_after=False)
        return np.asarray(ids, dtype=np.int64)

    def _prefix_length(self, messages: list[Message], text: str, where: str, add_generation_prompt: bool) -> int:
        prefix = self.render(messages, where, add_generation_prompt)
        if not text.startswith(prefix):
            raise LogitcacheError(
                f"{where}: the chat template does not render turn by turn (the conversation up to turn {len(messages)} "
                "is not the start of the whole), so the assistant turns cannot be found"
            )
        return len(prefix)

    def assistant_spans(self, messages: list[Message], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the assistant turns in ``text``, the rendering of ``messages``."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._prefix_length(messages[:i], text, where, add_generation_prompt=True)
                end = self._prefix_length(messages[: i + 1], text, where, add_generation_prompt=False)
                if end <= start:
                    raise LogitcacheError(f"{where}: the chat template renders no text for assistant turn {i}")
                spans.append((start, end))
        return spans

    def sampled_example(self, messages: list[Message], sampled: Sampled, where: str) -> ChatExample:
        """A generated record: the generation prompt of ``messages`` before the last (the response's) and the
        drawn tokens ``sampled.ids``, targets and behaviour log-probabilities on those tokens only."""
        if messages[-1]["role"] != "assistant":
            raise LogitcacheError(f"{where}: a generated record must end with the assistant's response")
        if sampled.ids.max() >= len(self.tokenizer):
            raise LogitcacheError(f"{where}: response_ids hold id {int(sampled.ids.max())}, beyond the tokenizer's "
                                  f"{len(self.tokenizer)} tokens: generated with another tokenizer?")
        prompt = self.prompt_ids(split_reference(messages, where)[0], where)
        n = len(prompt) + len(sampled.ids)
        mask = np.zeros(n - 1, dtype=bool)
        mask[len(prompt) - 1 :] = True
        behavior = np.full(n - 1, np.nan, dtype=np.float32)
        behavior[len(prompt) - 1 :] = sampled.logprobs
        return ChatExample(np.concatenate([prompt, sampled.ids]), mask, behavior)

    def example(self, messages: list[Message], where: str, sampled: Sampled | None = None) -> ChatExample:
        """``messages`` (with at least one assistant turn) as input ids and the assistant target mask; a generated
        record's (``sampled``) by :meth:`sampled_example`."""
        if not any(m["role"] == "assistant" for m in messages):
            raise LogitcacheError(f"{where}: no assistant turn (or response) to take targets from")
        if sampled is not None:
            return self.sampled_example(messages, sampled, where)
        text = self.render(messages, where)
        ids, offsets, before = self._tokens(text, with_after=True)
        starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)  # an empty span still has a place
        assistant = np.zeros(len(ids), dtype=bool)
        own = assistant[before : before + len(offsets)]
        for start, end in self.assistant_spans(messages, text, where):
            own |= (starts < end) & (ends > start)
        return ChatExample(np.asarray(ids, dtype=np.int64), assistant[1:])

    def examples(
        self, conversations: Iterator[tuple[str, list[Message]] | tuple[str, list[Message], Sampled | None]],
        max_len: int | None = None, policy: str = "truncate", stats: ChatStats | None = None,
    ) -> Iterator[ChatExample]:
        """The examples of ``conversations`` (``(place, messages)``, or ``(place, messages, sampled)`` for records
        that may be generated); longer than ``max_len`` tokens: cut to ``max_len`` (``truncate``; skipped if no
        target is left) or ``skip``ped. ``stats`` counts what happened."""
        if policy not in LENGTH_POLICIES:
            raise LogitcacheError(f"length policy {policy!r}: use one of {', '.join(LENGTH_POLICIES)}")
        stats = ChatStats() if stats is None else stats
        for where, messages, *sampled in conversations:
            stats.records += 1
            example = self.example(messages, where, *sampled)
            if max_len is not None and len(example.input_ids) > max_len:
                if policy == "skip" or not example.target_mask[: max_len - 1].any():
                    stats.skipped += 1
                    stats.dropped_tokens += len(example.input_ids)
                    continue
                stats.truncated += 1
                stats.dropped_tokens += len(example.input_ids) - max_len
                example = example.cut(max_len)
            stats.examples += 1
            stats.sampled += example.behavior_logprobs is not None
            stats.tokens += len(example.input_ids)
            stats.target_positions += int(example.target_mask.sum())
            yield example


def chat_rows(corpus: Corpus, tokenizer, fields: RecordFields, template_file: Path | None, max_len: int,
              policy: str, stats: ChatStats) -> Iterator[ChatExample]:
    """Every record of ``corpus`` as a :class:`ChatExample` of at most ``max_len`` tokens (a row of a
    build or of ``train --corpus``); ``stats`` counts what happened."""
    renderer = ChatRenderer(tokenizer, fields, template_file)
    conversations = ((where, messages, sampled_response(record, where)) for where, record, messages in read_chats(corpus, fields))
    return renderer.examples(conversations, max_len, policy, stats)


def pad_examples(examples: list[ChatExample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``examples`` right-padded: ``input_ids [B, n] int64``, ``token_counts [B] int64`` and
    ``target_mask [B, n-1] bool`` (False at padding)."""
    ids, _ = pad_rows([e.input_ids for e in examples])
    counts = np.fromiter((len(e) for e in examples), dtype=np.int64, count=len(examples))
    mask = np.zeros((len(examples), ids.shape[1] - 1), dtype=bool)
    mask[leading_mask(counts - 1, mask.shape[1])] = np.concatenate([e.target_mask for e in examples])
    return ids, counts, mask


def pad_behavior(examples: list[ChatExample]) -> np.ndarray:
    """The behaviour log-probabilities of ``examples`` right-padded to the longest: ``[B, n-1] float32``,
    NaN where a token was not drawn (padding, prompts, examples that were not generated)."""
    n = max(len(e) for e in examples)
    out = np.full((len(examples), n - 1), np.nan, dtype=np.float32)
    for row, example in enumerate(examples):
        if example.behavior_logprobs is not None:
            out[row, : len(example) - 1] = example.behavior_logprobs
    return out
