"""Shard format v4 (v1, v2 and v3 still read): one Parquet row per window, fixed Arrow schema per method, zstd.

A row of ``n`` tokens has ``n - 1`` positions; position ``t`` holds the teacher's distribution
over token ``t + 1``. Per-id columns are flat and position-major: the ids of position 0 come
first, then those of position 1, and so on; ``target_lengths[t]`` says how many ids position
``t`` has. See schemas/SHARD_FORMAT.md for every column.

Format v2 differs from v1 in two ways:

- rows may differ in length (v1 rows were all ``seq_len``): a row is one document (or a piece of
  one, or one chat) under ``layout.packing: documents``;
- log-probabilities are float32, a Parquet type every engine reads, with their mantissas rounded to a
  few bits (:func:`round_mantissa`; bits per column in the shard metadata, ``logprob_mantissa_bits``)
  and BYTE_STREAM_SPLIT-encoded, so that the zeroed low bytes cost nearly nothing; v1 stored float16.
  In memory (:class:`WindowTargets`) log-probabilities are float32 whatever the version: only
  :func:`to_table` and :func:`decode_logprobs` know the difference.

Format v3 adds one per-position column to the caches of chat and prompt-response corpora
(:func:`has_behavior`): ``behavior_logprob[t]``, the log-probability with which the model that generated
the response drew token ``t + 1`` (``logitcache generate``'s ``response_logprobs``), NaN where the token
was not drawn by a recorded sampler (the prompt, the template's text, a reference answer). On-policy
losses importance-weight stale samples with it. And a ``topk`` shard holds each position's ids ascending
(:func:`ids_ascending`), where v1 and v2 held them by descending log-probability. Everything else is v2's.

Format v4 lets a ``sample`` cache leave out ``target_logprobs`` (:func:`stores_logprobs`: built with
``--logprob-bits 0``): its ids and counts only, the RS-KD paper's cache, which is all that RS-KD needs for
draws from the teacher itself (proposal temperature 1). In memory its ``target_logprobs`` is None. Every
other shard is v3's.
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

FORMAT_VERSION = 4


READABLE_VERSIONS = (1, 2, 3, 4)  # older caches are read as they are, or rewritten by `logitcache convert`


METADATA_KEY = b"logitcache"


METHODS = ("topk", "sample")


ROW_GROUP_ROWS = 128


ZSTD_LEVEL = 5  # vs 3: ~2 % smaller shards for ~25 % more write CPU (benchmarks/RESULTS.md)


# Integer columns whose values recur within a row group (ids, draw counts, per-position lengths) are
# dictionary-encoded: the dictionary holds only the ids a row group uses, so its bit-packed indices
# stay narrow whatever the vocabulary (PLAIN ascending ids are smaller still, but slower to read:
# benchmarks/RESULTS.md). v2's float32 log-probabilities are BYTE_STREAM_SPLIT (their bytes in
# separate streams: the rounded-off low bytes are all zero and compress away; pyarrow writes it,
# DuckDB, Polars, Spark's parquet-java and Trino read it for FLOAT). Everything else is PLAIN.
# Measured in benchmarks/bench_storage.py (benchmarks/RESULTS.md).
DICTIONARY_COLUMNS = ("target_lengths", "target_ids", "target_counts")


# The first format version whose topk shards hold each position's ids ascending (v1 and v2: by descending
# log-probability): neighbouring positions share most of their top-k ids, and in ascending order zstd
# finds those runs (benchmarks/RESULTS.md, issue 17). Reading does not depend on the order. Sample shards
# keep the descending order: ascending ids made them larger (+0.01 to +0.08 B/entry), and their 7-bit log-probabilities tie often, where that order is the only record of
# the teacher's unrounded ranking, which BiLD's and RLKD's top-k picks use.
IDS_ASCENDING_SINCE = 3


def ids_ascending(version: int, method: str) -> bool:
    """Whether ``method`` shards of format ``version`` hold each position's ids ascending (else by descending
    log-probability)."""
    return method == "topk" and version >= IDS_ASCENDING_SINCE


# Largest values the fixed dtypes hold; builds beyond them are refused up front.
MAX_IDS_PER_POSITION = np.iinfo(np.uint16).max


MAX_VOCAB = np.iinfo(np.int32).max


BEHAVIOR_COLUMN = "behavior_logprob"


LOGPROB_COLUMNS = ("target_logprobs", "tail_logprob", "gold_logprob", BEHAVIOR_COLUMN)


# Mantissa bits every v2 log-probability column keeps but a sample cache's target_logprobs, which keeps
# params.logprob_bits: float16's 10, relative error <= 2**-11.
LOGPROB_BITS = 10


FLOAT32_MANTISSA_BITS = 23


def logprob_bits(method: str, params: dict) -> dict[str, int]:
    """Mantissa bits each v2 log-probability column of a ``method`` cache with ``params`` keeps."""
    bits = {"target_logprobs": params.get("logprob_bits", LOGPROB_BITS) if method == "sample" else LOGPROB_BITS,
            "gold_logprob": LOGPROB_BITS}
    if not stores_logprobs(method, params):
        del bits["target_logprobs"]
    if method == "topk":
        bits["tail_logprob"] = LOGPROB_BITS
    return bits


# The first format version whose sample shards may go without target_logprobs (params.logprob_bits 0).
LOGPROBS_OPTIONAL_SINCE = 4


def stores_logprobs(method: str, params: dict) -> bool:
    """Whether a ``method`` cache built with ``params`` stores ``target_logprobs``: always, but a sample cache
    built with ``logprob_bits`` 0 (format v4 on), which stores the drawn ids and their counts only."""
    return method == "topk" or params.get("logprob_bits", LOGPROB_BITS) > 0


def logprobs_problem(method: str, params: dict, version: int) -> str | None:
    """Why a ``method`` cache of format ``version`` with ``params`` cannot be (as one line), or None: a cache
    without log-probabilities must be a sample cache of v4 on, drawn from the teacher itself (proposal
    temperature 1: its target is ``count / N``; a tempered proposal's weights need the log-probabilities)."""
    if stores_logprobs(method, params):
        return None
    if version < LOGPROBS_OPTIONAL_SINCE:
        return (f"params.logprob_bits 0 (no target_logprobs) in a format v{version} cache: caches go without them "
                f"from v{LOGPROBS_OPTIONAL_SINCE} on")
    if params.get("proposal_temperature", 1.0) != 1.0:
        return (f"params.logprob_bits 0 with proposal_temperature {params['proposal_temperature']}: the draws of a "
                "tempered proposal are weighted by the log-probabilities such a cache does not have")
    return None


def has_behavior(version: int, corpus_format: str) -> bool:
    """Whether shards of format ``version`` built from a ``corpus_format`` corpus (the manifest's
    ``layout.format``) carry :data:`BEHAVIOR_COLUMN`: v3 caches of chat and prompt-response corpora."""
    return version >= 3 and corpus_format != "text"


def count_type(samples: int) -> pa.DataType:
    """The narrowest unsigned type that holds a draw count of ``samples`` draws."""
    return pa.uint8() if samples <= np.iinfo(np.uint8).max else pa.uint16()


def shard_schema(method: str, version: int = FORMAT_VERSION, samples: int | None = None, behavior: bool = False,
                 logprobs: bool = True) -> pa.Schema:
    """The Arrow schema every shard of ``method`` is written with in format ``version`` (metadata aside).

    ``samples`` (sample caches, v2 on): N, which picks the count type. ``behavior`` (v3 on): the shards
    carry :data:`BEHAVIOR_COLUMN` (see :func:`has_behavior`). ``logprobs`` False (sample caches, v4 on):
    no ``target_logprobs`` (see :func:`stores_logprobs`).
    """
    if method not in METHODS:
        raise LogitcacheError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if version not in READABLE_VERSIONS:
        raise LogitcacheError(f"format version {version}: this logitcache reads versions {READABLE_VERSIONS}")
    logprob = pa.float16() if version == 1 else pa.float32()
    counts = pa.uint16() if version == 1 else count_type(samples or MAX_IDS_PER_POSITION)
    field = lambda name, kind: pa.field(name, pa.list_(kind), nullable=False)  # noqa: E731
    if behavior and version < 3:
        raise LogitcacheError(f"format version {version} has no {BEHAVIOR_COLUMN} column (v3 on)")
    if not logprobs and (method != "sample" or version < LOGPROBS_OPTIONAL_SINCE):
        raise LogitcacheError(f"{method} shards of format version {version} store target_logprobs "
                              f"(sample shards may go without from v{LOGPROBS_OPTIONAL_SINCE} on)")
    own = field("tail_logprob", logprob) if method == "topk" else field("target_counts", counts)
    return pa.schema([
        pa.field("sequence_id", pa.int64(), nullable=False),
        field("input_ids", pa.int32()),
        field("target_lengths", pa.uint16()),
        field("target_ids", pa.int32()),
        *([field("target_logprobs", logprob)] if logprobs else []),
        own,
        field("gold_logprob", logprob),
        *([field(BEHAVIOR_COLUMN, logprob)] if behavior else []),
    ])


def round_mantissa(values: np.ndarray, bits: int) -> np.ndarray:
    """``values [...]`` as float32 with ``bits`` stored mantissa bits (of 23), rounded once.

    To nearest, ties away from zero: relative error at most ``2**-(bits + 1)`` (for float32 input;
    float16 input with at most ``bits`` bits is returned exactly); infinities and NaN stay as they are.
    Zeroed low bits make the column far more compressible while every reader still sees plain float32.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    drop = FLOAT32_MANTISSA_BITS - bits
    raw = values.view(np.uint32)
    finite = (raw & 0x7F800000) != 0x7F800000
    rounded = ((raw + np.uint32(1 << (drop - 1))) >> np.uint32(drop) << np.uint32(drop)).view(np.float32)
    return np.where(finite & np.isfinite(rounded), rounded, values)  # the largest finite values are kept as they are


@dataclass
class WindowTargets:
    """Sparse teacher targets for ``B`` rows of up to ``n`` tokens, as numpy arrays.

    Per-id arrays are flat, row-major then position-major, ``S = target_lengths.sum()``. A row of
    ``token_counts[b] < n`` tokens is padded on the right: its padding has input id 0, no ids
    (``target_lengths`` 0), gold/tail 0 and behaviour NaN (not drawn).
    """

    sequence_ids: np.ndarray  # [B] int64
    input_ids: np.ndarray  # [B, n] int32
    target_lengths: np.ndarray  # [B, n-1] uint16
    target_ids: np.ndarray  # [S] int32
    target_logprobs: np.ndarray | None  # [S] float32; None: a v4 sample cache without them (stores_logprobs)
    gold_logprob: np.ndarray  # [B, n-1] float32
    tail_logprob: np.ndarray | None = None  # [B, n-1] float32 (topk)
    target_counts: np.ndarray | None = None  # [S] uint8 or uint16 (sample)
    token_counts: np.ndarray | None = None  # [B] int64 tokens of each row; None: every row has n
    behavior_logprob: np.ndarray | None = None  # [B, n-1] float32, NaN where not sampled (v3 chat caches)

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

        def pad(rows: np.ndarray | None, value: float = 0) -> np.ndarray | None:
            return None if rows is None else np.pad(rows, ((0, 0), (0, extra)), constant_values=value)

        return replace(self, input_ids=pad(self.input_ids), target_lengths=pad(self.target_lengths),
                       gold_logprob=pad(self.gold_logprob), tail_logprob=pad(self.tail_logprob), token_counts=self.tokens(),
                       behavior_logprob=pad(self.behavior_logprob, np.nan))

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
            behavior_logprob=take("behavior_logprob", rows),
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


def leading_mask(counts: np.ndarray, width: int) -> np.ndarray:
    """``[B, width] bool``: the first ``counts[b]`` entries of each row, the rest (right padding) False."""
    return np.arange(width)[None, :] < np.asarray(counts, dtype=np.int64)[:, None]


def list_column(values: np.ndarray, row_lengths: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """``values`` cut into consecutive Arrow lists of ``row_lengths [L]`` (summing to ``len(values)``)."""
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
    """Arrow table of ``targets`` (rows without their padding) in the format version ``metadata`` names
    (the current one if it names none), with ``metadata`` as JSON key-value metadata; v2 adds the mantissa
    bits its log-probabilities keep."""
    metadata = {"format_version": FORMAT_VERSION, **metadata}
    version = metadata["format_version"]
    behavior = targets.behavior_logprob is not None
    params = metadata.get("params", {})
    logprobs = stores_logprobs(targets.method, params)
    if logprobs and targets.target_logprobs is None:
        raise LogitcacheError(f"targets without log-probabilities, but the cache's params {params} store them")
    if version >= 2:
        metadata["logprob_mantissa_bits"] = logprob_bits(targets.method, params)
        if behavior:
            metadata["logprob_mantissa_bits"][BEHAVIOR_COLUMN] = LOGPROB_BITS
    schema = shard_schema(targets.method, version, params.get("samples"), behavior, logprobs)

    def stored(name: str, values: np.ndarray, row_lengths: np.ndarray) -> pa.ListArray:
        """Column ``name`` as this version stores it: its type, log-probabilities rounded (v2) or float16 (v1)."""
        if name in LOGPROB_COLUMNS:
            values = values.astype(np.float16) if version == 1 else round_mantissa(values, metadata["logprob_mantissa_bits"][name])
        return list_column(values, row_lengths, schema.field(name).type.value_type)

    if ids_ascending(version, targets.method):
        targets = ascending_ids(targets)
    b, n = targets.input_ids.shape
    tokens = targets.tokens()
    positions = tokens - 1
    ids_per_window = targets.target_lengths.reshape(b, n - 1).sum(axis=1, dtype=np.int64)
    real_tokens = real_positions = slice(None)  # every row full: the arrays as they are
    if targets.token_counts is not None:
        real_tokens = leading_mask(tokens, n)
        real_positions = real_tokens[:, 1:]

    def per_position(name: str, values: np.ndarray) -> pa.ListArray:
        return stored(name, values.reshape(b, n - 1)[real_positions].reshape(-1), positions)

    columns = {
        "sequence_id": pa.array(targets.sequence_ids, type=pa.int64()),
        "input_ids": list_column(targets.input_ids[real_tokens].reshape(-1), tokens, pa.int32()),
        "target_lengths": per_position("target_lengths", targets.target_lengths),
        "target_ids": list_column(targets.target_ids, ids_per_window, pa.int32()),
    }
    if logprobs:
        columns["target_logprobs"] = stored("target_logprobs", targets.target_logprobs, ids_per_window)
    if targets.method == "topk":
        columns["tail_logprob"] = per_position("tail_logprob", targets.tail_logprob)
    else:
        columns["target_counts"] = stored("target_counts", targets.target_counts, ids_per_window)
    columns["gold_logprob"] = per_position("gold_logprob", targets.gold_logprob)
    if behavior:
        columns[BEHAVIOR_COLUMN] = per_position(BEHAVIOR_COLUMN, targets.behavior_logprob)
    return pa.table(columns, schema=schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)}))


def ascending_order(values: np.ndarray, lengths: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """``[S] int64``: the permutation of flat per-id entries that sorts each position's ``values [S]`` (ids, or
    any sortable key; ties in any order) ascending; positions are consecutive runs of ``lengths [...]`` entries
    and stay where they are. ``block`` positions at a time, so that a whole shard is not padded at once."""
    lengths = lengths.reshape(-1).astype(np.int64)
    ends = np.cumsum(lengths)
    pad = np.inf if np.issubdtype(values.dtype, np.floating) else np.iinfo(values.dtype).max  # sorts last
    order = np.empty(len(values), dtype=np.int64)
    for first in range(0, len(lengths), block):
        sizes = lengths[first : first + block]
        starts = ends[first : first + block] - sizes
        entries = slice(starts[0], starts[-1] + sizes[-1])
        width = int(sizes.max())
        if width == 0:
            continue
        if np.all(sizes == width):  # every position full (topk): no padding
            order[entries] = (starts[:, None] + np.argsort(values[entries].reshape(-1, width), axis=1)).reshape(-1)
            continue
        filled = leading_mask(sizes, width)  # [positions, widest]
        padded = np.full(filled.shape, pad, dtype=values.dtype)
        padded[filled] = values[entries]
        order[entries] = (starts[:, None] + np.argsort(padded, axis=1))[filled]
    return order


def ascending_ids(targets: WindowTargets) -> WindowTargets:
    """The same targets with each position's ids ascending (their log-probabilities and counts with them)."""
    order = ascending_order(targets.target_ids, targets.target_lengths)

    def take(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else values[order]

    return replace(targets, target_ids=targets.target_ids[order], target_logprobs=take(targets.target_logprobs),
                   target_counts=take(targets.target_counts))


def parquet_options(table: pa.Table, zstd_level: int = ZSTD_LEVEL) -> dict:
    """The ``pq.write_table`` keyword arguments a shard of ``table``'s version is written with."""
    names = table.column_names
    split = [name for name in LOGPROB_COLUMNS if name in names and pa.types.is_float32(table.schema.field(name).type.value_type)]
    return {
        "compression": "zstd",
        "compression_level": zstd_level,
        "row_group_size": ROW_GROUP_ROWS,
        # Leaf paths: a bare column name is silently ignored for list columns.
        "use_dictionary": [f"{name}.list.element" for name in DICTIONARY_COLUMNS if name in names],
        "column_encoding": {f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in split} or None,
        "write_statistics": ["sequence_id"],
    }


def write_shard(path: Path, targets: WindowTargets, metadata: dict, zstd_level: int = ZSTD_LEVEL) -> None:
    """Write ``targets`` as one Parquet shard at ``path``, atomically, in the version ``metadata`` names
    (the current one if it names none)."""
    table = to_table(targets, metadata)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, **parquet_options(table, zstd_level)))


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


def decode_logprobs(table: pa.Table, name: str) -> np.ndarray:
    """The flat values of log-probability column ``name`` of rows of a shard of any readable version, as
    float32 (v1's float16 upcast exactly; v2's float32 as stored)."""
    return _flat(table.column(name))[0].astype(np.float32, copy=False)


def from_table(table: pa.Table) -> WindowTargets:
    """Decode rows of a shard (a table or one row group; any readable version) back into
    :class:`WindowTargets`, log-probabilities as float32."""
    b = table.num_rows
    if b == 0:
        raise LogitcacheError("no rows to decode")
    input_ids, offsets = _flat(table.column("input_ids"))
    tokens = np.diff(offsets).astype(np.int64)
    n = int(tokens.max())
    full = bool((tokens == n).all())
    real = None if full else leading_mask(tokens, n)

    def rows(values: np.ndarray, width: int, padding: float = 0) -> np.ndarray:
        if full:
            return values.reshape(b, width)
        out = np.full((b, width), padding, dtype=values.dtype)
        out[real[:, :width] if width == n else real[:, 1:]] = values
        return out

    def per_position(name: str) -> np.ndarray | None:
        if name not in table.column_names:
            return None
        values = decode_logprobs(table, name) if name in LOGPROB_COLUMNS else _flat(table.column(name))[0]
        return rows(values, n - 1, np.nan if name == BEHAVIOR_COLUMN else 0)

    names = table.column_names
    return WindowTargets(
        sequence_ids=table.column("sequence_id").to_numpy(),
        input_ids=rows(input_ids, n),
        target_lengths=per_position("target_lengths"),
        target_ids=_flat(table.column("target_ids"))[0],
        target_logprobs=decode_logprobs(table, "target_logprobs") if "target_logprobs" in names else None,
        gold_logprob=per_position("gold_logprob"),
        tail_logprob=per_position("tail_logprob"),
        target_counts=_flat(table.column("target_counts"))[0] if "target_counts" in names else None,
        token_counts=None if full else tokens,
        behavior_logprob=per_position(BEHAVIOR_COLUMN),
    )


def read_shard(path: Path) -> WindowTargets:
    return from_table(pq.read_table(path))
