"""Read a logitcache cache with pyarrow and numpy only: the teacher targets of the first window.

Usage: python examples/read_pyarrow.py CACHE_DIR

Format: schemas/SHARD_FORMAT.md. The per-id columns of a window are flat and position-major;
``target_lengths`` cuts them into positions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

# v3: v2 with topk ids ascending and, in chat caches, behavior_logprob; v4: v3, but a sample cache
# built with --logprob-bits 0 has no target_logprobs (its ids and counts only)
FORMAT_VERSIONS = (2, 3, 4)


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{cache_dir}: no manifest.json; give the folder `logitcache build --out` wrote")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "logitcache" or manifest.get("format_version") not in FORMAT_VERSIONS:
        raise ValueError(f"{cache_dir}: not a logitcache cache of format version {FORMAT_VERSIONS}")
    return manifest


def target_probs(logprobs: np.ndarray | None, counts: np.ndarray | None, proposal_temperature: float) -> np.ndarray:
    """The target distribution a position's stored ids imply (float64).

    topk: exp(logprob), the tail mass stays outside. sample: draws came from q ∝ t^(1/tau), so each
    id weighs count * t/q ∝ count * exp(logprob * (1 - 1/tau)), self-normalised; at tau = 1 this is
    exactly count / N, the unbiased RS-KD estimate. A sample cache without log-probabilities (v4,
    ``--logprob-bits 0``) always has tau = 1: count / N.
    """
    if logprobs is None:
        return counts / counts.sum()
    logprobs = logprobs.astype(np.float64)
    if counts is None:
        return np.exp(logprobs)
    weights = counts * np.exp(logprobs * (1.0 - 1.0 / proposal_temperature))
    return weights / weights.sum()


def first_window_targets(cache_dir: str | Path) -> list[dict]:
    """One dict per position of the cache's first window (sequence_id 0)."""
    manifest = read_manifest(cache_dir)
    shard = Path(cache_dir) / manifest["shards"][0]["file"]
    window = pq.ParquetFile(shard).read_row_group(0).slice(0, 1)

    def flat(name: str) -> np.ndarray:
        return pc.list_flatten(window.column(name)).to_numpy()

    lengths = flat("target_lengths")
    cuts = np.cumsum(lengths)[:-1]
    ids = np.split(flat("target_ids").astype(np.int64), cuts)
    # v4 sample caches built with --logprob-bits 0 have no target_logprobs: None per position
    has_logprobs = "target_logprobs" in window.column_names
    logprobs = np.split(flat("target_logprobs").astype(np.float32), cuts) if has_logprobs else [None] * len(lengths)
    has_counts = manifest["method"] == "sample"
    counts = np.split(flat("target_counts").astype(np.int64), cuts) if has_counts else [None] * len(lengths)
    tail = None if has_counts else flat("tail_logprob").astype(np.float32)
    tau = manifest["params"].get("proposal_temperature", 1.0)
    gold_ids, gold_logprob = flat("input_ids")[1:], flat("gold_logprob").astype(np.float32)
    rows = []
    for t in range(len(lengths)):
        row = {
            "position": t,
            "gold_id": int(gold_ids[t]),
            "gold_logprob": float(gold_logprob[t]),
            "ids": ids[t],
            "logprobs": logprobs[t],
            "probs": target_probs(logprobs[t], counts[t], tau),
        }
        row.update({"counts": counts[t]} if has_counts else {"tail_logprob": float(tail[t])})
        rows.append(row)
    return rows


def print_table(rows: list[dict], width: int = 3) -> None:
    """A short table: each position's gold token and its first ``width`` target ids."""
    extra = "counts" if "counts" in rows[0] else "tail_logprob"
    print(f"{'pos':>4} {'gold_id':>8} {'gold_lp':>8}  {extra:<14} top ids (prob)")
    for row in rows:
        top = "  ".join(f"{i}({p:.3f})" for i, p in zip(row["ids"][:width], row["probs"][:width]))
        value = str(row["counts"][:width].tolist()) if extra == "counts" else f"{row['tail_logprob']:.4f}"
        print(f"{row['position']:>4} {row['gold_id']:>8} {row['gold_logprob']:>8.4f}  {value:<14} {top}")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {sys.argv[0]} CACHE_DIR")
    shard = Path(sys.argv[1]) / read_manifest(sys.argv[1])["shards"][0]["file"]
    print(f"{shard}: {json.loads(pq.read_schema(shard).metadata[b'logitcache'])}")
    print_table(first_window_targets(sys.argv[1]))


if __name__ == "__main__":
    main()
