"""The names of the files in a cache folder: the one place that spells them."""

from __future__ import annotations

import re

MANIFEST_NAME = "manifest.json"
BUILD_MARKER = "build.json"  # the build in progress in this folder (its fingerprint); gone once manifest.json exists
SHARD_PATTERN = "shard-*.parquet"
PART_PATTERN = "manifest.part-*.json"
MANIFESTS_PATTERN = "manifest*.json*"  # the manifest, the parts, and their temporaries
_PART = re.compile(r"manifest\.part-(\d{5})-of-(\d{5})\.json$")


def shard_name(index: int) -> str:
    """Shard ``index`` holds sequence ids ``[index * shard_size, index * shard_size + rows)``."""
    return f"shard-{index:05d}.parquet"


def part_name(worker_index: int, num_workers: int) -> str:
    """The partial manifest worker ``worker_index`` of ``num_workers`` writes."""
    return f"manifest.part-{worker_index:05d}-of-{num_workers:05d}.json"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """``(worker_index, num_workers)`` of a :func:`part_name`, or None for any other name."""
    match = _PART.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None
