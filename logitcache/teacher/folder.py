"""A Hugging Face model folder: its tokenizer (loaded offline), the fingerprints of its weights and tokenizer, its context length."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from logitcache.errors import LogitcacheError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


FULL_HASH_LIMIT = 256 << 20


EDGE_BYTES = 16 << 20


def weights_fingerprint(path: Path) -> str:
    """sha256 over config and weight files: full contents up to 256 MiB a file, else size + first and last 16 MiB.

    The shortcut keeps fingerprinting a 140 GB teacher to seconds; it still changes with any
    retrained or re-quantised checkpoint in practice.
    """
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(EDGE_BYTES))
                fh.seek(size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, normalisation, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        if not Path(path).is_dir():
            raise LogitcacheError(
                f"cannot load a tokenizer from {path}: there is no such folder (nor a model of that name in the "
                "local Hugging Face cache; nothing is downloaded)"
            ) from exc
        raise LogitcacheError(f"cannot load a tokenizer from {path}: {exc}") from exc


# Config attributes that hold a model's context length, by architecture family (Llama, GPT-2, MPT, ...).
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def context_length(config) -> int | None:
    """The longest input the model takes, from the first of :data:`CONTEXT_LENGTH_KEYS` it sets (None: unknown)."""
    for key in CONTEXT_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
