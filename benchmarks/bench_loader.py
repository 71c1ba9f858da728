"""Loader throughput against a plain pyarrow read, and peak RSS of streaming 1 vs 10 shards.

    python3 benchmarks/bench_loader.py [--shards 10] [--rows 1024]

Writes a synthetic sample-method cache (seq_len 256, ~32 ids per position, vocab 8192) into a
temporary directory, the same targets in shard format v1 (float16 log-probabilities), and a synthetic
topk k=32 cache three ways: v1, v2 (ids by descending log-probability) and this writer (ids
ascending); all read in the same interleaved rounds, timed by the wall clock and
by this process's CPU time (steadier on a shared machine). Throughput runs in this process (shards on
disk, batches collated, no DataLoader workers); each peak-RSS case runs in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from harness import CLOCKS, fastest, peak_rss, run_fresh

from logitcache.cache.format import FORMAT_VERSION, WindowTargets, write_shard
from logitcache.cache.layout import shard_name
from logitcache.cache.manifest import fingerprint, write_manifest
from logitcache.loader.dataset import CacheDataset
from logitcache.native import library as native

SEQ_LEN = 256
VOCAB = 8192
SAMPLES = 64
TOP_K = 32
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


def synthetic_topk_shard(rng: np.random.Generator, first_id: int, rows: int) -> WindowTargets:
    """``rows`` windows of :data:`TOP_K` distinct ids per position, descending log-probabilities."""
    per_position = (rows, SEQ_LEN - 1)
    positions = rows * (SEQ_LEN - 1)
    ids = np.argsort(rng.random((positions, VOCAB // 64)), axis=1)[:, :TOP_K] * 64 + rng.integers(0, 64, (positions, 1))
    logprobs = -np.sort(rng.exponential(3.0, size=(positions, TOP_K)), axis=1)
    return WindowTargets(
        sequence_ids=np.arange(first_id, first_id + rows, dtype=np.int64),
        input_ids=rng.integers(0, VOCAB, size=(rows, SEQ_LEN), dtype=np.int32),
        target_lengths=np.full(per_position, TOP_K, dtype=np.uint16),
        target_ids=ids.reshape(-1).astype(np.int32),
        target_logprobs=logprobs.reshape(-1).astype(np.float16).astype(np.float32),
        gold_logprob=(-rng.exponential(2.0, size=per_position)).astype(np.float16).astype(np.float32),
        tail_logprob=(-rng.exponential(2.0, size=per_position)).astype(np.float16).astype(np.float32),
    )


PARAMS = {"sample": {"samples": SAMPLES, "proposal_temperature": 1.0}, "topk": {"k": TOP_K}}


def write_manifest_for(root: Path, shard_rows: list[int], version: int = FORMAT_VERSION, method: str = "sample",
                       params: dict | None = None) -> None:
    write_manifest(root, {
        "format": "logitcache", "format_version": version, "logitcache_version": "bench",
        "fingerprint": fingerprint({"bench": shard_rows}), "method": method, "params": params or PARAMS[method],
        "seq_len": SEQ_LEN, "seed": 0, "shard_size": shard_rows[0], "vocab_size": VOCAB,
        "tokenizer": {"fingerprint": "bench", "vocab_size": VOCAB, "eos_token_id": 0},
        "shards": [{"file": shard_name(i), "rows": rows} for i, rows in enumerate(shard_rows)],
    })  # fmt: skip


IDS_ONLY = {**PARAMS["sample"], "logprob_bits": 0}  # format v4's sample cache without log-probabilities


def make_caches(root: Path, shards: int, rows: int) -> tuple[Path, Path, Path, Path]:
    """A ``shards``-shard cache, a 1-shard cache that links to its first shard, the first in format v1, and the
    first without log-probabilities (``--logprob-bits 0``)."""
    full, single, v1 = root / f"{shards}-shards", root / "1-shard", root / f"{shards}-shards-v1"
    ids_only = root / f"{shards}-shards-ids-only"
    for folder in (full, single, v1, ids_only):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(shards):
        targets = synthetic_shard(rng, i * rows, rows)
        write_shard(full / shard_name(i), targets, {"bench": True, "params": PARAMS["sample"]})
        write_shard(v1 / shard_name(i), targets, {"bench": True, "params": PARAMS["sample"], "format_version": 1})
        write_shard(ids_only / shard_name(i), targets, {"bench": True, "params": IDS_ONLY})
    write_manifest_for(full, [rows] * shards)
    write_manifest_for(v1, [rows] * shards, version=1)
    write_manifest_for(ids_only, [rows] * shards, params=IDS_ONLY)
    (single / shard_name(0)).symlink_to(full / shard_name(0))
    write_manifest_for(single, [rows])
    return full, single, v1, ids_only


TOPK_LAYOUTS = ("v1", "v2", "current")
VERSIONS = {"v1": 1, "v2": 2, "current": FORMAT_VERSION}  # the format version each layout is written in


def make_topk_caches(root: Path, shards: int, rows: int) -> dict[str, Path]:
    """The same synthetic topk targets as a cache in each of :data:`TOPK_LAYOUTS`."""
    folders = {layout: root / f"topk-{layout.replace(' ', '-')}" for layout in TOPK_LAYOUTS}
    rng = np.random.default_rng(1)
    for folder in folders.values():
        folder.mkdir()
    for i in range(shards):
        targets = synthetic_topk_shard(rng, i * rows, rows)
        for layout, folder in folders.items():
            write_shard(folder / shard_name(i), targets, {"bench": True, "params": PARAMS["topk"], "format_version": VERSIONS[layout]})
    for layout, folder in folders.items():
        write_manifest_for(folder, [rows] * shards, version=VERSIONS[layout], method="topk")
    return folders


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


def tokens_per_second(reads: dict[str, Callable[[Path], int]], cache: Path, rounds: int = 3,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Each read's tokens over its fastest of ``rounds`` interleaved rounds by ``clock`` (after one untimed
    read, which counts the tokens)."""
    tokens = {name: read(cache) for name, read in reads.items()}
    seconds = fastest({name: partial(read, cache) for name, read in reads.items()}, rounds, clock=clock)
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
        full, single, v1, ids_only = make_caches(Path(tmp), shards, rows)
        megabytes = sum(p.stat().st_size for p in full.glob("*.parquet")) / 2**20
        v1_megabytes = sum(p.stat().st_size for p in v1.glob("*.parquet")) / 2**20
        bare_megabytes = sum(p.stat().st_size for p in ids_only.glob("*.parquet")) / 2**20
        print(f"cache: {shards} shards x {rows} windows x {SEQ_LEN} tokens, {megabytes:.0f} MiB on disk "
              f"(format v1: {v1_megabytes:.0f} MiB; without log-probabilities: {bare_megabytes:.0f} MiB)\n")
        topk = make_topk_caches(Path(tmp), shards, rows)
        sizes = ", ".join(f"{layout} {sum(p.stat().st_size for p in topk[layout].glob('*.parquet')) / 2**20:.0f} MiB"
                          for layout in TOPK_LAYOUTS)
        print(f"topk k={TOP_K} caches of the same windows: {sizes}\n")
        reads = {"plain": read_table_tokens, "loader": stream_tokens, "numpy": stream_tokens_numpy,
                 "loader v1": lambda _: stream_tokens(v1), "loader ids only": lambda _: stream_tokens(ids_only),
                 **{f"topk {layout}": lambda _, c=topk[layout]: stream_tokens(c) for layout in TOPK_LAYOUTS}}
        labels = {
            "plain": "`pq.read_table` of the sample cache's files",
            "loader": "sample: `CacheDataset` + `collate` (dense `[B, T-1, K]` tensors)",
            "numpy": "sample: the same, numpy collate (`LOGITCACHE_NATIVE=0`)",
            "loader v1": "sample: `CacheDataset` + `collate`, the same targets in format v1",
            "loader ids only": "sample: the same, without log-probabilities (v4, `--logprob-bits 0`)",
            "topk v1": f"topk k={TOP_K}: `CacheDataset` + `collate`, format v1",
            "topk v2": f"topk k={TOP_K}: the same, v2 (ids by log-probability)",
            "topk current": f"topk k={TOP_K}: the same, this writer (ids ascending)",
        }
        rates = {clock: tokens_per_second(reads, full, clock=CLOCKS[clock]) for clock in ("wall", "cpu")}
        print("| read | tokens/s (wall) | tokens/CPU-s | ratio (CPU) |\n|---|---:|---:|---:|")
        for name, label in labels.items():
            print(f"| {label} | {rates['wall'][name]:,.0f} | {rates['cpu'][name]:,.0f} | "
                  f"{rates['cpu'][name] / rates['cpu']['plain']:.2f} |")
        print()
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
