"""``logitcache inspect``: what a cache holds and what it says about the teacher.

JSON keys (stable; documented in the README): sequences, tokens, positions, shards, bytes,
bytes_per_token, bytes_per_entry, mean_ids_per_position, mean_covered_mass (topk, else null),
teacher_perplexity, method, params, seq_len, vocab_size, teacher, logitcache_version.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.cache.manifest import check_complete, read_manifest
from logitcache.errors import LogitcacheError


def _column_values(path: Path, column: str) -> np.ndarray:
    try:
        table = pq.read_table(path, columns=[column])
    except (OSError, pa.ArrowException) as exc:
        raise LogitcacheError(
            f"{path}: cannot read column {column} of a shard the manifest lists ({exc}); "
            "`logitcache validate` checks every shard"
        ) from exc
    return table.column(0).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``; infinite past float64's range (a broken teacher), not an OverflowError."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def summarize(cache_dir: Path) -> dict:
    """Statistics of a cache; reads only the small per-position columns."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    check_complete(manifest, cache_dir)
    positions = entries = 0
    gold_sum = covered_sum = 0.0
    for entry in manifest["shards"]:
        path = cache_dir / entry["file"]
        lengths = _column_values(path, "target_lengths").astype(np.int64)
        gold = _column_values(path, "gold_logprob").astype(np.float64)
        positions += len(lengths)
        entries += int(lengths.sum())
        gold_sum += float(gold.sum())
        if manifest["method"] == "topk":
            covered_sum += float((1.0 - np.exp(_column_values(path, "tail_logprob").astype(np.float64))).sum())
    totals = manifest["totals"]
    return {
        "sequences": totals["sequences"],
        "tokens": totals["tokens"],
        "positions": positions,
        "shards": len(manifest["shards"]),
        "bytes": totals["bytes"],
        "bytes_per_token": totals["bytes"] / max(totals["tokens"], 1),
        "bytes_per_entry": totals["bytes"] / max(entries, 1),
        "mean_ids_per_position": entries / max(positions, 1),
        "mean_covered_mass": covered_sum / max(positions, 1) if manifest["method"] == "topk" else None,
        "teacher_perplexity": _perplexity(-gold_sum / max(positions, 1)),
        "method": manifest["method"],
        "params": manifest["params"],
        "seq_len": manifest["seq_len"],
        "vocab_size": manifest["vocab_size"],
        "teacher": manifest["teacher"]["name"],
        "logitcache_version": manifest["logitcache_version"],
    }
