"""Load a teacher on the backend the build asks for (``--backend``): the one place that knows every backend."""

from __future__ import annotations

from pathlib import Path

from logitcache.errors import LogitcacheError
from logitcache.teacher.base import Teacher
from logitcache.teacher.hf import HFTeacher
from logitcache.teacher.options import TeacherOptions
from logitcache.teacher.vllm import VLLMTeacher

BACKENDS = ("hf", "vllm")


def load_teacher(path: Path, options: TeacherOptions) -> Teacher:
    """The teacher in the Hugging Face model folder ``path``, on ``options.backend``."""
    path = Path(path)
    if not path.is_dir():
        raise LogitcacheError(f"teacher {path} is not a directory")
    if options.backend == "hf":
        return HFTeacher(path, options.device, options.dtype, options.chunk_mib)
    if options.backend == "vllm":
        return VLLMTeacher(path, options)
    raise LogitcacheError(f"--backend {options.backend!r}: choose {' or '.join(BACKENDS)}")
