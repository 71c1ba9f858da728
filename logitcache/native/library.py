"""Compile ``kernels.c`` once per machine and CPU, crash-safe, and load it with ctypes (or say why not: None)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

from logitcache.files import write_atomic

log = logging.getLogger(__name__)


SOURCE = Path(__file__).with_name("kernels.c")


FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared", "-std=c99")


ARCH_FLAGS = ("-march=native",)  # tried first, dropped where the compiler does not take it


ENV_SWITCH = "LOGITCACHE_NATIVE"


def cache_dir() -> Path:
    if env := os.environ.get("LOGITCACHE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "logitcache"


def _compiler() -> list[str] | None:
    """The compiler command (``$CC`` may hold several words, e.g. ``ccache gcc``), or None."""
    if env := os.environ.get("CC"):
        words = shlex.split(env)
        return words if words and shutil.which(words[0]) else None
    return next(([path] for c in ("cc", "gcc", "clang") if (path := shutil.which(c))), None)


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (a shared cache folder
    may be read from machines with different CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


ELF_MAGIC = b"\x7fELF"


def _compile(compiler: list[str], out: Path) -> Path:
    """Compile the kernels to ``out``, crash-safe (:func:`logitcache.files.write_atomic`): concurrent
    workers racing on a cold cache, or a crash, never leave a partial library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (ARCH_FLAGS, ()):

        def build(tmp: Path) -> None:
            command = [*compiler, *FLAGS, *arch, str(SOURCE), "-o", str(tmp), "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not _looks_like_a_library(tmp):
                raise OSError(f"{' '.join(command)}: exit {done.returncode} {done.stderr.strip()[-500:]}")
            tmp.chmod(0o755)  # a shared cache folder serves every user

        try:
            write_atomic(out, build)
            return out
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("; ".join(errors))


def _looks_like_a_library(path: Path) -> bool:
    """Catches a "compiler" that exits 0 without output (``CC=true``); ELF platforms only (Mach-O passes)."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(4)
    return len(head) == 4 and (head == ELF_MAGIC or platform.system() != "Linux")


_lock = threading.Lock()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (torch fallback) when disabled or when no compiler can build them.

    One compile per process whatever the threads; a cached file that fails to load is rebuilt once."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: building targets with torch (slower on CPU; set CC to use one)")
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *compiler, *FLAGS, *ARCH_FLAGS, _cpu_signature()]).encode())
    path = cache_dir() / f"native_targets-{key.hexdigest()[:16]}.so"
    with _lock:
        try:
            lib = _load(compiler, path)
        except OSError as exc:
            log.info("cannot build the CPU target kernels (%s): building targets with torch instead", exc)
            return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lc_topk.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.lc_topk.restype = i64  # labels outside the vocabulary
    lib.lc_sample.argtypes = [ptr, i64, i64, i64, ctypes.c_float, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.lc_sample.restype = i64
    lib.lc_collate.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.lc_collate.restype = None
    return lib


def _load(compiler: list[str], path: Path) -> ctypes.CDLL:
    if path.is_file():
        try:
            if _looks_like_a_library(path):
                return ctypes.CDLL(str(path))
        except OSError:
            pass
        path.unlink(missing_ok=True)  # unreadable or foreign: rebuild it
    return ctypes.CDLL(str(_compile(compiler, path)))


def usable(logits: torch.Tensor) -> bool:
    """Whether the kernels can take these logits: float32 on CPU, and the library is available."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and library() is not None


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def address(array: np.ndarray | None) -> ctypes.c_void_p | None:
    return None if array is None else ctypes.c_void_p(array.ctypes.data)
