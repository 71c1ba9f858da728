"""Assemble ``manifest.json`` from the partial manifests of a multi-worker build."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.cache.layout import BUILD_MARKER, PART_PATTERN, parse_part_name
from logitcache.cache.manifest import write_manifest
from logitcache.errors import LogitcacheError
from logitcache.files import clear_temporaries

_SUMMED = ("sequences", "tokens", "positions", "target_entries", "bytes")


def _parts(cache_dir: Path) -> list[tuple[int, int, Path]]:
    """``(worker_index, num_workers, path)`` of every partial manifest in ``cache_dir``."""
    found = []
    for path in sorted(Path(cache_dir).glob(PART_PATTERN)):
        if (parsed := parse_part_name(path.name)) is not None:
            found.append((*parsed, path))
    return found


def _read_part(path: Path) -> dict:
    try:
        part = json.loads(path.read_text())
    except ValueError as exc:
        part = exc
    if (not isinstance(part, dict) or "fingerprint" not in part or not isinstance(part.get("shards"), list)
            or not isinstance(part.get("totals"), dict) or any(key not in part["totals"] for key in _SUMMED)):
        raise LogitcacheError(f"{path}: not a partial manifest a worker wrote ({part if isinstance(part, Exception) else 'fields missing'}); "
                              "delete it and re-run that worker to rewrite it")
    return part


def merge_parts(cache_dir: Path, missing_ok: bool = False, num_workers: int | None = None) -> dict | None:
    """Write ``manifest.json`` once every worker's part is present; return it (None if parts are missing and ``missing_ok``).

    ``num_workers``: merge the parts of a build with that many workers and ignore (then delete) the parts
    an earlier build of the same folder with another count left behind; None (``logitcache merge``)
    needs the parts to agree. After a merge, the temporaries of the merged shards are removed: those
    shards are complete, so the temporaries are what crashed writers left.
    """
    cache_dir = Path(cache_dir)
    found = _parts(cache_dir)
    if not found:
        raise LogitcacheError(f"{cache_dir}: no partial manifests (manifest.part-*.json) to merge")
    totals = {w for _, w, _ in found} if num_workers is None else {num_workers}
    if len(totals) != 1:
        raise LogitcacheError(
            f"{cache_dir}: partial manifests from builds with different --num-workers {sorted(totals)}; "
            "delete the parts of the build you do not want (manifest.part-*-of-W.json)"
        )
    workers = totals.pop()
    ours = {i: path for i, w, path in found if w == workers}
    missing = sorted(set(range(workers)) - set(ours))
    if missing:
        if missing_ok:
            return None
        raise LogitcacheError(f"{cache_dir}: workers {missing} of {workers} have not finished; resume them, then merge")
    parts = [_read_part(ours[i]) for i in range(workers)]
    if len({p["fingerprint"] for p in parts}) != 1:
        raise LogitcacheError(f"{cache_dir}: partial manifests come from different builds (fingerprints differ)")
    manifest = dict(parts[0])
    manifest["shards"] = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["index"])
    manifest["totals"] = {key: sum(p["totals"][key] for p in parts) for key in _SUMMED}
    write_manifest(cache_dir, manifest)
    for _, w, path in found:
        if w != workers:
            path.unlink(missing_ok=True)
    for shard in manifest["shards"]:  # complete now, so their temporaries are a crashed writer's leftovers
        clear_temporaries(cache_dir, prefix=f"{shard['file']}.")
    (cache_dir / BUILD_MARKER).unlink(missing_ok=True)
    return manifest
