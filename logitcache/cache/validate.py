"""``logitcache validate``: check a cache's files against its manifest and name what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from logitcache.cache.format import from_table, has_behavior, shard_metadata, shard_schema, stores_logprobs
from logitcache.cache.layout import SHARD_PATTERN
from logitcache.cache.manifest import cache_layout, check_complete, read_manifest
from logitcache.errors import LogitcacheError
from logitcache.files import sha256_file


def _check_rows(name: str, targets, manifest: dict) -> list[str]:
    """Structural checks on decoded rows: row lengths, per-position lengths, BOS, counts summing to N."""
    seq_len = manifest["seq_len"]
    layout = cache_layout(manifest)
    problems = []
    tokens = targets.tokens()
    if layout["packing"] == "stream" and (tokens != seq_len).any():
        problems.append(f"{name}: windows of {sorted(set(tokens.tolist()) - {seq_len})} tokens, manifest says seq_len {seq_len}")
    if (tokens > seq_len).any() or (tokens < 2).any():
        problems.append(f"{name}: rows of {tokens.min()} to {tokens.max()} tokens, need 2 to seq_len {seq_len}")
    if layout["bos_token_id"] is not None and (targets.input_ids[:, 0] != layout["bos_token_id"]).any():
        problems.append(f"{name}: rows that do not start with the BOS {layout['bos_token_id']} the manifest's layout records")
    if int(targets.target_lengths.sum(dtype=np.int64)) != len(targets.target_ids):
        problems.append(f"{name}: target_lengths add up to {targets.target_lengths.sum()} but {len(targets.target_ids)} ids are stored")
    if targets.target_ids.size and (targets.target_ids.min() < 0 or targets.target_ids.max() >= manifest["vocab_size"]):
        problems.append(f"{name}: target ids outside [0, {manifest['vocab_size']})")
    for column in ("gold_logprob", "target_logprobs", "tail_logprob"):
        values = getattr(targets, column)
        if values is not None and np.isnan(values).any():
            problems.append(f"{name}: {column} holds NaN (a teacher whose logits overflowed); rebuild this cache")
    if targets.behavior_logprob is not None and (targets.behavior_logprob > 0).any():
        problems.append(f"{name}: behavior_logprob holds values above 0, which are not log-probabilities")
    if targets.target_counts is not None:
        lengths = targets.target_lengths.reshape(-1).astype(np.int64)
        lengths = lengths[lengths > 0]  # padding and positions without targets hold no counts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.add.reduceat(targets.target_counts.astype(np.int64), offsets[:-1]) if len(targets.target_counts) else []
        n = manifest["params"]["samples"]
        if np.any(np.asarray(sums) != n):
            problems.append(f"{name}: some positions' counts do not sum to N = {n}")
    return problems


def _check_shard(cache_dir: Path, entry: dict, manifest: dict, deep: bool) -> list[str]:
    path = cache_dir / entry["file"]
    name = entry["file"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes on disk, manifest says {entry['bytes']}")
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
        return problems
    try:
        meta = shard_metadata(path)
        parquet = pq.ParquetFile(path)
    except LogitcacheError as exc:
        return problems + [str(exc)]
    if meta.get("build_fingerprint") != manifest["fingerprint"]:
        problems.append(f"{name}: belongs to a different build (fingerprint in its metadata differs)")
    version = manifest["format_version"]
    if meta.get("format_version") != version:
        problems.append(f"{name}: shard format v{meta.get('format_version')} in a v{version} cache")
        return problems
    behavior = has_behavior(version, cache_layout(manifest)["format"])
    logprobs = stores_logprobs(manifest["method"], manifest["params"])
    if not parquet.schema_arrow.remove_metadata().equals(shard_schema(manifest["method"], version, manifest["params"].get("samples"),
                                                                      behavior, logprobs)):
        problems.append(f"{name}: schema differs from shard format v{version} for method {manifest['method']}")
        return problems
    rows = parquet.metadata.num_rows
    if rows != entry["rows"]:
        problems.append(f"{name}: {rows} rows, manifest says {entry['rows']}")
    if manifest["format_version"] == 1 and entry["tokens"] != rows * manifest["seq_len"]:
        problems.append(f"{name}: manifest says {entry['tokens']} tokens for {rows} windows of {manifest['seq_len']}")
    if meta.get("tokens", entry["tokens"]) != entry["tokens"]:
        problems.append(f"{name}: {meta.get('tokens')} tokens in its metadata, manifest says {entry['tokens']}")
    if meta.get("target_entries") != entry["target_entries"]:
        problems.append(f"{name}: {meta.get('target_entries')} target entries in its metadata, manifest says {entry['target_entries']}")
    if deep:
        targets = from_table(parquet.read())
        problems += _check_rows(name, targets, manifest)
        if int(targets.tokens().sum()) != entry["tokens"]:
            problems.append(f"{name}: {int(targets.tokens().sum())} tokens stored, manifest says {entry['tokens']}")
        if len(targets.target_ids) != entry["target_entries"]:
            problems.append(f"{name}: {len(targets.target_ids)} target entries stored, manifest says {entry['target_entries']}")
        expected = np.arange(entry["first_sequence_id"], entry["first_sequence_id"] + rows)
        if not np.array_equal(targets.sequence_ids, expected):
            problems.append(f"{name}: sequence ids are not {expected[0]}..{expected[-1]}")
    return problems


def validate_cache(cache_dir: Path, deep: bool = True) -> list[str]:
    """Every problem found, as one line each; an empty list means the cache is sound."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    try:
        check_complete(manifest, cache_dir)
    except LogitcacheError as exc:
        return [str(exc)]
    problems = []
    for entry in manifest["shards"]:
        problems += _check_shard(cache_dir, entry, manifest, deep)
    listed = {e["file"] for e in manifest["shards"]}
    for stray in sorted(p.name for p in cache_dir.glob(SHARD_PATTERN) if p.name not in listed):
        problems.append(f"{stray}: on disk but not in the manifest")
    totals = manifest["totals"]
    for key in ("sequences", "tokens", "bytes", "target_entries"):
        field = {"sequences": "rows"}.get(key, key)
        summed = sum(e[field] for e in manifest["shards"])
        if totals[key] != summed:
            problems.append(f"manifest totals.{key} = {totals[key]} but its shards add up to {summed}")
    positions = totals["tokens"] - totals["sequences"]
    if totals["positions"] != positions:
        problems.append(f"manifest totals.positions = {totals['positions']} but {totals['sequences']} rows of "
                        f"{totals['tokens']} tokens have {positions}")
    return problems
