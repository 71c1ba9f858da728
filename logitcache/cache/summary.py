"""``logitcache inspect``: what a cache holds and what it says about the teacher.

JSON keys (stable; documented in the README): sequences, tokens, positions, shards, bytes,
bytes_per_token, bytes_per_entry, mean_ids_per_position, mean_covered_mass (topk, else null),
teacher_perplexity, teacher_perplexity_by_position, method, params, seq_len, layout, vocab_size,
teacher, logitcache_version.

``teacher_perplexity_by_position`` splits the perplexity by a position's place in its row
(:data:`POSITION_BUCKETS`): a teacher that sees its contexts as in training is about as good early
in a row as later (a little worse: less context); a first bucket many times worse says the rows do
not start as the teacher expects (a missing BOS, see ``--bos``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.cache.manifest import cache_layout, check_complete, read_manifest
from logitcache.errors import LogitcacheError


POSITION_BUCKETS = (0, 32, 256)  # first positions of buckets: 0-31, 32-255, 256 and on


def _column(path: Path, column: str) -> pa.ListArray:
    try:
        table = pq.read_table(path, columns=[column])
    except (OSError, pa.ArrowException) as exc:
        raise LogitcacheError(
            f"{path}: cannot read column {column} of a shard the manifest lists ({exc}); "
            "`logitcache validate` checks every shard"
        ) from exc
    return table.column(0).combine_chunks()


def _column_values(path: Path, column: str) -> np.ndarray:
    return _column(path, column).flatten().to_numpy(zero_copy_only=False)


def _bucket_names() -> list[str]:
    ends = [*POSITION_BUCKETS[1:], None]
    return [f"{lo}-{hi - 1}" if hi else f"{lo}+" for lo, hi in zip(POSITION_BUCKETS, ends)]


def _position_buckets(lengths: pa.ListArray) -> np.ndarray:
    """``[P] int64``: the bucket of each flat position of the per-position column ``lengths``."""
    offsets = lengths.offsets.to_numpy()
    place = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], np.diff(offsets))
    return np.searchsorted(POSITION_BUCKETS, place, side="right") - 1


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
    buckets = len(POSITION_BUCKETS)
    bucket_nll, bucket_count = np.zeros(buckets), np.zeros(buckets, dtype=np.int64)
    for entry in manifest["shards"]:
        path = cache_dir / entry["file"]
        column = _column(path, "target_lengths")
        lengths = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        gold = _column_values(path, "gold_logprob").astype(np.float64)
        scored = lengths > 0  # positions with teacher targets (all of them, unless a corpus leaves some out)
        positions += len(lengths)
        entries += int(lengths.sum())
        gold_sum += float(gold[scored].sum())
        bucket = _position_buckets(column)[scored]
        bucket_nll -= np.bincount(bucket, weights=gold[scored], minlength=buckets)
        bucket_count += np.bincount(bucket, minlength=buckets)
        if manifest["method"] == "topk":
            tail = _column_values(path, "tail_logprob").astype(np.float64)[scored]
            covered_sum += float((1.0 - np.exp(tail)).sum())
    totals = manifest["totals"]
    return {
        "sequences": totals["sequences"],
        "tokens": totals["tokens"],
        "positions": positions,
        "shards": len(manifest["shards"]),
        "bytes": totals["bytes"],
        "bytes_per_token": totals["bytes"] / max(totals["tokens"], 1),
        "bytes_per_entry": totals["bytes"] / max(entries, 1),
        "mean_ids_per_position": entries / max(int(bucket_count.sum()), 1),  # over the positions with targets
        "mean_covered_mass": covered_sum / max(int(bucket_count.sum()), 1) if manifest["method"] == "topk" else None,
        "teacher_perplexity": _perplexity(-gold_sum / max(int(bucket_count.sum()), 1)),
        "teacher_perplexity_by_position": {name: _perplexity(nll / count) for name, nll, count
                                           in zip(_bucket_names(), bucket_nll, bucket_count) if count},
        "method": manifest["method"],
        "params": manifest["params"],
        "seq_len": manifest["seq_len"],
        "layout": cache_layout(manifest),
        "vocab_size": manifest["vocab_size"],
        "teacher": manifest["teacher"]["name"],
        "logitcache_version": manifest["logitcache_version"],
    }
