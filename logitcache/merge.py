"""Assemble ``manifest.json`` from the partial manifests of a multi-worker build."""

from __future__ import annotations

import json
import re
from pathlib import Path

from logitcache.errors import LogitcacheError
from logitcache.manifest import write_manifest

_PART = re.compile(r"manifest\.part-(\d{5})-of-(\d{5})\.json$")
_SUMMED = ("sequences", "tokens", "positions", "target_entries", "bytes")


def _parts(cache_dir: Path) -> dict[int, tuple[int, Path]]:
    found = {}
    for path in Path(cache_dir).glob("manifest.part-*.json"):
        if m := _PART.match(path.name):
            found[int(m.group(1))] = (int(m.group(2)), path)
    return found


def merge_parts(cache_dir: Path, missing_ok: bool = False) -> dict | None:
    """Write ``manifest.json`` once every worker's part is present; return it (None if parts are missing and ``missing_ok``)."""
    cache_dir = Path(cache_dir)
    found = _parts(cache_dir)
    if not found:
        raise LogitcacheError(f"{cache_dir}: no partial manifests (manifest.part-*.json) to merge")
    totals = {n for n, _ in found.values()}
    if len(totals) != 1:
        raise LogitcacheError(f"{cache_dir}: partial manifests from builds with different --num-workers {sorted(totals)}")
    workers = totals.pop()
    missing = sorted(set(range(workers)) - set(found))
    if missing:
        if missing_ok:
            return None
        raise LogitcacheError(f"{cache_dir}: workers {missing} of {workers} have not finished; resume them, then merge")
    parts = [json.loads(found[i][1].read_text()) for i in range(workers)]
    if len({p["fingerprint"] for p in parts}) != 1:
        raise LogitcacheError(f"{cache_dir}: partial manifests come from different builds (fingerprints differ)")
    manifest = dict(parts[0])
    manifest["shards"] = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["index"])
    manifest["totals"] = {key: sum(p["totals"][key] for p in parts) for key in _SUMMED}
    write_manifest(cache_dir, manifest)
    (cache_dir / "build.json").unlink(missing_ok=True)
    return manifest
