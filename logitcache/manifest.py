"""manifest.json: the index of a cache, written last and atomically.

Layout (JSON Schema in schemas/manifest.schema.json)::

    format, format_version, logitcache_version, fingerprint,
    method, params, seq_len, seed, shard_size, vocab_size,
    teacher {backend, path, name, architecture, dtype, fingerprint, vocab_size},
    tokenizer {fingerprint, vocab_size, eos_token_id},
    corpus {description, fingerprint, text_field, documents, tokens, dropped_tokens},
    totals {sequences, tokens, positions, target_entries, bytes},
    shards [{file, index, rows, tokens, target_entries, bytes, sha256, first_sequence_id}]

No timestamps: re-running a build yields a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from logitcache.atomic import write_json_atomic
from logitcache.errors import LogitcacheError
from logitcache.shards import FORMAT_VERSION

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "logitcache"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def fingerprint(identity: dict) -> str:
    """sha256 of the canonical JSON of ``identity``: what makes two builds the same build."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    write_json_atomic(Path(cache_dir) / MANIFEST_NAME, manifest)


def read_manifest(cache_dir: Path) -> dict:
    """Load and sanity-check ``cache_dir/manifest.json``; errors name the file and the fix."""
    path = Path(cache_dir) / MANIFEST_NAME
    if Path(cache_dir).is_file():
        raise LogitcacheError(f"{cache_dir} is a file, not a cache: give the folder `logitcache build --out` wrote")
    if not path.is_file():
        hint = " (a build that has not finished yet?)" if Path(cache_dir).is_dir() else ""
        raise LogitcacheError(f"{path} not found{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LogitcacheError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise LogitcacheError(f"{path}: not a logitcache manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LogitcacheError(
            f"{path}: format version {manifest.get('format_version')} but this logitcache reads "
            f"version {FORMAT_VERSION}; rebuild the cache or install a matching logitcache"
        )
    return manifest
