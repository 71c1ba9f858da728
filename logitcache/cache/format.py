"""Shard format v2: one Parquet row per window, fixed Arrow schema per method, zstd.

A row of ``n`` tokens has ``n - 1`` positions; position ``t`` holds the teacher's distribution
over token ``t + 1``. Per-id columns are flat and position-major: the ids of position 0 come
first, then those of position 1, and so on; ``target_lengths[t]`` says how many ids position
``t`` has. Rows may differ in length (v2; v1 rows were all ``seq_len``): a row is one document
(or a piece of one) under ``packing: documents``. See schemas/SHARD_FORMAT.md for every column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import LogitcacheError
from logitcache.files import write_atomic

FORMAT_VERSION = 2


READABLE_VERSIONS = (1, 2)  # v1: every row seq_len tokens, no layout record


METADATA_KEY = b"logitcache"


METHODS = ("topk", "sample")


ROW_GROUP_ROWS = 128


ZSTD_LEVEL = 5  # vs 3: ~2 % smaller shards for ~25 % more write CPU (benchmarks/RESULTS.md)


# Integer columns whose values recur within a row group (ids, draw counts, per-position lengths) are
# dictionary-encoded: the dictionary holds only the ids a row group uses, so its bit-packed indices
# stay narrow whatever the vocabulary. Everything else is PLAIN: dictionaries make float16 and
# input_ids larger, and BYTE_STREAM_SPLIT on float16 is not readable by DuckDB 2.0. Measured in
# benchmarks/bench_storage.py (demo teacher: sample N=50 -11% bytes/entry, topk k=32 -6%, writes no slower).
DICTIONARY_COLUMNS = ("target_lengths", "target_ids", "target_counts")


# Largest values the fixed dtypes hold; builds beyond them are refused up front.
MAX_IDS_PER_POSITION = np.iinfo(np.uint16).max


MAX_VOCAB = np.iinfo(np.int32).max


_COMMON_HEAD = [
    pa.field("sequence_id", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("target_lengths", pa.list_(pa.uint16()), nullable=False),
    pa.field("target_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("target_logprobs", pa.list_(pa.float16()), nullable=False),
]


_GOLD = pa.field("gold_logprob", pa.list_(pa.float16()), nullable=False)


_BY_METHOD = {
    "topk": pa.field("tail_logprob", pa.list_(pa.float16()), nullable=False),
    "sample": pa.field("target_counts", pa.list_(pa.uint16()), nullable=False),
}


def shard_schema(method: str) -> pa.Schema:
    """The Arrow schema every shard of ``method`` is written with (metadata aside)."""
    if method not in _BY_METHOD:
        raise LogitcacheError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return pa.schema([*_COMMON_HEAD, _BY_METHOD[method], _GOLD])


FLOAT32_MANTISSA_BITS = 23


FLOAT16_MANTISSA_BITS = 10


def round_float16(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (float32 or float16) as float16 with ``bits`` stored mantissa bits (of 10), rounded once.

    To nearest, ties away from zero: relative error at most ``2**-(bits + 1)`` for values in
    float16's normal range (magnitudes from 2**-14 to 65504); infinities stay infinite. float32
    input is rounded in float32 and then converted exactly, so there is no second rounding. Zeroed
    low bits make the column far more compressible while every reader still sees plain float16.
    """
    if values.dtype == np.float16:
        if bits >= FLOAT16_MANTISSA_BITS:
            return values
        drop = FLOAT16_MANTISSA_BITS - bits
        raw = values.view(np.uint16)
        finite = (raw & 0x7C00) != 0x7C00
        rounded = ((raw.astype(np.uint32) + (1 << (drop - 1))) >> drop << drop).astype(np.uint16)
        overflow = (rounded & 0x7C00) == 0x7C00  # only the largest finite magnitudes: keep them as they are
        return np.where(finite & ~overflow, rounded, raw).view(np.float16)
    values = np.ascontiguousarray(values, dtype=np.float32)
    drop = FLOAT32_MANTISSA_BITS - min(bits, FLOAT16_MANTISSA_BITS)
    raw = values.view(np.uint32)
    finite = (raw & 0x7F800000) != 0x7F800000
    rounded = (raw + np.uint32(1 << (drop - 1))) >> np.uint32(drop) << np.uint32(drop)
    out = np.where(finite, rounded, raw).view(np.float32)
    largest = float(np.finfo(np.float16).max)  # 65504: rounding up past it would make a finite value infinite
    out = np.where(np.abs(values) <= largest, np.clip(out, -largest, largest), out)
    return out.astype(np.float16)


@dataclass
class WindowTargets:
    """Sparse teacher targets for ``B`` rows of up to ``n`` tokens, as numpy arrays.

    Per-id arrays are flat, row-major then position-major, ``S = target_lengths.sum()``. A row of
    ``token_counts[b] < n`` tokens is padded on the right: its padding has input id 0, no ids
    (``target_lengths`` 0) and gold/tail 0.
    """

    sequence_ids: np.ndarray  # [B] int64
    input_ids: np.ndarray  # [B, n] int32
    target_lengths: np.ndarray  # [B, n-1] uint16
    target_ids: np.ndarray  # [S] int32
    target_logprobs: np.ndarray  # [S] float16
    gold_logprob: np.ndarray  # [B, n-1] float16
    tail_logprob: np.ndarray | None = None  # [B, n-1] float16 (topk)
    target_counts: np.ndarray | None = None  # [S] uint16 (sample)
    token_counts: np.ndarray | None = None  # [B] int64 tokens of each row; None: every row has n

    @property
    def method(self) -> str:
        return "sample" if self.target_counts is not None else "topk"

    def __len__(self) -> int:
        return int(self.sequence_ids.shape[0])

    def tokens(self) -> np.ndarray:
        """``[B] int64``: the tokens of each row, padding not counted."""
        if self.token_counts is None:
            return np.full(len(self), self.input_ids.shape[1], dtype=np.int64)
        return self.token_counts

    def padded(self, n: int) -> WindowTargets:
        """The same rows padded on the right to ``n >= self.n`` tokens."""
        extra = n - self.input_ids.shape[1]
        if extra == 0:
            return self

        def pad(rows: np.ndarray | None) -> np.ndarray | None:
            return None if rows is None else np.pad(rows, ((0, 0), (0, extra)))

        return replace(self, input_ids=pad(self.input_ids), target_lengths=pad(self.target_lengths),
                       gold_logprob=pad(self.gold_logprob), tail_logprob=pad(self.tail_logprob), token_counts=self.tokens())

    def select(self, rows: np.ndarray) -> WindowTargets:
        """Rows ``rows [R] int64`` (in that order), per-id arrays gathered to match."""
        rows = np.asarray(rows, dtype=np.int64)
        per_row = self.target_lengths.sum(axis=1, dtype=np.int64)
        sizes = per_row[rows]
        starts = np.cumsum(per_row)[rows] - sizes
        # the flat ranges [starts[i], starts[i] + sizes[i]) one after the other
        entries = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))

        def take(name: str, index: np.ndarray) -> np.ndarray | None:
            values = getattr(self, name)
            return None if values is None else values[index]

        return WindowTargets(
            sequence_ids=self.sequence_ids[rows], input_ids=self.input_ids[rows], target_lengths=self.target_lengths[rows],
            target_ids=take("target_ids", entries), target_logprobs=take("target_logprobs", entries),
            gold_logprob=self.gold_logprob[rows], tail_logprob=take("tail_logprob", rows),
            target_counts=take("target_counts", entries), token_counts=take("token_counts", rows),
        )

    @staticmethod
    def concat(parts: list[WindowTargets]) -> WindowTargets:
        """Rows of ``parts`` one after the other, padded to the longest where they differ."""
        n = max(p.input_ids.shape[1] for p in parts)
        ragged = any(p.token_counts is not None or p.input_ids.shape[1] != n for p in parts)
        if ragged:
            parts = [p.padded(n) for p in parts]

        def cat(name: str) -> np.ndarray | None:
            if name == "token_counts":
                return np.concatenate([p.tokens() for p in parts]) if ragged else None
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return WindowTargets(**{name: cat(name) for name in WindowTargets.__dataclass_fields__})


MAX_VALUES_PER_COLUMN = np.iinfo(np.int32).max  # Arrow list offsets are int32


def _list_column(values: np.ndarray, row_lengths: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(row_lengths) + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    if offsets[-1] != len(values):
        raise ValueError(f"row lengths add up to {offsets[-1]} but {len(values)} values were given")
    if offsets[-1] > MAX_VALUES_PER_COLUMN:
        raise LogitcacheError(
            f"a shard would hold {offsets[-1]} values in one column, more than Arrow lists address; "
            "lower --shard-size"
        )
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=arrow_type))


def to_table(targets: WindowTargets, metadata: dict) -> pa.Table:
    """Arrow table of ``targets`` in the current schema (rows without their padding), with ``metadata``
    as JSON key-value metadata."""
    b, n = targets.input_ids.shape
    tokens = targets.tokens()
    positions = tokens - 1
    ids_per_window = targets.target_lengths.reshape(b, n - 1).sum(axis=1, dtype=np.int64)
    real_tokens = real_positions = slice(None)  # every row full: the arrays as they are
    if targets.token_counts is not None:
        real_tokens = np.arange(n) < tokens[:, None]
        real_positions = real_tokens[:, 1:]

    def per_position(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
        return _list_column(values.reshape(b, n - 1)[real_positions].reshape(-1), positions, arrow_type)

    columns = {
        "sequence_id": pa.array(targets.sequence_ids, type=pa.int64()),
        "input_ids": _list_column(targets.input_ids[real_tokens].reshape(-1), tokens, pa.int32()),
        "target_lengths": per_position(targets.target_lengths, pa.uint16()),
        "target_ids": _list_column(targets.target_ids, ids_per_window, pa.int32()),
        "target_logprobs": _list_column(targets.target_logprobs, ids_per_window, pa.float16()),
    }
    if targets.method == "topk":
        columns["tail_logprob"] = per_position(targets.tail_logprob, pa.float16())
    else:
        columns["target_counts"] = _list_column(targets.target_counts, ids_per_window, pa.uint16())
    columns["gold_logprob"] = per_position(targets.gold_logprob, pa.float16())
    schema = shard_schema(targets.method).with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return pa.table(columns, schema=schema)


def write_shard(path: Path, targets: WindowTargets, metadata: dict, zstd_level: int = ZSTD_LEVEL) -> None:
    """Write ``targets`` as one Parquet shard at ``path``, atomically."""
    table = to_table(targets, metadata)

    def write(tmp: Path) -> None:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=zstd_level,
            row_group_size=ROW_GROUP_ROWS,
            # Leaf paths: a bare column name is silently ignored for list columns.
            use_dictionary=[f"{name}.list.element" for name in DICTIONARY_COLUMNS if name in table.column_names],
            write_statistics=["sequence_id"],
        )

    write_atomic(path, write)


def shard_metadata(path: Path) -> dict:
    """The logitcache key-value metadata a shard carries (its self-description)."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise LogitcacheError(f"{path}: not a readable Parquet file ({exc})") from exc
    if METADATA_KEY not in raw:
        raise LogitcacheError(f"{path}: Parquet file without logitcache metadata")
    return json.loads(raw[METADATA_KEY])


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, zero-copy where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def from_table(table: pa.Table) -> WindowTargets:
    """Decode rows of a shard (a table or one row group) back into :class:`WindowTargets`."""
    b = table.num_rows
    if b == 0:
        raise LogitcacheError("no rows to decode")
    input_ids, offsets = _flat(table.column("input_ids"))
    tokens = np.diff(offsets).astype(np.int64)
    n = int(tokens.max())
    full = bool((tokens == n).all())
    real = None if full else np.arange(n) < tokens[:, None]

    def rows(values: np.ndarray, width: int) -> np.ndarray:
        if full:
            return values.reshape(b, width)
        out = np.zeros((b, width), dtype=values.dtype)
        out[real[:, :width] if width == n else real[:, 1:]] = values
        return out

    def per_position(name: str) -> np.ndarray | None:
        return rows(_flat(table.column(name))[0], n - 1) if name in table.column_names else None

    names = table.column_names
    return WindowTargets(
        sequence_ids=table.column("sequence_id").to_numpy(),
        input_ids=rows(input_ids, n),
        target_lengths=per_position("target_lengths"),
        target_ids=_flat(table.column("target_ids"))[0],
        target_logprobs=_flat(table.column("target_logprobs"))[0],
        gold_logprob=per_position("gold_logprob"),
        tail_logprob=per_position("tail_logprob"),
        target_counts=_flat(table.column("target_counts"))[0] if "target_counts" in names else None,
        token_counts=None if full else tokens,
    )


def read_shard(path: Path) -> WindowTargets:
    return from_table(pq.read_table(path))
