"""Other engines read the shards: pyarrow, Hugging Face ``datasets``, Polars, DuckDB and Apache Spark.

Each engine reads every column of every shard of a real ``topk`` and a real ``sample`` cache, and of a
``sample`` cache built without log-probabilities (format v4; the conftest builds them), decodes the log-prob columns itself, and must recover exactly the per-position
targets of logitcache's own reader (``cache/format.read_shard``). Each engine's reading and
decoding is one function (``ENGINES``); the log-prob decoding is one formula, ``stored * scale``,
with ``scale`` read from the shard by :func:`logprob_scale`, so a change of encoding is one line there.

Spark 4 cannot read Parquet's FLOAT16 type (``[PARQUET_TYPE_ILLEGAL]``), which format v1 used for
log-probs: a v1 cache is refused by Spark, and the same cache after ``logitcache convert`` is read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from spark_session import local_spark

from logitcache.cache.format import read_shard
from logitcache.cache.manifest import read_manifest

LOGPROB_COLUMNS = ("target_logprobs", "gold_logprob", "tail_logprob")


def logprob_scale(schema: pa.Schema) -> float:
    """Log-prob columns hold ``logprob / scale``: a reader computes ``stored * scale`` (float64).

    Formats v1 (float16) and v2 (float32) store the natural-log probabilities themselves, so the scale is 1. The one
    place that knows the encoding: a fixed-point format (say ``uint16 = round(-logprob * 2**s)`` with
    ``s`` in the shard metadata) changes only the value returned here, to ``-2.0 ** -s``.
    """
    value_type = schema.field("gold_logprob").type.value_type  # (every shard has it; target_logprobs may be left out)
    assert pa.types.is_floating(value_type), f"no decoding known for {value_type} log-probs"
    return 1.0


# --- each engine: read every column of the shards, log-prob columns decoded; one dict per window ---


def pyarrow_windows(files: list[Path], scale: float) -> list[dict]:
    windows = []
    for file in files:
        table = pq.read_table(file)
        for name in LOGPROB_COLUMNS:
            if name in table.column_names:
                lists = table.column(name).combine_chunks()
                decoded = pc.multiply(lists.flatten().cast(pa.float64()), scale)
                offsets = pc.subtract(lists.offsets, lists.offsets[0])
                table = table.set_column(table.column_names.index(name), name, pa.ListArray.from_arrays(offsets, decoded))
        windows += table.to_pylist()
    return windows


def datasets_windows(files: list[Path], scale: float) -> list[dict]:
    from datasets import load_dataset

    with tempfile.TemporaryDirectory() as arrow_cache:
        dataset = load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=arrow_cache)
        windows = [
            {name: np.asarray(value, dtype=np.float64) * scale if name in LOGPROB_COLUMNS else value
             for name, value in row.items()}
            for row in dataset.with_format("numpy")
        ]
        del dataset
    return windows


def polars_windows(files: list[Path], scale: float) -> list[dict]:
    import polars as pl

    frame = pl.read_parquet([str(f) for f in files])
    decoded = [pl.col(name).list.eval(pl.element().cast(pl.Float64) * scale) for name in LOGPROB_COLUMNS if name in frame.columns]
    return frame.with_columns(decoded).to_dicts()


def duckdb_windows(files: list[Path], scale: float) -> list[dict]:
    import duckdb

    names = pq.read_schema(files[0]).names
    decoded = ", ".join(f"list_transform({name}, lambda x: x::DOUBLE * $scale) AS {name}"
                        for name in LOGPROB_COLUMNS if name in names)
    result = duckdb.connect().execute(f"SELECT * REPLACE ({decoded}) FROM read_parquet($files)",
                                      {"files": [str(f) for f in files], "scale": scale})
    columns = [column[0] for column in result.description]
    return [dict(zip(columns, row)) for row in result.fetchall()]


def spark_windows(files: list[Path], scale: float, spark) -> list[dict]:
    from pyspark.sql import functions as F

    frame = spark.read.parquet(*[str(f) for f in files])
    columns = [F.transform(name, lambda x: x.cast("double") * scale).alias(name) if name in LOGPROB_COLUMNS else F.col(name)
               for name in frame.columns]
    return [row.asDict() for row in frame.select(*columns).collect()]


ENGINES = {"pyarrow": pyarrow_windows, "datasets": datasets_windows, "polars": polars_windows,
           "duckdb": duckdb_windows, "spark": spark_windows}


# --- the engine-independent part: a window's columns → its per-position targets ---


def positions(window: dict) -> list[tuple]:
    """One tuple per position: (gold id, gold log-prob, ids, log-probs (None: a sample cache without them), tail
    log-prob or counts)."""
    lengths = np.asarray(window["target_lengths"], dtype=np.int64)
    cuts = np.cumsum(lengths)[:-1]
    ids = np.split(np.asarray(window["target_ids"], dtype=np.int64), cuts)
    logprobs = [None] * len(lengths)
    if "target_logprobs" in window:
        logprobs = [tuple(values.tolist()) for values in np.split(np.asarray(window["target_logprobs"], dtype=np.float64), cuts)]
    if "target_counts" in window:
        extra = [tuple(c.tolist()) for c in np.split(np.asarray(window["target_counts"], dtype=np.int64), cuts)]
    else:
        extra = np.asarray(window["tail_logprob"], dtype=np.float64).tolist()
    gold_ids = np.asarray(window["input_ids"], dtype=np.int64)[1:].tolist()
    gold = np.asarray(window["gold_logprob"], dtype=np.float64).tolist()
    return [(gold_ids[t], gold[t], tuple(ids[t].tolist()), logprobs[t], extra[t]) for t in range(len(lengths))]


def by_sequence(windows: list[dict]) -> dict[int, tuple[list, list[tuple]]]:
    """sequence_id → (input ids, per-position targets)."""
    return {int(w["sequence_id"]): (np.asarray(w["input_ids"]).tolist(), positions(w)) for w in windows}


def reference_windows(files: list[Path]) -> list[dict]:
    """The same windows from logitcache's own reader, whose log-prob arrays are the log-probs (float64 here)."""
    windows = []
    for file in files:
        targets = read_shard(file)
        entries = targets.target_lengths.sum(axis=1, dtype=np.int64)
        ends = np.cumsum(entries)
        per_id = {"target_ids": targets.target_ids}
        if targets.target_logprobs is not None:
            per_id["target_logprobs"] = targets.target_logprobs.astype(np.float64)
        if targets.target_counts is not None:
            per_id["target_counts"] = targets.target_counts
        per_position = {"target_lengths": targets.target_lengths, "gold_logprob": targets.gold_logprob.astype(np.float64)}
        if targets.tail_logprob is not None:
            per_position["tail_logprob"] = targets.tail_logprob.astype(np.float64)
        for b, (start, end) in enumerate(zip(ends - entries, ends)):
            window = {"sequence_id": targets.sequence_ids[b], "input_ids": targets.input_ids[b]}
            window.update({name: values[start:end] for name, values in per_id.items()})
            window.update({name: values[b] for name, values in per_position.items()})
            windows.append(window)
    return windows


def shard_files(cache: Path) -> list[Path]:
    return [cache / shard["file"] for shard in read_manifest(cache)["shards"]]


@pytest.fixture(scope="module")
def spark():
    with local_spark() as session:
        yield session


@pytest.fixture(scope="module", params=["topk_cache", "sample_cache"])
def cache(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=["topk_cache", "sample_cache", "ids_only_cache"])
def any_cache(request) -> Path:
    """Every kind of current cache: topk, sample, and sample without log-probabilities (format v4)."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_recovers_every_positions_targets(engine, any_cache, request):
    cache = any_cache
    files = shard_files(cache)
    scale = logprob_scale(pq.read_schema(files[0]))
    extra = [request.getfixturevalue("spark")] if engine == "spark" else []
    windows = ENGINES[engine](files, scale, *extra)
    expected = reference_windows(files)
    assert all(set(window) == set(pq.read_schema(files[0]).names) for window in windows)
    assert by_sequence(windows) == by_sequence(expected)
    assert len(windows) == len(expected) == read_manifest(cache)["totals"]["sequences"]


def test_spark_refuses_a_v1_cache_and_reads_it_converted(cache, spark, tmp_path):
    """Format v1's float16 is what kept Spark out; ``logitcache convert`` lets it in, with the same targets."""
    from conftest import as_v1

    from logitcache.cache.convert import convert_cache

    old = as_v1(cache, tmp_path / "v1")
    with pytest.raises(Exception, match="PARQUET_TYPE_ILLEGAL|FLOAT16|Float16"):
        spark_windows(shard_files(old), 1.0, spark)
    convert_cache(old, tmp_path / "v2")
    files = shard_files(tmp_path / "v2")
    windows = spark_windows(files, logprob_scale(pq.read_schema(files[0])), spark)
    assert by_sequence(windows) == by_sequence(reference_windows(shard_files(cache)))
