"""Loader throughput against a plain pyarrow read, and peak RSS of streaming 1 vs 10 shards.

    python3 benchmarks/bench_loader.py [--shards 10] [--rows 1024]

Writes a synthetic sample-method cache (seq_len 256, ~32 ids per position, vocab 8192) into a
temporary directory, and the same targets in shard format v1 (float16 log-probabilities), read in
the same interleaved rounds. Throughput runs in this process (shards on disk, batches collated, no
DataLoader workers); each peak-RSS case runs in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from harness import fastest, peak_rss, run_fresh

from logitcache.cache.format import FORMAT_VERSION, WindowTargets, write_shard
from logitcache.cache.layout import shard_name
from logitcache.cache.manifest import fingerprint, write_manifest
from logitcache.loader.dataset import CacheDataset
from logitcache.native import library as native

SEQ_LEN = 256
VOCAB = 8192
SAMPLES = 64
GLOBAL_BATCH = 32


def synthetic_shard(rng: np.random.Generator, first_id: int, rows: int) -> WindowTargets:
    """``rows`` windows with 24..40 ids per position (mean 32)."""
    per_position = (rows, SEQ_LEN - 1)
    lengths = rng.integers(24, 41, size=per_position).astype(np.uint16)
    entries = int(lengths.sum())
    return WindowTargets(
        sequence_ids=np.arange(first_id, first_id + rows, dtype=np.int64),
        input_ids=rng.integers(0, VOCAB, size=(rows, SEQ_LEN), dtype=np.int32),
        target_lengths=lengths,
        target_ids=rng.integers(0, VOCAB, size=entries, dtype=np.int32),
        target_logprobs=(-rng.exponential(3.0, size=entries)).astype(np.float16).astype(np.float32),
        gold_logprob=(-rng.exponential(2.0, size=per_position)).astype(np.float16).astype(np.float32),
        target_counts=rng.integers(1, 4, size=entries).astype(np.uint16),
    )


PARAMS = {"samples": SAMPLES, "proposal_temperature": 1.0}


def write_manifest_for(root: Path, shard_rows: list[int], version: int = FORMAT_VERSION) -> None:
    params = PARAMS
    write_manifest(root, {
        "format": "logitcache", "format_version": version, "logitcache_version": "bench",
        "fingerprint": fingerprint({"bench": shard_rows}), "method": "sample", "params": params,
        "seq_len": SEQ_LEN, "seed": 0, "shard_size": shard_rows[0], "vocab_size": VOCAB,
        "tokenizer": {"fingerprint": "bench", "vocab_size": VOCAB, "eos_token_id": 0},
        "shards": [{"file": shard_name(i), "rows": rows} for i, rows in enumerate(shard_rows)],
    })  # fmt: skip


def make_caches(root: Path, shards: int, rows: int) -> tuple[Path, Path, Path]:
    """A ``shards``-shard cache, a 1-shard cache that links to its first shard, and the first in format v1."""
    full, single, v1 = root / f"{shards}-shards", root / "1-shard", root / f"{shards}-shards-v1"
    for folder in (full, single, v1):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(shards):
        targets = synthetic_shard(rng, i * rows, rows)
        write_shard(full / shard_name(i), targets, {"bench": True, "params": PARAMS})
        write_shard(v1 / shard_name(i), targets, {"bench": True, "params": PARAMS, "format_version": 1})
    write_manifest_for(full, [rows] * shards)
    write_manifest_for(v1, [rows] * shards, version=1)
    (single / shard_name(0)).symlink_to(full / shard_name(0))
    write_manifest_for(single, [rows])
    return full, single, v1


def stream_tokens(cache: Path) -> int:
    """Stream one epoch through ``CacheDataset`` with collated batches; return the tokens seen."""
    dataset = CacheDataset(cache, seed=0, global_batch_size=GLOBAL_BATCH)
    return sum(batch["input_ids"].numel() for batch in dataset.dataloader(num_workers=0))


def stream_tokens_numpy(cache: Path) -> int:
    """:func:`stream_tokens` with the compiled collate switched off (``LOGITCACHE_NATIVE=0``: numpy)."""
    os.environ[native.ENV_SWITCH] = "0"
    native.library.cache_clear()
    try:
        return stream_tokens(cache)
    finally:
        del os.environ[native.ENV_SWITCH]
        native.library.cache_clear()


def read_table_tokens(cache: Path) -> int:
    """Read every shard with a plain ``pq.read_table``, one at a time; return the tokens read."""
    return sum(pq.read_table(path).num_rows * SEQ_LEN for path in sorted(cache.glob("shard-*.parquet")))


def whole_cache_tokens(cache: Path) -> int:
    """Hold every shard in memory at once: what a loader that does not stream would need."""
    tables = [pq.read_table(path) for path in sorted(cache.glob("shard-*.parquet"))]
    return sum(table.num_rows for table in tables) * SEQ_LEN


def tokens_per_second(reads: dict[str, Callable[[Path], int]], cache: Path, rounds: int = 3) -> dict[str, float]:
    """Each read's tokens over its fastest of ``rounds`` interleaved rounds (after one untimed read, which counts the tokens)."""
    tokens = {name: read(cache) for name, read in reads.items()}
    seconds = fastest({name: partial(read, cache) for name, read in reads.items()}, rounds)
    return {name: tokens[name] / seconds[name] for name in reads}


RSS_CASES: dict[str, Callable[[Path], int]] = {
    "import": lambda _: 0,
    "stream": stream_tokens,
    "whole": whole_cache_tokens,
}


def peak_rss_mb(case: str, cache: Path) -> float:
    """Peak RSS of a fresh interpreter running ``case`` (one of :data:`RSS_CASES`)."""
    return float(run_fresh(__file__, "--rss-case", case, "--cache", str(cache)).strip())


def rss_case(case: str, cache: Path) -> None:
    """Run ``case`` and print this process's peak RSS in MiB."""
    RSS_CASES[case](cache)
    print(peak_rss() / 2**20)


def report(shards: int, rows: int) -> None:
    """Print the throughput and peak-RSS tables for a fresh synthetic cache."""
    with tempfile.TemporaryDirectory() as tmp:
        full, single, v1 = make_caches(Path(tmp), shards, rows)
        megabytes = sum(p.stat().st_size for p in full.glob("*.parquet")) / 2**20
        v1_megabytes = sum(p.stat().st_size for p in v1.glob("*.parquet")) / 2**20
        print(f"cache: {shards} shards x {rows} windows x {SEQ_LEN} tokens, {megabytes:.0f} MiB on disk "
              f"(format v1: {v1_megabytes:.0f} MiB)\n")
        reads = {"plain": read_table_tokens, "loader": stream_tokens, "numpy": stream_tokens_numpy,
                 "loader v1": lambda _: stream_tokens(v1)}
        rates = tokens_per_second(reads, full)
        plain = rates["plain"]
        print("| read | tokens/s | ratio |\n|---|---:|---:|")
        print(f"| `pq.read_table` of the same files | {plain:,.0f} | 1.00 |")
        print(f"| `CacheDataset` + `collate` (dense `[B, T-1, K]` tensors) | {rates['loader']:,.0f} | {rates['loader'] / plain:.2f} |")
        print(f"| the same, numpy collate (`LOGITCACHE_NATIVE=0`) | {rates['numpy']:,.0f} | {rates['numpy'] / plain:.2f} |")
        print(f"| `CacheDataset` + `collate` of the same targets in format v1 | {rates['loader v1']:,.0f} | "
              f"{rates['loader v1'] / plain:.2f} |\n")
        print("| peak RSS (fresh process) | MiB |\n|---|---|")
        for label, case, cache in [
            ("import only", "import", single),
            ("stream 1 shard", "stream", single),
            (f"stream {shards} shards", "stream", full),
            (f"whole cache in memory, {shards} shards (contrast)", "whole", full),
        ]:
            print(f"| {label} | {peak_rss_mb(case, cache):,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1024, help="windows per shard")
    parser.add_argument("--rss-case", choices=sorted(RSS_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_case:
        rss_case(args.rss_case, args.cache)
    else:
        report(args.shards, args.rows)


if __name__ == "__main__":
    main()
