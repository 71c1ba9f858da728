"""Shared fixtures: a real tiny teacher (BPE tokenizer + Llama) and real caches built from it."""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import processes
import pytest
import torch

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.demo import TeacherSizes, make_teacher, stdlib_docstrings, write_corpus

torch.set_num_threads(1)

# The compiled target kernels go to a folder of this session, not ~/.cache (subprocesses inherit it).
_KERNELS = tempfile.mkdtemp(prefix="logitcache-kernels-")
os.environ.setdefault("LOGITCACHE_CACHE_DIR", _KERNELS)
atexit.register(shutil.rmtree, _KERNELS, True)

TEACHER_VOCAB = 512
SEQ_LEN = 32


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
    settings = dict(teacher=teacher_dir, corpus=corpus, out=out, seq_len=SEQ_LEN, batch_size=4, shard_size=16)
    settings.update(overrides)
    return run_build(BuildSettings(**settings))


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


def pytest_sessionfinish(session, exitstatus) -> None:
    """Last resort: stop whatever a test started and left running (each test stops its own already)."""
    left = processes.stop_session()
    if left:
        print(f"\nstopped {len(left)} processes the tests left running:\n" + "\n".join(left))
