"""How to run a teacher: the build settings a backend reads, and the default size of an output-head chunk."""

from __future__ import annotations

from dataclasses import dataclass

from logitcache.targets.spec import TargetSpec

CUDA_CHUNK_MIB = 1024  # default --chunk-mib on CUDA
CPU_CHUNK_MIB = 16  # default --chunk-mib on CPU: cache-sized chunks are fastest at small vocabularies...
# ...but a CPU chunk has at least this many rows by default. Every chunk reads the whole [V, H] head
# weight from memory (670 MB at 262k ids and hidden 640) for 2·rows·V·H flops, so few rows leave the
# head waiting on memory: 16 MiB is 10 rows at 128k ids and 5 at 262k. On one thread, head + top-k
# of a hidden-640 teacher ran 5.8× (128k ids) and 6.5× (262k) faster with 128 rows than with those,
# and 256 or 512 rows added only 8-11 % more (bench_vocab.py --tables chunks, benchmarks/RESULTS.md).
# The price is memory that grows with V from 11k ids on: 128 × V × 12 B, 384 MiB per CPU stream at
# 262k ids, a fifth of the [1024, V] float32 logits and log-softmax a plain forward of 4 × 256 tokens holds.
CPU_MIN_CHUNK_ROWS = 128


@dataclass(frozen=True)
class TeacherOptions:
    """How to run a teacher: the build settings a backend reads (``--backend``, ``--device``, ...;
    :meth:`logitcache.build.settings.BuildSettings.teacher_options` fills them in, defaults and all)."""

    backend: str
    device: str | None
    dtype: str | None
    chunk_mib: int | None
    seq_len: int
    spec: TargetSpec  # what the teacher will extract (vllm sizes its engine for it)
    tensor_parallel_size: int  # vllm
    gpu_memory_utilization: float  # vllm
    max_num_seqs: int | None  # vllm
