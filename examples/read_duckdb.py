"""Read a logitcache cache with DuckDB SQL (and numpy): the teacher targets of the first window.

Usage: python examples/read_duckdb.py CACHE_DIR

``unnest`` turns the window's lists into a table of positions and a table of stored entries;
a running sum of ``target_lengths`` gives each position its span of entries, and
``list(... ORDER BY entry)`` gathers them back per position. Log-probabilities are FLOAT.
Format: schemas/SHARD_FORMAT.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import numpy as np

# v3: v2 with topk ids ascending and, in chat caches, behavior_logprob; v4: v3, but a sample cache
# built with --logprob-bits 0 has no target_logprobs (its ids and counts only)
FORMAT_VERSIONS = (2, 3, 4)

# Per-method SQL: extra per-position column, extra per-entry column, target probability of an entry.
# sample: draws came from q ∝ t^(1/tau), so each id weighs count * t/q ∝ count * exp(logprob * (1 - 1/tau)),
# self-normalised per position; at tau = 1 this is exactly count / N, the unbiased RS-KD estimate.
METHOD_SQL = {
    "topk": {
        "position_column": "unnest(tail_logprob) AS tail_logprob,",
        "entry_column": "",
        "prob": "exp(logprob)",
    },
    "sample": {
        "position_column": "",
        "entry_column": "unnest(target_counts) AS count,",
        "prob": "count * exp(logprob * (1 - 1 / $tau))"
        " / sum(count * exp(logprob * (1 - 1 / $tau))) OVER (PARTITION BY position)",
    },
}

# A v4 sample cache built with --logprob-bits 0 has no target_logprobs: NULL log-probabilities, and at its
# tau = 1 each id weighs its count.
NO_LOGPROBS_SQL = {"logprob": "NULL::FLOAT", "prob": "count / sum(count) OVER (PARTITION BY position)"}

QUERY = """
WITH first_window AS (
    SELECT * FROM read_parquet($shard) ORDER BY sequence_id LIMIT 1
), positions AS (
    SELECT unnest(range(len(target_lengths))) AS position,
           unnest(target_lengths) AS length,
           unnest(input_ids[2:]) AS gold_id,
           {position_column}
           unnest(gold_logprob) AS gold_logprob
    FROM first_window
), spans AS (
    SELECT *, sum(length) OVER (ORDER BY position) - length AS start FROM positions
), entries AS (
    SELECT unnest(range(len(target_ids))) AS entry,
           unnest(target_ids) AS id,
           {entry_column}
           {logprob} AS logprob
    FROM first_window
), targets AS (
    SELECT spans.*, entries.*, {prob} AS prob
    FROM spans JOIN entries ON entry >= start AND entry < start + length
)
SELECT position, any_value(gold_id) AS gold_id, any_value(gold_logprob) AS gold_logprob, {extra_select}
       list(id ORDER BY entry) AS ids, list(logprob ORDER BY entry) AS logprobs, list(prob ORDER BY entry) AS probs
FROM targets GROUP BY position ORDER BY position
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
    method = manifest["method"]
    extra = "any_value(tail_logprob) AS tail_logprob," if method == "topk" else "list(count ORDER BY entry) AS counts,"
    params = {"shard": str(Path(cache_dir) / manifest["shards"][0]["file"])}
    connection = duckdb.connect()
    columns = [row[0] for row in connection.execute("DESCRIBE SELECT * FROM read_parquet($shard)", params).fetchall()]
    has_logprobs = "target_logprobs" in columns
    parts = {**METHOD_SQL[method], "logprob": "unnest(target_logprobs)", **({} if has_logprobs else NO_LOGPROBS_SQL)}
    sql = QUERY.format(**parts, extra_select=extra)
    if method == "sample" and has_logprobs:
        params["tau"] = manifest["params"]["proposal_temperature"]
    result = connection.execute(sql, params)
    names = [column[0] for column in result.description]
    rows = []
    for values in result.fetchall():
        row = dict(zip(names, values))
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
    print_table(first_window_targets(sys.argv[1]))


if __name__ == "__main__":
    main()
