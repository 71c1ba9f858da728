"""The published schemas (schemas/) cannot drift from the writer (logitcache/cache/format.py, cache/manifest.py)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from logitcache.cache.format import (
    FORMAT_VERSION,
    METADATA_KEY,
    METHODS,
    READABLE_VERSIONS,
    ROW_GROUP_ROWS,
    ZSTD_LEVEL,
    WindowTargets,
    shard_schema,
    write_shard,
)
from logitcache.cache.layout import shard_name
from logitcache.errors import LogitcacheError

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
SHARD_SPECS = {version: json.loads((SCHEMAS / f"shard-v{version}.arrow.json").read_text()) for version in READABLE_VERSIONS}
SHARD_SPEC = SHARD_SPECS[FORMAT_VERSION]
MANIFEST_SCHEMA = json.loads((SCHEMAS / "manifest.schema.json").read_text())
PRIMITIVES = {"int32": pa.int32(), "int64": pa.int64(), "uint8": pa.uint8(), "uint16": pa.uint16(), "float16": pa.float16(),
              "float32": pa.float32()}


def arrow_type(name: str, element_nullable: bool) -> pa.DataType:
    """``"int64"`` or ``"list<float16>"`` as an Arrow type."""
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(pa.field("item", PRIMITIVES[name[len("list<") : -1]], nullable=element_nullable))
    return PRIMITIVES[name]


def published_schema(method: str, version: int = FORMAT_VERSION, type_key: str = "type", optional: bool = False,
                     omitted: bool = False) -> pa.Schema:
    """The schema a published spec gives; ``type_key`` picks a field's alternative type where it has one;
    ``optional``: with the spec's optional columns (v3 on: a chat cache's behavior_logprob), last; ``omitted``:
    without the columns the spec lets a cache leave out (v4 on: a sample cache's target_logprobs)."""
    spec = SHARD_SPECS[version]
    fields = spec["fields"]
    names = [*spec["methods"][method], *(spec.get("optional_columns", {}) if optional else ())]
    if omitted:
        names = [name for name in names if name not in spec["omitted_columns"]]
    return pa.schema(
        pa.field(name, arrow_type(fields[name].get(type_key, fields[name]["type"]), fields[name].get("element_nullable", True)),
                 nullable=fields[name]["nullable"])
        for name in names
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_published_shard_schema_equals_the_writers(method, version):
    # Names, order, types, column and element nullability; v2 counts are uint8 up to N = 255.
    assert published_schema(method, version).equals(shard_schema(method, version, samples=50), check_metadata=True)
    assert published_schema(method, version, "type_above_255_samples").equals(
        shard_schema(method, version, samples=256), check_metadata=True)
    if version >= 3:  # a chat cache's shards: the optional behavior_logprob last
        assert published_schema(method, version, optional=True).equals(
            shard_schema(method, version, samples=50, behavior=True), check_metadata=True)
    else:
        assert "optional_columns" not in SHARD_SPECS[version]
    if version >= 4 and method == "sample":  # built with --logprob-bits 0: no target_logprobs
        for behavior in (False, True):
            assert published_schema(method, version, optional=behavior, omitted=True).equals(
                shard_schema(method, version, samples=50, behavior=behavior, logprobs=False), check_metadata=True)
    else:
        with pytest.raises(LogitcacheError, match="store target_logprobs"):
            shard_schema(method, version, samples=50, logprobs=False)
        assert "omitted_columns" not in SHARD_SPECS[version] or method == "topk"


def test_published_shard_spec_matches_the_writers_constants():
    assert SHARD_SPEC["format_version"] == FORMAT_VERSION
    assert set(SHARD_SPEC["methods"]) == set(METHODS)
    assert set(SHARD_SPEC["fields"]) == {name for names in SHARD_SPEC["methods"].values() for name in names} | set(
        SHARD_SPEC["optional_columns"])
    assert set(SHARD_SPEC["omitted_columns"]) == {"target_logprobs"}
    assert list(SHARD_SPEC["metadata"]) == [METADATA_KEY.decode()]
    parquet = SHARD_SPEC["parquet"]
    assert (parquet["row_group_rows"], parquet["compression_level"]) == (ROW_GROUP_ROWS, ZSTD_LEVEL)


def _tiny_targets(method: str, windows: int, n: int) -> WindowTargets:
    """Valid targets where position p stores 1 + p % 3 ids (descending log-probabilities)."""
    lengths = (1 + np.arange(windows * (n - 1)) % 3).astype(np.uint16)
    ranks = np.concatenate([np.arange(length) for length in lengths])
    per_position = np.full((windows, n - 1), -2.0, dtype=np.float16)
    return WindowTargets(
        sequence_ids=np.arange(windows, dtype=np.int64),
        input_ids=np.arange(windows * n, dtype=np.int32).reshape(windows, n) % 50,
        target_lengths=lengths.reshape(windows, n - 1),
        target_ids=ranks.astype(np.int32),
        target_logprobs=(-1.0 - ranks).astype(np.float16),
        gold_logprob=per_position,
        tail_logprob=per_position if method == "topk" else None,
        target_counts=(4 - ranks).astype(np.uint16) if method == "sample" else None,
    )


@pytest.mark.parametrize("method", METHODS)
def test_written_shard_follows_the_published_layout(method, tmp_path):
    windows, n = ROW_GROUP_ROWS + 2, 4
    targets = _tiny_targets(method, windows, n)
    path = tmp_path / shard_name(0)
    write_shard(path, targets, {"format_version": FORMAT_VERSION, "method": method, "params": {"samples": 8}})

    parquet = pq.ParquetFile(path)
    row_groups = [parquet.metadata.row_group(i) for i in range(parquet.num_row_groups)]
    assert [group.num_rows for group in row_groups] == [ROW_GROUP_ROWS, 2]
    assert {group.column(c).compression for group in row_groups for c in range(group.num_columns)} == {"ZSTD"}
    assert parquet.schema_arrow.remove_metadata().equals(published_schema(method))
    assert isinstance(json.loads(parquet.schema_arrow.metadata[METADATA_KEY]), dict)

    table = parquet.read()
    stored = pc.list_value_length(table.column("target_lengths")).to_numpy()
    lengths = {"n": np.full(windows, n), "n - 1": np.full(windows, n - 1),
               "S": targets.target_lengths.sum(axis=1, dtype=np.int64)}
    assert np.array_equal(stored, lengths["n - 1"])
    for name in SHARD_SPEC["methods"][method]:
        if "length" in SHARD_SPEC["fields"][name]:
            got = pc.list_value_length(table.column(name)).to_numpy()
            assert np.array_equal(got, lengths[SHARD_SPEC["fields"][name]["length"]]), name


# ---- manifest.json -----------------------------------------------------------------------------

@pytest.fixture
def jsonschema():
    """jsonschema is a dev dependency; without it only the manifest tests are skipped."""
    return pytest.importorskip("jsonschema")


def _doc_example_manifest() -> dict:
    """The example manifest in SHARD_FORMAT.md (the spec's example must stay valid)."""
    text = (SCHEMAS / "SHARD_FORMAT.md").read_text()
    return json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))


def _check_cross_fields(manifest: dict) -> None:
    """What JSON Schema cannot say: shard names, sequence ranges and totals agree."""
    shards, seq_len = manifest["shards"], manifest["seq_len"]
    for i, shard in enumerate(shards):
        assert shard["file"] == shard_name(i)
        assert shard.get("index", i) == i
        assert shard["first_sequence_id"] == i * manifest["shard_size"]
        assert shard["tokens"] == shard["rows"] * seq_len
    totals = manifest["totals"]
    assert totals["sequences"] == sum(shard["rows"] for shard in shards)
    if all("target_entries" in shard for shard in shards):
        assert totals["target_entries"] == sum(shard["target_entries"] for shard in shards)
    assert totals["tokens"] == totals["sequences"] * seq_len
    assert totals["positions"] == totals["sequences"] * (seq_len - 1)
    assert totals["bytes"] == sum(shard["bytes"] for shard in shards)


def _undescribed(schema: dict, where: str = "#") -> list[str]:
    """Paths of every property (and $defs entry) in ``schema`` that lacks a description."""
    missing = [] if "description" in schema else [where]
    for key in ("properties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            missing += _undescribed(sub, f"{where}/{key}/{name}")
    if isinstance(schema.get("items"), dict):
        for name, sub in schema["items"].get("properties", {}).items():
            missing += _undescribed(sub, f"{where}/items/properties/{name}")
    return missing


def test_manifest_schema_is_valid_and_describes_every_key(jsonschema):
    jsonschema.Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    assert _undescribed(MANIFEST_SCHEMA) == []


def test_the_keys_validate_and_inspect_require_are_the_schemas():
    from logitcache.cache.manifest import REQUIRED_KEYS, REQUIRED_NESTED, REQUIRED_SHARD_KEYS

    properties = MANIFEST_SCHEMA["properties"]
    assert list(REQUIRED_KEYS) == MANIFEST_SCHEMA["required"]
    assert {key: list(keys) for key, keys in REQUIRED_NESTED.items()} == {
        key: properties[key]["required"] for key in REQUIRED_NESTED}
    assert list(REQUIRED_SHARD_KEYS) == properties["shards"]["items"]["required"]


def test_documented_example_manifest_is_valid(jsonschema):
    manifest = _doc_example_manifest()
    jsonschema.validate(manifest, MANIFEST_SCHEMA)
    _check_cross_fields(manifest)


def _edited(path: str, value) -> dict:
    """The documented example with the value at ``path`` ("a.b.0.c") replaced; ``...`` deletes it."""
    manifest = copy.deepcopy(_doc_example_manifest())
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return manifest


@pytest.mark.parametrize(
    "path, value",
    [
        ("method", "sample"),  # topk params under a sample method
        ("params", {"k": 64, "samples": 50}),
        ("params", {"k": 0}),
        ("format_version", FORMAT_VERSION + 1),
        ("format", "other"),
        ("teacher.fingerprint", ...),
        ("tokenizer.eos_token_id", "</s>"),
        ("totals.bytes", ...),
        ("shards.0.file", "shard-0.parquet"),
        ("shards.0.sha256", "ABC"),
        ("shards.1.rows", 0),
        ("vocab_size", 2**31),
        ("seq_len", 1),
    ],
)
def test_manifest_schema_rejects(path, value, jsonschema):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_edited(path, value), MANIFEST_SCHEMA)


@pytest.mark.parametrize(
    "path, value",
    [
        ("teacher.vllm_version", ...),  # backend-specific teacher keys are optional extras
        ("teacher.trust_remote_code", False),
        ("tokenizer.eos_token_id", None),
        ("corpus.text_field", None),
        ("build", {"batch_size": 8}),  # readers ignore unknown top-level keys
    ],
)
def test_manifest_schema_accepts(path, value, jsonschema):
    jsonschema.validate(_edited(path, value), MANIFEST_SCHEMA)


def test_manifest_schema_accepts_sample_params(jsonschema):
    manifest = _edited("method", "sample")
    for tau in (1.0, 0.5, 2):
        manifest["params"] = {"samples": 50, "proposal_temperature": tau}
        jsonschema.validate(manifest, MANIFEST_SCHEMA)
    manifest["params"] = {"samples": 50, "proposal_temperature": 0}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, MANIFEST_SCHEMA)


def _undocumented(manifest: dict) -> list[str]:
    """Keys a manifest carries that the schema does not describe."""
    props = MANIFEST_SCHEMA["properties"]
    params = MANIFEST_SCHEMA["$defs"][f"{manifest['method']}_params"]["properties"]
    found = [f"{key}" for key in manifest if key not in props]
    found += [f"params.{key}" for key in manifest["params"] if key not in params]
    for section in ("teacher", "tokenizer", "corpus", "totals"):
        found += [f"{section}.{key}" for key in manifest[section] if key not in props[section]["properties"]]
    shard_props = props["shards"]["items"]["properties"]
    found += sorted({f"shards.{key}" for shard in manifest["shards"] for key in shard if key not in shard_props})
    return found


@pytest.mark.parametrize("cache", ["topk_cache", "sample_cache"])
def test_built_cache_follows_the_published_schemas(cache, request, jsonschema):
    cache_dir = request.getfixturevalue(cache)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    jsonschema.validate(manifest, MANIFEST_SCHEMA)
    _check_cross_fields(manifest)
    assert _undocumented(manifest) == []
    documented_metadata = set(SHARD_SPEC["metadata"][METADATA_KEY.decode()]["keys"])
    for shard in manifest["shards"]:
        schema = pq.read_schema(cache_dir / shard["file"])
        assert schema.remove_metadata().equals(published_schema(manifest["method"]))
        metadata = json.loads(schema.metadata[METADATA_KEY])
        assert set(metadata) == documented_metadata
        assert metadata["format_version"] == FORMAT_VERSION
        assert metadata["build_fingerprint"] == manifest["fingerprint"]
