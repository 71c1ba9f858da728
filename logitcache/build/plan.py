"""What one build is: its identity (hashed into the fingerprint), its windows, and what its shards,
its ``build.json`` and its manifest say about it. The one place that spells the build's identity."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from logitcache import __version__
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import FORMAT_VERSION
from logitcache.cache.manifest import FORMAT_NAME, fingerprint
from logitcache.corpus import Corpus, Layout, PackingStats, layout_rows, resolve_layout
from logitcache.teacher.base import Teacher
from logitcache.teacher.folder import tokenizer_fingerprint

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

    def windows(self, tokenizer) -> Iterator[np.ndarray]:
        """The corpus as rows ``[<= seq_len] int64`` of the build's layout; counts go to :attr:`stats`."""
        return layout_rows(self.corpus.documents(), tokenizer, self.layout, self.identity["seq_len"], self.stats)

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
            "corpus": {
                "description": self.corpus.describe(),
                "fingerprint": self.identity["corpus_fingerprint"],
                "text_field": self.identity["text_field"],
                "documents": self.stats.documents,
                "tokens": self.stats.tokens,
                "dropped_tokens": self.stats.dropped_tokens,
            },
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
    layout = resolve_layout(tok, settings.bos, settings.packing)
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": teacher_info["fingerprint"],
        "teacher_backend": teacher_info["backend"],  # backends differ in numerics and in the top-k tail
        "teacher_dtype": teacher_info["dtype"],
        "tokenizer_fingerprint": tokenizer_info["fingerprint"],
        "corpus_fingerprint": corpus.fingerprint(),
        "text_field": settings.text_field if corpus.has_fields else None,
        "method": settings.method,
        "params": settings.spec.params,
        "seq_len": settings.seq_len,
        "layout": layout.describe(settings.bos),
        "seed": settings.seed,
        "shard_size": settings.shard_size,
    }
    return Plan(identity, fingerprint(identity), teacher.vocab_size, teacher_info, tokenizer_info, corpus, PackingStats(), layout)
