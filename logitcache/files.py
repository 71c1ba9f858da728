"""Crash-safe file writes: temporary name, fsync, rename into place."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then fsync and rename ``tmp`` to ``path``: a crash never leaves a partial ``path``,
    and a ``write`` that raises leaves no temporary behind."""
    path = Path(path)
    # Unique per writer: concurrent workers may write the same file (build.json, a merged manifest).
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, obj: object) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def clear_temporaries(folder: Path, prefix: str = "") -> None:
    """Remove the temporaries (``PREFIX*.tmp``) that crashed writers left in ``folder``."""
    for tmp in Path(folder).glob(f"{prefix}*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fsync_path(path)


def replace_folder(final: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on an empty temporary folder, then swap it in for ``final``.

    A crash leaves either the previous ``final`` or ``final.old`` complete (``logitcache.train.checkpoint`` finds either).
    """
    tmp, old = final.with_name(final.name + TMP_SUFFIX), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_folder(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(final.parent)
