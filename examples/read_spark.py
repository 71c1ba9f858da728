"""Read a logitcache cache with Apache Spark (pyspark, local mode): the teacher targets of the first window.

Usage: python examples/read_spark.py CACHE_DIR        (Spark 4 needs a Java 17+ runtime)

``posexplode(target_lengths)`` gives one row per position; the sum of the lengths before it is
where its entries start in the flat per-id lists, and ``slice`` takes them. Spark reads format v2
shards as they are (float32 log-probabilities); it has no Parquet FLOAT16 type
(``[PARQUET_TYPE_ILLEGAL]``), so a format v1 cache needs ``logitcache convert`` first.
Format: schemas/SHARD_FORMAT.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession

# v3: v2 with topk ids ascending and, in chat caches, behavior_logprob; v4: v3, but a sample cache
# built with --logprob-bits 0 has no target_logprobs (its ids and counts only)
FORMAT_VERSIONS = (2, 3, 4)

# Per-method SQL: the extra column of a position (and its name), and the target probability of its entries.
# sample: draws came from q ∝ t^(1/tau), so each id weighs count * t/q ∝ count * exp(logprob * (1 - 1/tau)),
# self-normalised per position; at tau = 1 this is exactly count / N, the unbiased RS-KD estimate.
METHOD_SQL = {
    "topk": {
        "extra": "CAST(tail_logprob[position] AS DOUBLE) AS tail_logprob",
        "extra_name": "tail_logprob",
        "weights": "transform(logprobs, x -> exp(x))",
        "probs": "weights",
    },
    "sample": {
        "extra": "slice(target_counts, start + 1, length) AS counts",
        "extra_name": "counts",
        "weights": "zip_with(counts, logprobs, (c, x) -> c * exp(x * (1 - 1 / {tau})))",
        "probs": "transform(weights, w -> w / aggregate(weights, 0D, (total, v) -> total + v))",
    },
}

LOGPROBS_SQL = "transform(slice(target_logprobs, start + 1, length), x -> CAST(x AS DOUBLE))"

# A v4 sample cache built with --logprob-bits 0 has no target_logprobs: NULL log-probabilities, and at its
# tau = 1 each id weighs its count.
NO_LOGPROBS_SQL = {"logprobs": "CAST(NULL AS ARRAY<DOUBLE>)", "weights": "transform(counts, c -> CAST(c AS DOUBLE))"}

QUERY = """
WITH positions AS (
    SELECT *, posexplode(target_lengths) AS (position, length) FROM first_window
), spans AS (
    SELECT *, aggregate(slice(target_lengths, 1, position), 0, (total, n) -> total + n) AS start FROM positions
), targets AS (
    SELECT position, input_ids[position + 1] AS gold_id, CAST(gold_logprob[position] AS DOUBLE) AS gold_logprob,
           slice(target_ids, start + 1, length) AS ids,
           {logprobs} AS logprobs,
           {extra}
    FROM spans
), weighted AS (
    SELECT *, {weights} AS weights FROM targets
)
SELECT position, gold_id, gold_logprob, ids, logprobs, {extra_name}, {probs} AS probs FROM weighted ORDER BY position
"""


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{cache_dir}: no manifest.json; give the folder `logitcache build --out` wrote")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "logitcache" or manifest.get("format_version") not in FORMAT_VERSIONS:
        raise ValueError(f"{cache_dir}: not a logitcache cache of format version {FORMAT_VERSIONS}")
    return manifest


def first_window_targets(cache_dir: str | Path) -> list[dict]:
    """One dict per position of the cache's first window (sequence_id 0)."""
    manifest = read_manifest(cache_dir)
    method, tau = manifest["method"], manifest["params"].get("proposal_temperature", 1.0)
    spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    shard = spark.read.parquet(str(Path(cache_dir) / manifest["shards"][0]["file"]))
    shard.orderBy("sequence_id").limit(1).createOrReplaceTempView("first_window")
    has_logprobs = "target_logprobs" in shard.columns
    parts = {**METHOD_SQL[method], "logprobs": LOGPROBS_SQL, **({} if has_logprobs else NO_LOGPROBS_SQL)}
    sql = QUERY.format(extra=parts["extra"], extra_name=parts["extra_name"], probs=parts["probs"],
                       logprobs=parts["logprobs"], weights=parts["weights"].format(tau=float(tau)))
    result = [row.asDict() for row in spark.sql(sql).collect()]
    rows = []
    for row in result:
        row["ids"] = np.asarray(row["ids"], dtype=np.int64)
        row["logprobs"] = np.asarray(row["logprobs"], dtype=np.float32) if has_logprobs else None
        row["probs"] = np.asarray(row["probs"], dtype=np.float64)
        if method == "sample":
            row["counts"] = np.asarray(row["counts"], dtype=np.int64)
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
    rows = first_window_targets(sys.argv[1])
    SparkSession.getActiveSession().stop()
    print_table(rows)


if __name__ == "__main__":
    main()
