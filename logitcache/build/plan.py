"""What one build is: its identity (hashed into the fingerprint), its windows, and what its shards,
its ``build.json`` and its manifest say about it. The one place that spells the build's identity."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from logitcache import __version__
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import FORMAT_VERSION
from logitcache.cache.manifest import FORMAT_NAME, fingerprint
from logitcache.chat import ChatStats, chat_rows, rendering_identity
from logitcache.corpus import Corpus, Layout, PackingStats, layout_rows, resolve_layout
from logitcache.generate.settings import settings_path
from logitcache.teacher.base import Teacher
from logitcache.teacher.folder import tokenizer_fingerprint

# What a build of `logitcache generate`'s output records of the generation (its settings file).
GENERATED_BY = ("model", "model_fingerprint", "temperature", "top_p", "seed", "max_new_tokens")

# Identity fields that the manifest and every shard repeat at their top level.
_TARGETS = ("method", "params", "seq_len", "seed")


@dataclass
class Plan:
    """One build: ``identity`` decides whether two runs are the same build (a resume) or not."""

    identity: dict
    fingerprint: str
    vocab_size: int
    teacher: dict
    tokenizer: dict
    corpus: Corpus
    stats: PackingStats
    layout: Layout
    settings: BuildSettings
    chat_stats: ChatStats

    def windows(self, tokenizer) -> Iterator:
        """The corpus as rows of the build's layout: ``[<= seq_len] int64`` token ids, or for chat and
        prompt-response records :class:`~logitcache.chat.ChatExample` (ids and the positions that get
        targets); counts go to :attr:`stats` / :attr:`chat_stats`."""
        s = self.settings
        if s.format == "text":
            return layout_rows(self.corpus.documents(), tokenizer, self.layout, s.seq_len, self.stats)
        return chat_rows(self.corpus, tokenizer, s.record_fields, s.chat_template, s.seq_len, s.too_long, self.chat_stats)

    def _corpus(self) -> dict:
        about = {"description": self.corpus.describe(), "fingerprint": self.identity["corpus_fingerprint"],
                 "text_field": self.identity["text_field"]}
        if self.settings.format == "text":
            return {**about, "documents": self.stats.documents, "tokens": self.stats.tokens,
                    "dropped_tokens": self.stats.dropped_tokens}
        chat = self.chat_stats
        generated = settings_path(self.corpus.path)
        if self.corpus.path.is_file() and generated.is_file():  # responses of `logitcache generate`: by which model
            saved = json.loads(generated.read_text())
            about["generated_by"] = {key: saved.get(key) for key in GENERATED_BY}
        return {**about, "documents": chat.records, "tokens": chat.tokens, "dropped_tokens": chat.dropped_tokens, "records": self.identity["records"],
                "examples": chat.examples, "truncated": chat.truncated, "skipped": chat.skipped,
                "target_positions": chat.target_positions, "sampled": chat.sampled}

    def _header(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "logitcache_version": __version__}

    def marker(self) -> dict:
        """``build.json``: the folder holds this build, in progress."""
        return {"format": FORMAT_NAME, "fingerprint": self.fingerprint, "identity": self.identity}

    def shard_metadata(self, index: int, first_sequence_id: int) -> dict:
        """The key-value metadata of shard ``index`` (``target_entries`` is added when it is written)."""
        return {
            **self._header(),
            "build_fingerprint": self.fingerprint,
            **{key: self.identity[key] for key in _TARGETS},
            "layout": self.identity["layout"],
            "vocab_size": self.vocab_size,
            "teacher_fingerprint": self.teacher["fingerprint"],
            "tokenizer_fingerprint": self.tokenizer["fingerprint"],
            "shard_index": index,
            "first_sequence_id": first_sequence_id,
        }

    def manifest(self, shards: list[dict]) -> dict:
        """``manifest.json`` (or a worker's partial manifest) listing ``shards``."""
        rows = sum(s["rows"] for s in shards)
        tokens = sum(s["tokens"] for s in shards)
        return {
            **self._header(),
            "fingerprint": self.fingerprint,
            **{key: self.identity[key] for key in _TARGETS},
            "shard_size": self.identity["shard_size"],
            "layout": self.identity["layout"],
            "vocab_size": self.vocab_size,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "corpus": self._corpus(),
            "totals": {
                "sequences": rows,
                "tokens": tokens,
                "positions": tokens - rows,
                "target_entries": sum(s["target_entries"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
            },
            "shards": shards,
        }


def plan_build(settings: BuildSettings, teacher: Teacher) -> Plan:
    """The :class:`Plan` of ``settings`` run by ``teacher``."""
    corpus = Corpus.open(settings.corpus, settings.text_field)
    teacher_info = teacher.describe()
    tok = teacher.tokenizer
    tokenizer_info = {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok), "eos_token_id": int(tok.eos_token_id)}
    if settings.format == "text":
        layout = resolve_layout(tok, settings.bos, settings.packing)
        described = layout.describe(settings.bos)
    else:  # the chat template's (or the plain rendering's) own special tokens: logitcache.chat adds none
        layout = Layout("documents", None, int(tok.eos_token_id))
        described = layout.describe("template", settings.format)
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": teacher_info["fingerprint"],
        "teacher_backend": teacher_info["backend"],  # backends differ in numerics and in the top-k tail
        "teacher_dtype": teacher_info["dtype"],
        "tokenizer_fingerprint": tokenizer_info["fingerprint"],
        "corpus_fingerprint": corpus.fingerprint(),
        "text_field": settings.text_field if corpus.has_fields and settings.format == "text" else None,
        "records": None if settings.format == "text" else {
            **asdict(settings.record_fields), "too_long": settings.too_long,
            **rendering_identity(tok, settings.record_fields, settings.chat_template)},
        "method": settings.method,
        "params": settings.spec.params,
        "seq_len": settings.seq_len,
        "layout": described,
        "seed": settings.seed,
        "shard_size": settings.shard_size,
    }
    return Plan(identity, fingerprint(identity), teacher.vocab_size, teacher_info, tokenizer_info, corpus, PackingStats(), layout, settings, ChatStats())
