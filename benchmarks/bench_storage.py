"""Storage benchmark: bytes per stored entry under Parquet writer options, and what users write today.

    python3 benchmarks/bench_storage.py --teacher demo-out/teacher-run/student --corpus demo-out/corpus.jsonl

Builds ``topk`` k=32 and ``sample`` N=50 caches with a *trained* teacher (a random-initialised one
draws ~50 distinct ids at N=50, which changes the per-entry overhead). With no teacher at
``--teacher`` it makes ``make demo``'s (``logitcache.demo``'s recipe, bit for bit) under ``--work``
and reuses it next time. The demo teacher is not very sharp (~30 distinct ids per
position at N=50), so a third cache draws at proposal temperature ``--sharp-tau`` (0.5: ~11 ids
per position, the regime of real LLM teachers) as a stand-in for a sharper teacher.

Then it re-writes the very same shards (``to_table`` of the decoded targets) with each writer
variant, in memory, and reports bytes per stored entry (file bytes over stored ids, all columns and
the footer counted: what ``logitcache inspect`` calls ``bytes_per_entry``) and write throughput
(MB of Arrow data per CPU second of ``pq.write_table``, best of ``--repeat``). Only writer options
change: the v1 column types are published. Every variant's first shard is read back with
pyarrow, Polars, DuckDB and Hugging Face ``datasets``; "readers failing" names any that cannot.
Column chunks are compressed independently, so a per-column table shows where the bytes go, and
two more check the id order (ids ascending within a position instead of by log-probability: a
convention change, reported only) and the id width (ids mapped into a 152k vocabulary).

``--formats`` measures shard format v1 against v2 instead (issue 17): bytes per stored entry, all
columns counted, of the same targets written both ways (``to_table`` with ``format_version`` 1 or 2 and
``parquet_options``: exactly what each version's ``write_shard`` writes), for ``topk`` k=32 and
``sample`` N=50, with the ids as they are and mapped by a random injective map into
``--widths`` ids (the ids as wide as a big vocabulary's: see RESULTS.md for what this stand-in is and
is not); per column; and the error of each version's stored log-probabilities against the
teacher's float32 values, in nats and in probability. It does so for the teacher and for a copy of it
whose output head is scaled by ``--sharpen`` (logits times that factor: a more peaked teacher).

``--wide`` measures v1, v2 and this writer (format v3 = v4: topk ids ascending) at real
vocabulary widths instead (``--wide-widths``), on ``wide_vocab.py``'s fan-out stand-in: each of the
teacher's ids fans out to ``width / vocab`` wide ids with a context-dependent split, sharpened to
``--distinct`` ids per position at N=50; bytes per stored entry in total, per column, and under the
levers measured (zstd level, row-group size, PLAIN or BYTE_STREAM_SPLIT ids, sample ids ascending, one
mantissa bit fewer), and format v4's sample cache without log-probabilities (``--logprob-bits 0``).

Finally the same targets in the layouts people use today: axolotl's KD dataset columns
(``input_ids``, ``target_token_ids: list<list<int64>>``, ``target_logprobs: list<list<float32>>``,
``target_mask: list<list<int64>>``; ``target_counts`` too for sample) as Arrow IPC (what
``save_to_disk`` writes) and Parquet, and JSON Lines of the same lists. Their log-probabilities are
the teacher's float32 values, recomputed (the cache holds them rounded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from harness import best_time, ensure_teacher, small_corpus, teacher_arguments
from wide_vocab import Fanout, calibrate, wide_targets

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache import format as shards_mod
from logitcache.cache.format import (
    LOGPROB_COLUMNS,
    WindowTargets,
    parquet_options,
    read_shard,
    round_mantissa,
    shard_metadata,
    to_table,
)
from logitcache.cache.summary import summarize
from logitcache.targets.spec import SAMPLE_LOGPROB_BITS
from logitcache.teacher.load import load_teacher

# ---- writer variants -----------------------------------------------------------------------

ELEMENT = "{}.list.element"  # column_encoding / use_dictionary need the leaf path; "target_ids" alone is ignored
INT_COLUMNS = ("input_ids", "target_lengths", "target_ids", "target_counts")
HALF_COLUMNS = LOGPROB_COLUMNS  # float16 in v1, float32 in v2
CHOSEN_DICTIONARY = shards_mod.DICTIONARY_COLUMNS


def options(names: list[str], *, level: int = 3, dictionary=(), encoding: dict | None = None,
            row_group: int = 128, page: int | None = None) -> dict:
    """``pq.write_table`` keyword arguments; ``dictionary``/``encoding`` name columns, dropped if absent."""
    kwargs = {
        "compression": "zstd",
        "compression_level": level,
        "row_group_size": row_group,
        "write_statistics": ["sequence_id"],
        "use_dictionary": [ELEMENT.format(c) for c in dictionary if c in names] or False,
    }
    encoding = {ELEMENT.format(c): e for c, e in (encoding or {}).items() if c in names}
    if encoding:
        kwargs["column_encoding"] = encoding
    if page is not None:
        kwargs["data_page_size"] = page
    return kwargs


def variants(names: list[str]) -> list[tuple[str, dict]]:
    """(label, write_table kwargs) for each variant measured."""
    o = lambda **kw: options(names, **kw)  # noqa: E731
    chosen = dict(dictionary=CHOSEN_DICTIONARY)
    half_bss = {c: "BYTE_STREAM_SPLIT" for c in HALF_COLUMNS}
    return [
        ("v1 as shipped: zstd-3, PLAIN, no dictionary", o()),
        ("zstd-9", o(level=9)),
        ("zstd-19", o(level=19)),
        ("dictionary: all columns", o(dictionary=INT_COLUMNS + HALF_COLUMNS)),
        ("dictionary: log-probability columns", o(dictionary=HALF_COLUMNS)),
        ("dictionary: input_ids", o(dictionary=("input_ids",))),
        ("dictionary: target_ids", o(dictionary=("target_ids",))),
        ("dictionary: lengths + counts", o(dictionary=("target_lengths", "target_counts"))),
        ("DELTA_BINARY_PACKED: all int columns", o(encoding={c: "DELTA_BINARY_PACKED" for c in INT_COLUMNS})),
        ("BYTE_STREAM_SPLIT: target_ids", o(encoding={"target_ids": "BYTE_STREAM_SPLIT"})),
        ("BYTE_STREAM_SPLIT: log-probability columns", o(encoding=half_bss)),
        ("chosen before: dictionary on target_ids, lengths, counts; zstd-3", o(**chosen)),
        ("chosen in v1: the same with zstd-5", o(**chosen, level=5)),
        ("chosen + zstd-9", o(**chosen, level=9)),
        ("chosen + zstd-19", o(**chosen, level=19)),
        ("**chosen in v2: the same + BYTE_STREAM_SPLIT log-probabilities**", o(**chosen, encoding=half_bss, level=5)),
        ("chosen + BYTE_STREAM_SPLIT log-probabilities + zstd-9", o(**chosen, encoding=half_bss, level=9)),
        ("chosen; data pages 64 KiB", o(**chosen, page=64 << 10)),
        ("chosen; data pages 8 MiB", o(**chosen, page=8 << 20)),
        ("chosen; row groups of 512 windows (whole shard)", o(**chosen, row_group=512)),
    ]


def column_grid(caches: dict[str, Cache]) -> list[str]:
    """Each column alone under each encoding (Parquet compresses column chunks independently, so totals add up)."""
    encodings = [("PLAIN", 3), ("PLAIN", 9), ("PLAIN", 19), ("dictionary", 3), ("DELTA_BINARY_PACKED", 3), ("BYTE_STREAM_SPLIT", 3)]
    rows = ["| cache | column | " + " | ".join(f"{e} zstd-{lv}" for e, lv in encodings) + " |",
            "|---|---|" + "---:|" * len(encodings)]
    for method, cache in caches.items():
        tables = cache.tables()
        for column in tables[0].column_names[1:]:
            cells = []
            for encoding, level in encodings:
                kwargs = {"compression": "zstd", "compression_level": level, "row_group_size": shards_mod.ROW_GROUP_ROWS,
                          "write_statistics": False, "use_dictionary": encoding == "dictionary"}
                if encoding not in ("PLAIN", "dictionary"):
                    kwargs["column_encoding"] = {ELEMENT.format(column): encoding}
                try:
                    size = sum(len(write_bytes(t.select([column]), kwargs)) for t in tables)
                    cells.append(f"{size / cache.entries:.3f}")
                except (pa.ArrowException, ValueError, OSError):  # encoding not defined for the type
                    cells.append("n/a")
            rows.append(f"| {method} | {column} | {' | '.join(cells)} |")
    return rows


def write_bytes(table: pa.Table, kwargs: dict) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def readers_fail(data: bytes, table: pa.Table, scratch: Path) -> list[str]:
    """Names of the tools that cannot read ``data`` back to ``table``'s values (empty: all can)."""
    path = scratch / "check.parquet"
    path.write_bytes(data)
    failed = []
    ids = table.column("target_ids").combine_chunks().flatten().to_numpy()
    lps = table.column("target_logprobs").combine_chunks().flatten().to_numpy()
    try:
        if not pq.read_table(path).equals(table):
            failed.append("pyarrow (values)")
    except Exception:  # noqa: BLE001 - any failure is what we report
        failed.append("pyarrow")
    try:
        import polars as pl

        frame = pl.read_parquet(path, columns=["target_ids", "target_logprobs"])
        ok = np.array_equal(frame["target_ids"].explode().to_numpy(), ids) and np.array_equal(
            frame["target_logprobs"].explode().cast(pl.Float32).to_numpy(), lps.astype(np.float32))
        failed += [] if ok else ["polars (values)"]
    except Exception:  # noqa: BLE001
        failed.append("polars")
    try:
        import duckdb

        got = duckdb.sql(f"select target_ids, target_logprobs from '{path}' order by sequence_id").fetchall()
        ok = np.array_equal(np.concatenate([np.asarray(r[0]) for r in got]), ids) and np.array_equal(
            np.concatenate([np.asarray(r[1], dtype=np.float32) for r in got]), lps.astype(np.float32))
        failed += [] if ok else ["duckdb (values)"]
    except Exception:  # noqa: BLE001
        failed.append("duckdb")
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(scratch / "hf"))
        ok = np.array_equal(np.concatenate([np.asarray(x) for x in ds["target_ids"]]), ids)
        failed += [] if ok else ["datasets (values)"]
    except Exception:  # noqa: BLE001
        failed.append("datasets")
    return failed


def sorted_by_id(t: WindowTargets) -> WindowTargets:
    """The same targets with ids ascending within each position (NOT the v1 convention)."""
    position = np.repeat(np.arange(t.target_lengths.size), t.target_lengths.reshape(-1).astype(np.int64))
    order = np.lexsort((t.target_ids, position))
    return WindowTargets(**{**t.__dict__, "target_ids": t.target_ids[order], "target_logprobs": t.target_logprobs[order],
                            "target_counts": None if t.target_counts is None else t.target_counts[order]})


def remapped_ids(t: WindowTargets, vocab: int, big_vocab: int, seed: int = 0) -> WindowTargets:
    """The same targets with ids (and input_ids) sent through a random injective map into ``big_vocab``."""
    table = np.random.default_rng(seed).choice(big_vocab, size=vocab, replace=False).astype(np.int32)
    return WindowTargets(**{**t.__dict__, "target_ids": table[t.target_ids], "input_ids": table[t.input_ids]})


class Cache:
    """A built cache's shards decoded, as Arrow tables ready to be re-written."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text())
        files = [root / s["file"] for s in self.manifest["shards"]]
        self.targets = [read_shard(f) for f in files]
        self.meta = [shard_metadata(f) for f in files]
        self.entries = sum(len(t.target_ids) for t in self.targets)
        self.tokens = self.manifest["totals"]["tokens"]
        self.positions = self.manifest["totals"]["positions"]

    def tables(self, transform: Callable[[WindowTargets], WindowTargets] | None = None) -> list[pa.Table]:
        return [to_table(transform(t) if transform else t, m) for t, m in zip(self.targets, self.meta)]


def measure(tables: list[pa.Table], kwargs: dict, repeat: int) -> tuple[int, float, list[bytes]]:
    """(bytes written, Arrow MB/s of writing, the files) for ``tables`` written with ``kwargs``."""
    files: list[bytes] = []
    # CPU time: writing is single-threaded, and CPU time is steadier on a shared machine.
    seconds = best_time(lambda: files.__setitem__(slice(None), [write_bytes(t, kwargs) for t in tables]), repeat,
                    clock=time.process_time, warmup=False)
    mb = sum(t.nbytes for t in tables) / 1e6
    return sum(len(f) for f in files), mb / seconds, files


def variant_table(caches: dict[str, Cache], repeat: int, scratch: Path, check_readers: bool) -> list[str]:
    rows = ["| writer variant | " + " | ".join(f"{m} B/entry | {m} MB/s" for m in caches) + " | readers failing |",
            "|---|" + "---:|" * (2 * len(caches)) + "---|"]
    tables = {m: c.tables() for m, c in caches.items()}
    labels = [label for label, _ in variants(tables[next(iter(caches))][0].column_names)]
    for i, label in enumerate(labels):
        cells, failing = [], set()
        for method, cache in caches.items():
            kwargs = variants(tables[method][0].column_names)[i][1]
            size, speed, files = measure(tables[method], kwargs, repeat)
            cells += [f"{size / cache.entries:.3f}", f"{speed:,.0f}"]
            if check_readers:
                failing.update(readers_fail(files[0], tables[method][0], scratch))
        rows.append(f"| {label} | {' | '.join(cells)} | {', '.join(sorted(failing)) or 'none'} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def column_table(caches: dict[str, Cache], chosen: dict[str, Callable[[list[str]], dict]]) -> list[str]:
    """Compressed bytes per stored entry, column by column (footer: file bytes minus column chunks)."""
    rows = ["| column | " + " | ".join(f"{m} {label}" for m in caches for label in chosen) + " |",
            "|---|" + "---:|" * (len(caches) * len(chosen))]
    sizes: dict[str, list[str]] = {}
    for method, cache in caches.items():
        for label, make in chosen.items():
            per_column: dict[str, int] = {}
            total = 0
            for table in cache.tables():
                data = write_bytes(table, make(table.column_names))
                total += len(data)
                meta = pq.ParquetFile(io.BytesIO(data)).metadata
                for g in range(meta.num_row_groups):
                    group = meta.row_group(g)
                    for c in range(group.num_columns):
                        name = group.column(c).path_in_schema.split(".")[0]
                        per_column[name] = per_column.get(name, 0) + group.column(c).total_compressed_size
            per_column["(footer and metadata)"] = total - sum(per_column.values())
            per_column["total"] = total
            for name in ["sequence_id", "input_ids", "target_lengths", "target_ids", "target_logprobs", "tail_logprob",
                         "target_counts", "gold_logprob", "(footer and metadata)", "total"]:
                value = per_column.get(name)
                sizes.setdefault(name, []).append("—" if value is None else f"{value / cache.entries:.3f}")
    rows += [f"| {name} | {' | '.join(cells)} |" for name, cells in sizes.items()]
    return rows


def convention_table(caches: dict[str, Cache], chosen: Callable[[list[str]], dict], vocab: int, big_vocab: int) -> list[str]:
    rows = ["| targets | " + " | ".join(f"{m} B/entry" for m in caches) + " |", "|---|" + "---:|" * len(caches)]
    cases = {
        "v1 order (descending logprob)": None,
        "ids ascending within a position (convention change, not applied)": sorted_by_id,
        f"ids mapped into a {big_vocab:,}-id vocabulary (descending logprob)": lambda t: remapped_ids(t, vocab, big_vocab),
        f"ids mapped into {big_vocab:,} ids, ascending within a position": lambda t: sorted_by_id(remapped_ids(t, vocab, big_vocab)),
    }
    for label, transform in cases.items():
        cells = []
        for cache in caches.values():
            tables = cache.tables(transform)
            cells.append(f"{sum(len(write_bytes(t, chosen(t.column_names))) for t in tables) / cache.entries:.3f}")
        rows.append(f"| {label} | {' | '.join(cells)} |")
    return rows


# ---- what users write today ----------------------------------------------------------------


def exact_logprobs(teacher, t: WindowTargets, batch: int = 16) -> np.ndarray:
    """float32 teacher log-probs at the stored ids (what a user's ``.tolist()`` holds; the cache rounds them)."""
    import torch

    out = []
    flat_lengths = t.target_lengths.reshape(len(t), -1).astype(np.int64)
    offset = 0
    with torch.inference_mode():
        for i in range(0, len(t), batch):
            ids = torch.from_numpy(t.input_ids[i : i + batch].astype(np.int64))
            lp = torch.log_softmax(teacher.model(input_ids=ids).logits[:, :-1].float(), -1).reshape(-1, teacher.vocab_size)
            lengths = flat_lengths[i : i + batch].reshape(-1)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            count = int(lengths.sum())
            out.append(lp[torch.from_numpy(rows), torch.from_numpy(t.target_ids[offset : offset + count].astype(np.int64))].numpy())
            offset += count
    return np.concatenate(out).astype(np.float32)


def nested(values: np.ndarray, lengths: np.ndarray, rows: int, arrow_type: pa.DataType) -> pa.ListArray:
    """``list<list<T>>``: one row per window, one inner list per position of ``lengths[i]`` values."""
    inner_offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=inner_offsets[1:])
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(values, type=arrow_type))
    per_row = len(lengths) // rows
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * per_row), inner)


def axolotl_table(t: WindowTargets, logprobs: np.ndarray) -> pa.Table:
    """axolotl's KD dataset columns for the same targets (float32 log-probs, int64 ids and mask)."""
    b, n = t.input_ids.shape
    lengths = t.target_lengths.reshape(-1).astype(np.int64)
    columns = {
        "input_ids": pa.array(list(t.input_ids.astype(np.int64)), type=pa.list_(pa.int64())),
        "target_token_ids": nested(t.target_ids.astype(np.int64), lengths, b, pa.int64()),
        "target_logprobs": nested(logprobs.astype(np.float32), lengths, b, pa.float32()),
        "target_mask": nested(np.ones(len(t.target_ids), dtype=np.int64), lengths, b, pa.int64()),
    }
    if t.target_counts is not None:
        columns["target_counts"] = nested(t.target_counts.astype(np.int64), lengths, b, pa.int64())
    return pa.table(columns)


def jsonl_bytes(table: pa.Table) -> bytes:
    """JSON Lines, one window per line, as ``json.dumps(row)`` of ``.tolist()`` values writes them."""
    return "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode()


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def user_formats_table(caches: dict[str, Cache], chosen: Callable[[list[str]], dict], teacher) -> list[str]:
    import zstandard

    def ours(t: WindowTargets, m: dict, _lp) -> bytes:
        table = to_table(t, m)
        return write_bytes(table, chosen(table.column_names))

    formats: list[tuple[str, Callable]] = [
        ("logitcache v1 shard (chosen writer options)", ours),
        ("axolotl layout, Arrow IPC (what `save_to_disk` writes)", lambda t, m, lp: ipc_bytes(axolotl_table(t, lp))),
        ("axolotl layout, Parquet, pyarrow defaults (snappy, dictionary)", lambda t, m, lp: write_bytes(axolotl_table(t, lp), {})),
        ("axolotl layout, Parquet zstd-3", lambda t, m, lp: write_bytes(axolotl_table(t, lp), {"compression": "zstd"})),
        ("axolotl layout, Parquet zstd-3, log-probs rounded as the cache holds them",
         lambda t, m, lp: write_bytes(axolotl_table(t, t.target_logprobs), {"compression": "zstd"})),
        ("JSON Lines of the same lists", lambda t, m, lp: jsonl_bytes(axolotl_table(t, lp))),
        ("JSON Lines, zstd-3", lambda t, m, lp: zstandard.ZstdCompressor(level=3).compress(jsonl_bytes(axolotl_table(t, lp)))),
    ]
    exact = {name: [exact_logprobs(teacher, t) for t in cache.targets] for name, cache in caches.items()}
    rows = ["| format | " + " | ".join(f"{m} B/token | {m} B/entry" for m in caches) + " | × logitcache |",
            "|---|" + "---:|" * (2 * len(caches) + 1)]
    base = {}
    for label, fn in formats:
        cells, ratio = [], []
        for name, cache in caches.items():
            size = sum(len(fn(t, m, lp)) for t, m, lp in zip(cache.targets, cache.meta, exact[name]))
            base.setdefault(name, size)
            cells += [f"{size / cache.tokens:,.1f}", f"{size / cache.entries:.2f}"]
            ratio.append(f"{size / base[name]:.1f}")
        rows.append(f"| {label} | {' | '.join(cells)} | {' / '.join(ratio)} |")
    return rows


# ---- format v1 vs v2 -----------------------------------------------------------------------


def sharpened_teacher(teacher_dir: Path, out: Path, factor: float) -> Path:
    """A copy of ``teacher_dir`` whose output head is multiplied by ``factor`` (logits times ``factor``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(out)
    return out


def version_sizes(t: WindowTargets, meta: dict, version: int) -> tuple[int, dict[str, int]]:
    """(file bytes, compressed bytes per column) of ``t`` written as a shard of format ``version`` (this writer)."""
    sizes = layout_sizes(t, meta, "v1" if version == 1 else "current")
    return sizes.pop("total"), sizes


def format_table(caches: dict[str, Cache], widths: list[int], vocab: int) -> list[str]:
    rows = ["| cache | distinct ids per position | id width | v1 B/entry | v2 B/entry | v2 − v1 |", "|---|---:|---:|---:|---:|---:|"]
    for name, cache in caches.items():
        for width in [vocab, *widths]:
            transform = None if width == vocab else (lambda t, w=width: remapped_ids(t, vocab, w))
            sizes = {}
            for version in (1, 2):
                sizes[version] = sum(version_sizes(transform(t) if transform else t, m, version)[0]
                                     for t, m in zip(cache.targets, cache.meta)) / cache.entries
            rows.append(f"| {name} | {cache.entries / cache.positions:.2f} | {width:,} | {sizes[1]:.3f} | "
                        f"**{sizes[2]:.3f}** | {sizes[2] - sizes[1]:+.3f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def format_column_table(caches: dict[str, Cache]) -> list[str]:
    names = ["sequence_id", "input_ids", "target_lengths", "target_ids", "target_logprobs", "tail_logprob",
             "target_counts", "gold_logprob", "(footer and metadata)"]
    rows = ["| column | " + " | ".join(f"{c} v1 | {c} v2" for c in caches) + " |", "|---|" + "---:|" * (2 * len(caches))]
    per = {name: [] for name in [*names, "total"]}
    for cache in caches.values():
        for version in (1, 2):
            summed: dict[str, int] = {}
            for t, m in zip(cache.targets, cache.meta):
                for column, size in version_sizes(t, m, version)[1].items():
                    summed[column] = summed.get(column, 0) + size
            for name in names:
                per[name].append("—" if name not in summed else f"{summed[name] / cache.entries:.3f}")
            per["total"].append(f"{sum(summed.values()) / cache.entries:.3f}")
    return rows + [f"| {name} | {' | '.join(cells)} |" for name, cells in per.items()]


def teacher_values(teacher, t: WindowTargets, batch: int = 16) -> dict[str, np.ndarray]:
    """The teacher's own float32 log-probabilities of every stored column of ``t`` (tail: log of the mass
    outside the stored ids, computed in float64 from the float32 log-softmax)."""
    import torch

    lengths = t.target_lengths.reshape(-1).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = t.target_lengths.shape[1]
    entries, gold, tail = [], [], []
    with torch.inference_mode():
        for i in range(0, len(t), batch):
            ids = torch.from_numpy(t.input_ids[i : i + batch].astype(np.int64))
            lp = torch.log_softmax(teacher.model(input_ids=ids).logits[:, :-1].float(), -1).reshape(-1, teacher.vocab_size)
            rows = np.arange(i * positions, i * positions + lp.shape[0])
            stored = [t.target_ids[starts[r] : starts[r] + lengths[r]].astype(np.int64) for r in rows]
            flat_rows = np.repeat(np.arange(lp.shape[0]), lengths[rows])
            flat_ids = np.concatenate(stored)
            entries.append(lp[torch.from_numpy(flat_rows), torch.from_numpy(flat_ids)].numpy())
            gold.append(lp.gather(1, ids[:, 1:].reshape(-1, 1)).squeeze(1).numpy())
            if t.tail_logprob is not None:
                lp64 = lp.double()
                keep = torch.ones_like(lp64, dtype=torch.bool)
                keep[torch.from_numpy(flat_rows), torch.from_numpy(flat_ids)] = False
                tail.append(torch.logsumexp(lp64.masked_fill(~keep, -np.inf), -1).float().numpy())
    out = {"target_logprobs": np.concatenate(entries), "gold_logprob": np.concatenate(gold)}
    if tail:
        out["tail_logprob"] = np.concatenate(tail)
    return out


def stored_as(values: np.ndarray, bits: int, version: int) -> np.ndarray:
    """Teacher float32 log-probabilities as each version stores them: rounded once to ``bits`` mantissa
    bits, then float16 (v1: the same values where float16's normal range holds them) or float32 (v2)."""
    rounded = round_mantissa(values, bits)
    return rounded.astype(np.float16) if version == 1 else rounded


def error_table(caches: dict[str, Cache], teachers: dict[str, object]) -> list[str]:
    """Largest error of each version's stored log-probabilities, on the teacher's own float32 values."""
    rows = ["| cache | column | bits | v1 max abs (nats) | v1 max rel | v1 max abs in p | v1 max rel in p | "
            "v2 max abs (nats) | v2 max rel | v2 max abs in p | v2 max rel in p |", "|---|---|---:|" + "---:|" * 8]
    for name, cache in caches.items():
        exact = [teacher_values(teachers[name], t) for t in cache.targets]
        for column, bits in cache.meta[0]["logprob_mantissa_bits"].items():
            truth = np.concatenate([e[column] for e in exact])
            cells = []
            for version in (1, 2):
                stored = stored_as(truth, bits, version).astype(np.float64)
                finite = np.isfinite(truth) & np.isfinite(stored)
                a, b = truth[finite].astype(np.float64), stored[finite]
                nats = np.abs(b - a)
                rel = nats / np.maximum(np.abs(a), 1e-30)
                cells += [f"{nats.max():.2e}", f"{rel.max():.2e}", f"{np.abs(np.exp(b) - np.exp(a)).max():.2e}",
                          f"{np.abs(np.expm1(b - a)).max():.2e}"]
            rows.append(f"| {name} | {column} | {bits} | {' | '.join(cells)} |")
    return rows


def bits_table(caches: dict[str, Cache], bits: list[int]) -> list[str]:
    """sample caches built with 10 mantissa bits, their target_logprobs rounded to fewer: bytes per entry."""
    rows = ["| cache (built with logprob_bits 10) | " + " | ".join(f"{b} bits v1 | {b} bits v2" for b in bits) + " |",
            "|---|" + "---:|" * (2 * len(bits))]
    for name, cache in caches.items():
        cells = []
        for b in bits:
            for version in (1, 2):
                size = 0
                for t, m in zip(cache.targets, cache.meta):
                    rounded = WindowTargets(**{**t.__dict__, "target_logprobs": round_mantissa(t.target_logprobs, b)})
                    size += version_sizes(rounded, {**m, "params": {**m["params"], "logprob_bits": b}}, version)[0]
                cells.append(f"{size / cache.entries:.3f}")
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return rows


def fixed_point(values: np.ndarray, fraction_bits: int) -> np.ndarray:
    """The encoding not chosen: ``round(-logprob * 2**bits)`` as uint16 (65535 for -inf and below the range)."""
    codes = np.rint(-values.astype(np.float64) * 2.0**fraction_bits)
    return np.where(np.isfinite(codes) & (codes < 65535), codes, 65535).astype(np.uint16)


def encoding_table(caches: dict[str, Cache]) -> list[str]:
    """target_logprobs alone, as each candidate encoding stores the same values: bytes per stored entry."""
    candidates = {
        "float16, PLAIN (v1)": lambda v, b: (v.astype(np.float16), {}),
        "float32, PLAIN": lambda v, b: (v, {}),
        "float32, BYTE_STREAM_SPLIT (v2)": lambda v, b: (v, {"column_encoding": {ELEMENT.format("x"): "BYTE_STREAM_SPLIT"}}),
        "uint16 fixed point, 2^-b nats, PLAIN": lambda v, b: (fixed_point(v, b), {}),
        "uint16 fixed point, 2^-b nats, dictionary": lambda v, b: (fixed_point(v, b), {"use_dictionary": [ELEMENT.format("x")]}),
        "uint16 fixed point, 2^-b nats, DELTA_BINARY_PACKED": lambda v, b: (
            fixed_point(v, b), {"column_encoding": {ELEMENT.format("x"): "DELTA_BINARY_PACKED"}}),
    }
    rows = ["| encoding | " + " | ".join(caches) + " |", "|---|" + "---:|" * len(caches)]
    for label, encode in candidates.items():
        cells = []
        for cache in caches.values():
            bits = cache.meta[0]["logprob_mantissa_bits"]["target_logprobs"]
            size = 0
            for t in cache.targets:
                values, extra = encode(t.target_logprobs, bits)
                lengths = t.target_lengths.reshape(len(t), -1).sum(axis=1)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                table = pa.table({"x": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
                kwargs = {"compression": "zstd", "compression_level": shards_mod.ZSTD_LEVEL,
                          "row_group_size": shards_mod.ROW_GROUP_ROWS, "use_dictionary": False, **extra}
                size += len(write_bytes(table, kwargs))
            cells.append(f"{size / cache.entries:.3f}")
        rows.append(f"| {label} | {' | '.join(cells)} |")
    return rows


def formats_report(args, teacher_dir: Path, corpus: Path, work: Path) -> None:
    """Format v1 vs v2 on the teacher and its sharpened copy (``--formats``)."""
    teachers_dirs = {"": teacher_dir, f" ×{args.sharpen:g}": sharpened_teacher(teacher_dir, work / "sharp", args.sharpen)}
    base = dict(corpus=corpus, seq_len=args.seq_len, batch_size=args.batch_size, shard_size=512, overwrite=True)
    builds = {"topk k=32": {"method": "topk", "k": 32}, "sample N=50": {"method": "sample", "samples": 50}}
    roots, teachers = {}, {}
    for suffix, folder in teachers_dirs.items():
        teacher = None
        for label, extra in builds.items():
            settings = BuildSettings(out=work / f"cache-{len(roots)}", teacher=folder, **base, **extra)
            teacher = teacher or load_teacher(settings.teacher, settings.teacher_options())
            run_build(settings, teacher=teacher)
            name = f"{label}, teacher{suffix}"
            roots[name], teachers[name] = settings.out, teacher
    full_bits = {}
    for suffix, folder in teachers_dirs.items():
        settings = BuildSettings(out=work / f"cache-bits{suffix.strip()}", teacher=folder, method="sample", samples=50,
                                 logprob_bits=10, **base)
        run_build(settings, teacher=teachers[f"sample N=50, teacher{suffix}"])
        full_bits[f"sample N=50, teacher{suffix}"] = Cache(settings.out)
    caches = {name: Cache(root) for name, root in roots.items()}
    vocab = next(iter(caches.values())).manifest["vocab_size"]
    print(f"teacher {teacher_dir} (vocab {vocab}) and the same with logits ×{args.sharpen:g}; seq_len {args.seq_len}; "
          f"{next(iter(caches.values())).tokens:,} tokens; pyarrow {pa.__version__}")
    print("\n## Bytes per stored entry, all columns, v1 vs v2\n\n" + "\n".join(format_table(caches, args.widths, vocab)), flush=True)
    print("\n## By column (ids as they are)\n\n" + "\n".join(format_column_table(caches)), flush=True)
    print("\n## target_logprobs alone under each candidate encoding (b = the cache's mantissa bits as fixed-point "
          "fraction bits)\n\n" + "\n".join(encoding_table(caches)), flush=True)
    print("\n## sample target_logprobs: mantissa bits kept\n\n" + "\n".join(bits_table(full_bits, [6, 7, 8, 10])), flush=True)
    print("\n## Stored log-probabilities against the teacher's float32 values\n\n" + "\n".join(error_table(caches, teachers)))


# ---- real vocabulary widths (the fan-out stand-in) -----------------------------------------


def layout_sizes(t: WindowTargets, meta: dict, layout: str, **override) -> dict[str, int]:
    """Compressed bytes per column (and ``total``) of ``t`` written as ``layout``: ``v1``, ``v2`` (ids by
    log-probability) or ``current`` (this writer); ``override``: ``pq.write_table`` options changed."""
    version = {"v1": 1, "v2": 2}.get(layout, shards_mod.FORMAT_VERSION)
    table = to_table(t, {**meta, "format_version": version})
    kwargs = parquet_options(table)
    for key, value in override.items():  # column encodings are added to the writer's, the rest replaced
        kwargs[key] = {**(kwargs[key] or {}), **value} if key == "column_encoding" else value
    data = write_bytes(table, kwargs)
    parquet = pq.ParquetFile(io.BytesIO(data)).metadata
    columns: dict[str, int] = {}
    for g in range(parquet.num_row_groups):
        for c in range(parquet.num_columns):
            chunk = parquet.row_group(g).column(c)
            name = chunk.path_in_schema.split(".")[0]
            columns[name] = columns.get(name, 0) + chunk.total_compressed_size
    columns["(footer and metadata)"] = len(data) - sum(columns.values())
    columns["total"] = len(data)
    return columns


def wide_caches(args, teacher_dir: Path, corpus: Path, work: Path) -> tuple[dict[str, tuple[WindowTargets, dict]], list[str]]:
    """The stand-in's topk k=32 and sample N=50 targets at each width and id order, with their shard metadata;
    and a table of what each is (sharpening, distinct ids per position and per row group)."""
    settings = BuildSettings(out=work / "windows", teacher=teacher_dir, corpus=corpus, seq_len=args.seq_len,
                             batch_size=args.batch_size, shard_size=512, overwrite=True, packing="stream", method="topk", k=32)
    teacher = load_teacher(settings.teacher, settings.teacher_options())
    run_build(settings, teacher=teacher)
    windows = WindowTargets.concat([read_shard(settings.out / s["file"]) for s in Cache(settings.out).manifest["shards"]])
    meta = shard_metadata(settings.out / "shard-00000.parquet")
    vocab = teacher.vocab_size
    params = {"topk k=32": ("topk", {"k": 32}),
              "sample N=50": ("sample", {"samples": 50, "proposal_temperature": 1.0, "logprob_bits": SAMPLE_LOGPROB_BITS})}
    caches, rows = {}, ["| width | ids numbered | sharpen | cache | distinct ids per position | distinct ids per row group |",
                        "|---:|---|---:|---|---:|---:|"]
    for width in [vocab, *args.wide_widths]:
        for order in ["as the teacher's"] if width == vocab else ["at random", "by frequency"]:
            fanout = Fanout(vocab, width, frequency_order=order == "by frequency")
            sharpen = calibrate(teacher, windows.input_ids, fanout, args.distinct)
            for label, (method, p) in params.items():
                t = wide_targets(teacher, windows, fanout, sharpen, method)
                if method == "sample":  # what a sample build stores (rounded once from float32)
                    t = replace(t, target_logprobs=round_mantissa(t.target_logprobs, p["logprob_bits"]))
                group = shards_mod.ROW_GROUP_ROWS
                distinct = np.mean([len(np.unique(t.select(np.arange(i, min(i + group, len(t)))).target_ids))
                                    for i in range(0, len(t), group)])
                name = f"{label}, {width:,} ids" + ("" if width == vocab else f", numbered {order}")
                caches[name] = (t, {**meta, "method": method, "params": p})
                rows.append(f"| {width:,} | {order} | {sharpen:.3f} | {label} | {len(t.target_ids) / t.target_lengths.size:.2f} | "
                            f"{distinct:,.0f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    return caches, rows


WIDE_LEVERS: dict[str, tuple[str, dict]] = {
    "v1": ("v1", {}),
    "v2": ("v2", {}),
    "v3 = v4": ("current", {}),
    "zstd-7": ("current", {"compression_level": 7}),
    "zstd-9": ("current", {"compression_level": 9}),
    "row groups of 512 windows": ("current", {"row_group_size": 512}),
    # as many positions as a row group of 128 windows of 2,048 tokens (16 x 128 tokens)
    "row groups of 2,048 windows": ("current", {"row_group_size": 2048}),
    "target_ids PLAIN": ("current", {"use_dictionary": [ELEMENT.format(c) for c in ("target_lengths", "target_counts")]}),
    "target_ids BYTE_STREAM_SPLIT": ("current", {"use_dictionary": [ELEMENT.format(c) for c in ("target_lengths", "target_counts")],
                                                 "column_encoding": {ELEMENT.format("target_ids"): "BYTE_STREAM_SPLIT"}}),
}
# sample only: format v4's cache without log-probabilities (--logprob-bits 0), and levers not taken
SAMPLE_LEVERS = ["v4 ids and counts only (--logprob-bits 0)", "the same, row groups of 2,048 windows",
                 "sample ids ascending (not taken)", f"sample --logprob-bits {SAMPLE_LOGPROB_BITS - 1}"]


def entropy_bits(values: np.ndarray) -> float:
    """Order-0 (empirical) entropy in bits per value of ``values [S]`` or of the rows of ``values [S, c]``."""
    _, counts = np.unique(values, return_counts=True, axis=0)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy_floor_row(name: str, t: WindowTargets, meta: dict) -> str:
    """What an ideal order-0 coder per row group needs for a sample cache's per-id columns (bits per entry),
    against what the writer stores: a floor for any column-by-column encoding that does not model context."""
    group = shards_mod.ROW_GROUP_ROWS
    bits = {"ids": [], "counts": [], "logprobs": [], "logprobs given the count": []}
    for first in range(0, len(t), group):
        g = t.select(np.arange(first, min(first + group, len(t))))
        counts = g.target_counts.astype(np.uint32)
        bits["ids"].append(entropy_bits(g.target_ids))
        bits["counts"].append(entropy_bits(counts))
        bits["logprobs"].append(entropy_bits(g.target_logprobs))
        bits["logprobs given the count"].append(entropy_bits(np.stack([g.target_logprobs.view(np.uint32), counts], 1))
                                                - bits["counts"][-1])
    mean = {k: float(np.mean(v)) for k, v in bits.items()}
    sizes = layout_sizes(t, meta, "current")
    entries = len(t.target_ids)
    per_position = sum(sizes[c] for c in ("sequence_id", "input_ids", "target_lengths", "gold_logprob",
                                          "(footer and metadata)")) / entries
    floor = (mean["ids"] + mean["counts"] + mean["logprobs"]) / 8 + per_position
    given = (mean["ids"] + mean["counts"] + mean["logprobs given the count"]) / 8 + per_position
    return (f"| {name} | " + " | ".join(f"{v:.2f}" for v in mean.values()) + f" | {per_position:.3f} | {floor:.3f} | "
            f"{given:.3f} | {sizes['total'] / entries:.3f} |")


def wide_report(args, teacher_dir: Path, corpus: Path, work: Path) -> None:
    """B/entry of v1, v2 and this writer on the fan-out stand-in at real widths (``--wide``)."""
    caches, what = wide_caches(args, teacher_dir, corpus, work)
    print(f"teacher {teacher_dir}; seq_len {args.seq_len}; pyarrow {pa.__version__}; fan-out stand-in "
          f"(benchmarks/wide_vocab.py), calibrated to {args.distinct} distinct ids per position at N=50")
    print("\n## The stand-in caches\n\n" + "\n".join(what), flush=True)
    names = ["input_ids", "target_lengths", "target_ids", "target_logprobs", "tail_logprob", "target_counts", "gold_logprob",
             "(footer and metadata)", "total"]
    totals = ["| cache | " + " | ".join(WIDE_LEVERS) + " |", "|---|" + "---:|" * len(WIDE_LEVERS)]
    by_column = ["| cache | layout | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for name, (t, meta) in caches.items():
        entries = len(t.target_ids)
        cells = []
        for label, (layout, override) in WIDE_LEVERS.items():
            sizes = layout_sizes(t, meta, layout, **override)
            cells.append(f"{sizes['total'] / entries:.3f}")
            if not override:
                by_column.append(f"| {name} | {label} | " + " | ".join(
                    "—" if n not in sizes else f"{sizes[n] / entries:.3f}" for n in names) + " |")
        if t.target_counts is not None:
            ids_only = {**meta, "params": {**meta["params"], "logprob_bits": 0}}
            sizes = layout_sizes(t, ids_only, "current")
            by_column.append(f"| {name} | v4, --logprob-bits 0 | " + " | ".join(
                "—" if n not in sizes else f"{sizes[n] / entries:.3f}" for n in names) + " |")
            cells.append(f"{sizes['total'] / entries:.3f}")
            cells.append(f"{layout_sizes(t, ids_only, 'current', row_group_size=2048)['total'] / entries:.3f}")
            # levers not taken: ids ascending, as topk; fewer mantissa bits
            cells.append(f"{layout_sizes(shards_mod.ascending_ids(t), meta, 'current')['total'] / entries:.3f}")
            fewer = {**meta, "params": {**meta["params"], "logprob_bits": SAMPLE_LOGPROB_BITS - 1}}
            rounded = replace(t, target_logprobs=round_mantissa(t.target_logprobs, SAMPLE_LOGPROB_BITS - 1))
            cells.append(f"{layout_sizes(rounded, fewer, 'current')['total'] / entries:.3f}")
        else:
            cells += ["—"] * len(SAMPLE_LEVERS)
        totals.append(f"| {name} | " + " | ".join(cells) + " |")
        print(totals[-1], file=sys.stderr, flush=True)
    totals[0] += " " + " | ".join(SAMPLE_LEVERS) + " |"
    totals[1] += "---:|" * len(SAMPLE_LEVERS)
    print("\n## Bytes per stored entry, all columns\n\n" + "\n".join(totals), flush=True)
    print("\n## By column\n\n" + "\n".join(by_column))
    floors = ["| cache | ids (bits/entry) | counts | log-probs | log-probs given the count | per-position columns "
              "as stored (B/entry) | floor: order-0 sum + per-position (B/entry) | the same, log-probs given the count "
              "| v4 stores |", "|---|" + "---:|" * 8]
    floors += [entropy_floor_row(name, t, meta) for name, (t, meta) in caches.items() if t.target_counts is not None]
    print("\n## Sample caches with log-probabilities: order-0 entropy per row group\n\n" + "\n".join(floors))


# ---- main ----------------------------------------------------------------------------------


def chosen_options(names: list[str]) -> dict:
    """What ``write_shard`` passes to ``pq.write_table`` for a v2 shard (kept in step with
    logitcache.cache.format.parquet_options)."""
    return options(names, level=shards_mod.ZSTD_LEVEL, row_group=shards_mod.ROW_GROUP_ROWS, dictionary=CHOSEN_DICTIONARY,
                   encoding={c: "BYTE_STREAM_SPLIT" for c in HALF_COLUMNS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_arguments(parser)
    parser.add_argument("--repeat", type=int, default=2, help="writes per variant (best CPU time kept)")
    parser.add_argument("--big-vocab", type=int, default=151_936, help="vocabulary for the id-width check")
    parser.add_argument("--sharp-tau", type=float, default=0.5,
                        help="also a sample cache drawn at this proposal temperature: fewer distinct ids per "
                             "position, a stand-in for a sharper teacher (0: skip)")
    parser.add_argument("--no-readers", action="store_true", help="skip the polars/duckdb/datasets read-back")
    parser.add_argument("--formats", action="store_true", help="measure shard format v1 against v2 instead")
    parser.add_argument("--widths", type=int, nargs="*", default=[32_768, 262_144],
                        help="--formats: id widths the ids are mapped into")
    parser.add_argument("--sharpen", type=float, default=1.25,
                        help="--formats: factor on the sharpened teacher copy's logits")
    parser.add_argument("--wide", action="store_true",
                        help="measure v1, v2 and this writer on the fan-out stand-in at real widths instead")
    parser.add_argument("--wide-widths", type=int, nargs="*", default=[32_768, 131_072, 262_144],
                        help="--wide: vocabulary widths (multiples of the teacher's)")
    parser.add_argument("--distinct", type=float, default=18.2,
                        help="--wide: distinct ids per position at N=50 the stand-in is sharpened to (the issue's real "
                             "teacher: 17.6-18.9)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    teacher_dir, corpus = ensure_teacher(args.teacher, args.corpus, args.work)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = small_corpus(corpus, work / "bench.jsonl", args.corpus_bytes)
        if args.formats:
            formats_report(args, teacher_dir, corpus, work)
            return
        if args.wide:
            wide_report(args, teacher_dir, corpus, work)
            return
        base = dict(teacher=teacher_dir, corpus=corpus, seq_len=args.seq_len, batch_size=args.batch_size, shard_size=512, overwrite=True,
                    packing="stream")
        builds = {"topk": {"method": "topk", "k": 32}, "sample": {"method": "sample", "samples": 50}}
        if args.sharp_tau:
            builds[f"sample τ={args.sharp_tau:g}"] = {"method": "sample", "samples": 50, "proposal_temperature": args.sharp_tau}
        teacher = None
        roots = {}
        for i, (name, extra) in enumerate(builds.items()):
            settings = BuildSettings(out=work / f"cache-{i}", **base, **extra)
            teacher = teacher or load_teacher(settings.teacher, settings.teacher_options())
            run_build(settings, teacher=teacher)
            roots[name] = settings.out
        caches = {m: Cache(r) for m, r in roots.items()}
        vocab = caches["topk"].manifest["vocab_size"]
        print(f"teacher {teacher_dir}; vocab {vocab}; seq_len {args.seq_len}; pyarrow {pa.__version__}; "
              f"write MB/s = MB of Arrow data per CPU second of pq.write_table, best of {args.repeat}")
        lines = ["| cache | tokens | entries/position | bytes/entry (`inspect`) | bytes/token | teacher ppl |",
                 "|---|---:|---:|---:|---:|---:|"]
        for name, root in roots.items():
            s = summarize(root)
            lines.append(f"| {name} {s['params']} | {s['tokens']:,} | {s['mean_ids_per_position']:.2f} | "
                         f"{s['bytes_per_entry']:.3f} | {s['bytes_per_token']:.2f} | {s['teacher_perplexity']:.1f} |")
        print("\n## Caches as built by `run_build` (the current `write_shard`)\n\n" + "\n".join(lines), flush=True)
        print("\n## Writer variants (the same targets re-written; bytes per stored entry, all columns)\n\n" + "\n".join(
            variant_table(caches, args.repeat, work, not args.no_readers)), flush=True)
        print("\n## Each column alone, bytes per stored entry\n\n" + "\n".join(column_grid(caches)), flush=True)
        per_column = {"v1": lambda names: options(names), "chosen": chosen_options}
        print("\n## Bytes per entry by column, v1 vs chosen\n\n" + "\n".join(column_table(caches, per_column)), flush=True)
        print("\n## Id order and id width (chosen writer options)\n\n" + "\n".join(
            convention_table(caches, chosen_options, vocab, args.big_vocab)), flush=True)
        print("\n## Same targets in the formats users write today (float32 log-probs recomputed from the teacher)\n\n"
              + "\n".join(user_formats_table(caches, chosen_options, teacher)))


if __name__ == "__main__":
    main()
