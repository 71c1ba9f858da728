"""How to run a teacher: the build settings a backend reads."""

from __future__ import annotations

from dataclasses import dataclass

from logitcache.targets.spec import TargetSpec


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
