"""Read a logitcache cache with Polars (and numpy): the teacher targets of the first window.

Usage: python examples/read_polars.py CACHE_DIR

One frame of positions (exploded per-position lists) and one frame of stored entries (exploded
flat per-id lists, each tagged with its position by repeating position t ``target_lengths[t]``
times); the target probabilities are computed per position with window expressions.
Format: schemas/SHARD_FORMAT.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

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


def target_prob(method: str, proposal_temperature: float, has_logprobs: bool = True) -> pl.Expr:
    """The target probability of each stored entry, as a Polars expression (Float64).

    topk: exp(logprob), the tail mass stays outside. sample: draws came from q ∝ t^(1/tau), so each
    id weighs count * t/q ∝ count * exp(logprob * (1 - 1/tau)), self-normalised per position; at
    tau = 1 this is exactly count / N, the unbiased RS-KD estimate. A sample cache without
    log-probabilities (v4, ``--logprob-bits 0``) always has tau = 1: count / N.
    """
    if not has_logprobs:
        count = pl.col("count").cast(pl.Float64)
        return count / count.sum().over("position")
    logprob = pl.col("logprob").cast(pl.Float64)
    if method == "topk":
        return logprob.exp()
    weight = pl.col("count") * (logprob * (1.0 - 1.0 / proposal_temperature)).exp()
    return weight / weight.sum().over("position")


def first_window_targets(cache_dir: str | Path) -> list[dict]:
    """One dict per position of the cache's first window (sequence_id 0)."""
    manifest = read_manifest(cache_dir)
    method, tau = manifest["method"], manifest["params"].get("proposal_temperature", 1.0)
    shard = Path(cache_dir) / manifest["shards"][0]["file"]
    window = pl.scan_parquet(shard).head(1).collect()
    per_position = ["tail_logprob"] if method == "topk" else []
    positions = window.select(
        pl.col("target_lengths").explode().alias("length"),
        pl.col("input_ids").list.slice(1).explode().alias("gold_id"),
        pl.col("gold_logprob").explode(),
        *[pl.col(name).explode() for name in per_position],
    ).with_row_index("position")
    # v4 sample caches built with --logprob-bits 0 have no target_logprobs: None per position
    has_logprobs = "target_logprobs" in window.columns
    per_id = {"target_ids": "id", "target_logprobs": "logprob"} if has_logprobs else {"target_ids": "id"}
    if method == "sample":
        per_id["target_counts"] = "count"
    entries = (
        window.select([pl.col(column).explode().alias(name) for column, name in per_id.items()])
        .with_columns(positions.select(pl.col("position").repeat_by("length").explode()).to_series())
        .with_columns(target_prob(method, tau, has_logprobs).alias("prob"))
        .group_by("position", maintain_order=True)
        .agg(pl.col([*per_id.values(), "prob"]))
    )
    rows = []
    for row in positions.join(entries, on="position", how="left").sort("position").iter_rows(named=True):
        out = {
            "position": row["position"],
            "gold_id": row["gold_id"],
            "gold_logprob": row["gold_logprob"],
            "ids": np.asarray(row["id"], dtype=np.int64),
            "logprobs": np.asarray(row["logprob"], dtype=np.float32) if has_logprobs else None,
            "probs": np.asarray(row["prob"], dtype=np.float64),
        }
        if method == "topk":
            out["tail_logprob"] = row["tail_logprob"]
        else:
            out["counts"] = np.asarray(row["count"], dtype=np.int64)
        rows.append(out)
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
    print_table(first_window_targets(sys.argv[1]))


if __name__ == "__main__":
    main()
