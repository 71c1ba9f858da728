"""``logitcache convert``: rewrite an older cache (v1: float16 log-probabilities; v2; v3) in the current shard format, shard by shard.

Crash safety is a build's: every shard is written under a temporary name and renamed into place,
``build.json`` marks the destination as holding this conversion (its fingerprint) while it runs, and
``manifest.json`` comes last. Re-running the same conversion keeps the shards already converted and
writes the rest. The targets are exactly the source's: every float16 is a float32, and a v1 value has
no more mantissa bits than v2 keeps (10; a sample cache's ``params.logprob_bits``, which v1 applied too).
A v2 cache of a chat corpus gains v3's ``behavior_logprob`` column, all NaN: no token of it was recorded as
drawn by a sampler (v2 did not keep the records' ``response_logprobs``; rebuild to have them). A v3 shard is
rewritten as it is, with v4's version number (v4 only adds sample caches without log-probabilities).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from logitcache.cache.format import FORMAT_VERSION, has_behavior, read_shard, shard_metadata, write_shard
from logitcache.cache.layout import BUILD_MARKER, MANIFEST_NAME
from logitcache.cache.manifest import cache_layout, check_complete, fingerprint, read_manifest, write_manifest
from logitcache.errors import LogitcacheError
from logitcache.files import clear_temporaries, sha256_file, write_json_atomic


def conversion_fingerprint(source: dict) -> str:
    """The converted cache's fingerprint: of the source build and the version it is converted to (a fresh
    build's may differ: its float32 log-probabilities are rounded once, v1's through float16)."""
    return fingerprint({"converted_from": source["fingerprint"], "format_version": FORMAT_VERSION})


def _check_source(src: Path, dst: Path) -> dict:
    manifest = read_manifest(src)
    check_complete(manifest, src)
    if manifest["format_version"] == FORMAT_VERSION:
        raise LogitcacheError(f"{src} is already format v{FORMAT_VERSION}: nothing to convert")
    if dst.resolve() == src.resolve():
        raise LogitcacheError("DST is SRC: convert writes a new cache folder and leaves the source as it is")
    return manifest


def _claim(dst: Path, marker: dict) -> None:
    """Take ``dst`` for this conversion: a new or empty folder, or this very conversion left unfinished."""
    if dst.exists() and not dst.is_dir():
        raise LogitcacheError(f"DST {dst} is a file, not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        recorded = None
        for name in (BUILD_MARKER, MANIFEST_NAME):
            try:
                recorded = recorded or json.loads((dst / name).read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                pass
        if recorded != marker["fingerprint"]:
            raise LogitcacheError(f"DST {dst} holds other files than this conversion's; give a new or empty folder")
    dst.mkdir(parents=True, exist_ok=True)
    clear_temporaries(dst)
    write_json_atomic(dst / BUILD_MARKER, marker)


def _convert_shard(src: Path, dst: Path, entry: dict, build_fingerprint: str, layout: dict) -> None:
    """Shard ``entry`` of ``src``, checked against its manifest record, written to ``dst`` in the current version."""
    source = src / entry["file"]
    if sha256_file(source) != entry["sha256"]:
        raise LogitcacheError(f"{source}: sha256 differs from the manifest (changed or corrupt); "
                              "`logitcache validate` says more; nothing of this shard was written")
    meta = {**shard_metadata(source), "format_version": FORMAT_VERSION, "build_fingerprint": build_fingerprint,
            "layout": layout}
    try:
        targets = read_shard(source)
        if has_behavior(FORMAT_VERSION, layout["format"]) and targets.behavior_logprob is None:
            targets = replace(targets, behavior_logprob=np.full(targets.gold_logprob.shape, np.nan, dtype=np.float32))
        write_shard(dst / entry["file"], targets, {**meta, "tokens": int(targets.tokens().sum())})
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise LogitcacheError(f"{source}: cannot be converted ({exc}); `logitcache validate` says more") from exc


def convert_cache(src: Path, dst: Path, on_shard: Callable[[int], None] | None = None) -> dict:
    """Write the older cache ``src`` as a cache of the current format at ``dst`` (or finish an interrupted
    conversion there) and return its manifest. ``on_shard(i)`` is called as shard ``i`` is done or found done."""
    src, dst = Path(src), Path(dst)
    source = _check_source(src, dst)
    target = conversion_fingerprint(source)
    _claim(dst, {"format": source["format"], "fingerprint": target, "converted_from": source["fingerprint"]})
    shards = []
    for entry in source["shards"]:
        path = dst / entry["file"]
        done = path.is_file() and shard_metadata(path).get("build_fingerprint") == target
        if not done:
            _convert_shard(src, dst, entry, target, cache_layout(source))
        shards.append({**entry, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        if on_shard is not None:
            on_shard(entry["index"])
    totals = {**source["totals"], "bytes": sum(shard["bytes"] for shard in shards)}
    manifest = {**source, "format_version": FORMAT_VERSION, "fingerprint": target, "layout": cache_layout(source),
                "converted_from": source["fingerprint"], "totals": totals, "shards": shards}
    write_manifest(dst, manifest)
    (dst / BUILD_MARKER).unlink(missing_ok=True)
    return manifest
