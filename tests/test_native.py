"""The compiled CPU kernels' library (logitcache/native/library.py): compiled once per machine into the
cache folder, rebuilt when its file is damaged, and the torch fallback when it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import needs_compiler

from logitcache.native import library as native

pytestmark = needs_compiler


@pytest.mark.parametrize("compiler", ["false", "true"])
def test_a_failing_compiler_falls_back_to_torch(compiler, tmp_path, monkeypatch, caplog):
    """A compiler that fails, or exits 0 without writing a library (CC=true), leaves the torch path in
    charge with a note saying so, and nothing in the cache."""
    monkeypatch.setenv("LOGITCACHE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="logitcache.native"):
            assert native.library() is None
            assert not native.usable(torch.zeros(2, 8))
        assert "building targets with torch" in caplog.text
        assert list(tmp_path.iterdir()) == []
    finally:
        native.library.cache_clear()


def test_compiles_into_the_cache_folder_once(tmp_path, monkeypatch):
    """A cold cache compiles once into LOGITCACHE_CACHE_DIR (readable by all); later loads reuse the
    file; an empty or foreign file in its place is rebuilt, not loaded."""
    monkeypatch.setenv("LOGITCACHE_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.glob("native_targets-*.so"))
        assert len(built) == 1 and built[0].stat().st_mode & 0o755 == 0o755
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp
        for junk in (b"", b"not a library at all"):
            built[0].unlink()  # a new file: truncating the loaded library in place would crash this process
            built[0].write_bytes(junk)
            native.library.cache_clear()
            assert native.library() is not None and built[0].read_bytes()[:4] == native.ELF_MAGIC
        assert [p.name for p in tmp_path.iterdir()] == [built[0].name]
    finally:
        native.library.cache_clear()
