"""``manifest.json``: the build fingerprint function, reading it with clear errors, checking it is complete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from logitcache.cache.format import FORMAT_VERSION, READABLE_VERSIONS, logprobs_problem
from logitcache.cache.layout import MANIFEST_NAME
from logitcache.errors import LogitcacheError
from logitcache.files import write_json_atomic

FORMAT_NAME = "logitcache"


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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise LogitcacheError(f"{path}: not a logitcache manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise LogitcacheError(
            f"{path}: format version {manifest.get('format_version')} but this logitcache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (writes {FORMAT_VERSION}); rebuild the cache or install a matching logitcache"
        )
    problem = logprobs_problem(manifest.get("method"), manifest.get("params") or {}, manifest["format_version"])
    if problem:
        raise LogitcacheError(f"{path}: {problem}")
    return manifest


# A v1 cache (written before the layout was recorded) was packed as one stream without BOS.
V1_LAYOUT = {"format": "text", "packing": "stream", "bos": "never", "bos_token_id": None}


def cache_layout(manifest: dict) -> dict:
    """The layout a cache's rows have (``logitcache.corpus.Layout.describe``), v1 caches included."""
    return manifest.get("layout") or {**V1_LAYOUT, "eos_token_id": manifest["tokenizer"]["eos_token_id"]}


# What a complete build's manifest holds: the "required" lists of schemas/manifest.schema.json
# (tests/test_schemas.py keeps them equal). The loader needs less; validate and inspect need all.
REQUIRED_KEYS = ("format", "format_version", "logitcache_version", "fingerprint", "method", "params", "seq_len", "seed",
                 "shard_size", "vocab_size", "teacher", "tokenizer", "corpus", "totals", "shards")


REQUIRED_NESTED = {
    "teacher": ("backend", "path", "name", "dtype", "fingerprint", "vocab_size"),
    "totals": ("sequences", "tokens", "positions", "target_entries", "bytes"),
}


REQUIRED_SHARD_KEYS = ("file", "index", "rows", "tokens", "target_entries", "bytes", "sha256", "first_sequence_id")


def check_complete(manifest: dict, cache_dir: Path) -> None:
    """Refuse a manifest that lacks what a build writes (edited by hand, or damaged), naming the first gap."""
    where = Path(cache_dir) / MANIFEST_NAME
    gap = next((key for key in REQUIRED_KEYS if key not in manifest), None)
    for key, keys in REQUIRED_NESTED.items():
        part = manifest.get(key)
        if gap is None and not (isinstance(part, dict) and all(k in part for k in keys)):
            gap = f"{key}.{next((k for k in keys if not isinstance(part, dict) or k not in part), '')}"
    shards = manifest.get("shards")
    if gap is None and not isinstance(shards, list):
        gap = "shards (a list)"
    for i, entry in enumerate(shards if gap is None else []):
        missing = [k for k in REQUIRED_SHARD_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            gap = f"shards[{i}].{missing[0]}"
            break
    if gap is not None:
        raise LogitcacheError(
            f"{where}: no {gap}, which every build writes (edited by hand or damaged?); rebuild the cache, or "
            "`logitcache merge` it again from its partial manifests"
        )
