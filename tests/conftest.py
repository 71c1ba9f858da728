"""Shared fixtures and helpers: a real tiny teacher (BPE tokenizer + Llama), real caches built from it,
the CLI run as a process, and the mark of the tests that need the compiled kernels."""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import processes
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import WindowTargets, read_shard
from logitcache.cache.manifest import read_manifest
from logitcache.demo import TeacherSizes, make_teacher, stdlib_docstrings, write_corpus
from logitcache.native import library as native

torch.set_num_threads(1)

# The compiled target kernels go to a folder of this session, not ~/.cache (subprocesses inherit it).
_KERNELS = tempfile.mkdtemp(prefix="logitcache-kernels-")
os.environ.setdefault("LOGITCACHE_CACHE_DIR", _KERNELS)
atexit.register(shutil.rmtree, _KERNELS, True)

TEACHER_VOCAB = 512
SEQ_LEN = 32

needs_compiler = pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch path is the only one here")


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return list(itertools.islice(stdlib_docstrings(), 300))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, documents) -> Path:
    """A random-initialised 'nano' Llama with a 512-token BPE tokenizer, saved in HF format."""
    return make_teacher(tmp_path_factory.mktemp("teacher"), documents, TeacherSizes(TEACHER_VOCAB, "nano", max_positions=128))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, documents) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    write_corpus(path, iter(documents[:60]))
    return path


def build_cache(teacher_dir: Path, corpus: Path, out: Path, **overrides) -> dict:
    """A build of the test teacher, which was trained on packed streams: ``packing="stream"`` unless overridden."""
    settings = dict(teacher=teacher_dir, corpus=corpus, out=out, seq_len=SEQ_LEN, batch_size=4, shard_size=16, packing="stream")
    settings.update(overrides)
    return run_build(BuildSettings(**settings))


def all_targets(cache: Path) -> WindowTargets:
    manifest = read_manifest(cache)
    return WindowTargets.concat([read_shard(cache / s["file"]) for s in manifest["shards"]])


def as_v1(cache: Path, out: Path) -> Path:
    """A copy of ``cache`` in shard format v1 (float16 log-probabilities, uint16 counts, no BYTE_STREAM_SPLIT), as
    logitcache wrote before format v2: the v1 caches users hold, for the tests of reading and converting them."""
    return as_version(cache, out, 1)


def as_version(cache: Path, out: Path, version: int) -> Path:
    """A copy of ``cache`` (one that keeps its log-probabilities) in the older shard format ``version`` (1, 2 or 3),
    as logitcache wrote it then (v1 and v2: no behavior_logprob column)."""
    from dataclasses import replace

    from logitcache.cache.format import BEHAVIOR_COLUMN, shard_metadata, write_shard
    from logitcache.cache.manifest import write_manifest
    from logitcache.files import sha256_file

    out.mkdir(parents=True)
    manifest = read_manifest(cache)
    for entry in manifest["shards"]:
        meta = shard_metadata(cache / entry["file"])
        if version == 1:  # keys v1 shards did not have
            meta = {key: value for key, value in meta.items() if key not in ("logprob_mantissa_bits", "layout", "tokens")}
        elif version < 3:
            meta["logprob_mantissa_bits"].pop(BEHAVIOR_COLUMN, None)
        targets = read_shard(cache / entry["file"])
        if version < 3:
            targets = replace(targets, behavior_logprob=None)
        write_shard(out / entry["file"], targets, {**meta, "format_version": version})
        entry.update(bytes=(out / entry["file"]).stat().st_size, sha256=sha256_file(out / entry["file"]))
    manifest["totals"]["bytes"] = sum(entry["bytes"] for entry in manifest["shards"])
    older = {k: v for k, v in manifest.items() if k != "layout" or version > 1}
    write_manifest(out, {**older, "format_version": version})
    return out


def edited_teacher(teacher_dir: Path, out: Path, edit) -> Path:
    """A copy of the test teacher after ``edit(model, tokenizer)``."""
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    edit(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return processes.run([sys.executable, "-m", "logitcache", *args], env=env, **kw)


@pytest.fixture(scope="session")
def topk_cache(tmp_path_factory, teacher_dir, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("cache") / "topk"
    build_cache(teacher_dir, corpus_file, out, method="topk", k=8)
    return out


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory, teacher_dir, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("cache") / "sample"
    build_cache(teacher_dir, corpus_file, out, method="sample", samples=20)
    return out


@pytest.fixture(scope="session")
def ids_only_cache(tmp_path_factory, teacher_dir, corpus_file) -> Path:
    """``sample_cache``'s build with ``--logprob-bits 0``: the same draws, no target_logprobs (format v4)."""
    out = tmp_path_factory.mktemp("cache") / "sample-ids-only"
    build_cache(teacher_dir, corpus_file, out, method="sample", samples=20, logprob_bits=0)
    return out


def pytest_sessionfinish(session, exitstatus) -> None:
    """Last resort: stop whatever a test started and left running (each test stops its own already)."""
    left = processes.stop_session()
    if left:
        print(f"\nstopped {len(left)} processes the tests left running:\n" + "\n".join(left))
