"""Compiled CPU kernels for the build's targets and the loader's dense batches (``native_targets.c``),
with torch (numpy for the loader) as the fallback.

On CPU, :func:`logitcache.targets.row_targets` spends more time in torch's passes over
``[rows, V]`` (log-softmax, ``torch.topk``, the sampler's block sums and scans) than a small
teacher spends in its output head. The C kernels do each row in two passes while it sits in L1.
They are compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) into ``$LOGITCACHE_CACHE_DIR`` (default ``~/.cache/logitcache``), keyed by the source,
compiler, flags and CPU, and loaded with ctypes (calls release the GIL, so CPU streams run them in
parallel). Without a compiler, or with ``LOGITCACHE_NATIVE=0``, the torch path runs instead; the
two agree to float32 rounding (see the C file's header).
"""

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
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_targets.c")
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
    """Compile the kernels to ``out``: written under a temporary name, checked, fsynced and renamed,
    so that concurrent workers racing on a cold cache, or a crash, never leave a partial library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (ARCH_FLAGS, ()):
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        command = [*compiler, *FLAGS, *arch, str(SOURCE), "-o", str(tmp_path), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode == 0 and _looks_like_a_library(tmp_path):
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            tmp_path.chmod(0o755)  # temporaries are 0600; a shared cache folder serves every user
            os.replace(tmp_path, out)
            return out
        tmp_path.unlink(missing_ok=True)
        errors.append(f"{' '.join(command)}: exit {done.returncode} {done.stderr.strip()[-500:]}")
    raise OSError("; ".join(errors))


def _looks_like_a_library(path: Path) -> bool:
    """Catches a "compiler" that exits 0 without output (``CC=true``); ELF platforms only (Mach-O passes)."""
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


def _pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _rows(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Contiguous inputs of the right dtypes, with shapes checked: the C side trusts them."""
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [rows, vocab] with vocab >= 1, not {list(logits.shape)}")
    rows = logits.shape[0]
    for name, tensor in (("labels", labels), ("keys", keys)):
        if tensor is not None and tensor.shape != (rows,):
            raise ValueError(f"{name} must be [rows] = [{rows}], not {list(tensor.shape)}")
    out = [logits.contiguous(), labels.to(torch.int64).contiguous()]
    return (*out, keys.to(torch.int64).contiguous()) if keys is not None else tuple(out)


def _check_labels(bad: int, vocab: int) -> None:
    if bad:
        raise ValueError(f"{bad} labels lie outside [0, {vocab}): the rows' vocabulary")


def topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Top-``k`` of ``logits [R, V] float32`` (CPU): ids ``[R, k] int32`` and log-softmax ``[R, k]
    float32`` (descending; equal logits by lower id), log of the mass outside them ``[R]`` and the
    log-softmax at ``labels [R]``."""
    logits, labels = _rows(logits, labels)
    rows, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k}: need 1 <= k <= vocab ({vocab})")
    ids = torch.empty(rows, k, dtype=torch.int32)
    logprobs = torch.empty(rows, k)
    tail, gold = torch.empty(rows), torch.empty(rows)
    bad = library().lc_topk(_pointer(logits), rows, vocab, k, _pointer(labels),
                            _pointer(ids), _pointer(logprobs), _pointer(tail), _pointer(gold))
    _check_labels(bad, vocab)
    return ids, logprobs, tail, gold


def sample(logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, n: int, temperature: float,
           block_size: int) -> tuple[torch.Tensor, ...]:
    """``n`` draws per row of ``logits [R, V] float32`` (CPU) at ``temperature``, grouped: ids, log-softmax
    and counts ``[R, n]`` (int32, float32, int32; padded after ``lengths [R] int32`` entries), and the
    log-softmax at ``labels [R]``. Draws are those of :func:`logitcache.targets.draw` for the same
    ``keys [R] int64`` and ``block_size``, up to float32 rounding."""
    logits, labels, keys = _rows(logits, labels, keys)
    rows, vocab = logits.shape
    if n < 1 or block_size < 1 or not temperature > 0:
        raise ValueError(f"need n >= 1, block_size >= 1 and temperature > 0, not {n}, {block_size}, {temperature}")
    ids = torch.empty(rows, n, dtype=torch.int32)
    logprobs = torch.empty(rows, n)
    counts = torch.empty(rows, n, dtype=torch.int32)
    lengths = torch.empty(rows, dtype=torch.int32)
    gold = torch.empty(rows)
    bad = library().lc_sample(_pointer(logits), rows, vocab, n, 1.0 / temperature, block_size, _pointer(keys),
                              _pointer(labels), _pointer(ids), _pointer(logprobs), _pointer(counts), _pointer(lengths),
                              _pointer(gold))
    _check_labels(bad, vocab)
    return ids, logprobs, counts, lengths, gold


def _address(array: np.ndarray | None) -> ctypes.c_void_p | None:
    return None if array is None else ctypes.c_void_p(array.ctypes.data)


def dense_rows(lengths: np.ndarray, width: int, ids: np.ndarray, logprobs: np.ndarray, weights: np.ndarray,
               covered: np.ndarray | None = None) -> tuple[np.ndarray, ...] | None:
    """The loader's dense layout of flat per-id columns in one pass, or None without the library.

    ``lengths [...]`` entries per position (any shape; the outputs are ``lengths.shape + (width,)``),
    ``ids`` int32, ``logprobs`` and ``weights`` float32 ``[S]``; returns ids int64, logprobs, weights,
    mask bool (0 / False after each position's entries) and, with ``covered [S]`` float64, the
    per-position sum of it (``lengths.shape``, added in entry order like ``numpy.bincount``).
    """
    lib = library()
    if lib is None:
        return None
    lengths = np.asarray(lengths)
    low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
    if lengths.dtype.kind not in "ui" or not 0 <= low <= high <= 0xFFFF:
        raise ValueError(f"lengths must be integers in [0, 65535], not {lengths.dtype} from {low} to {high}")
    flat = np.ascontiguousarray(lengths, dtype=np.uint16).reshape(-1)
    entries = int(flat.sum(dtype=np.int64))
    columns = [np.ascontiguousarray(a, dtype=t) for a, t in ((ids, np.int32), (logprobs, np.float32), (weights, np.float32))]
    if covered is not None:
        columns.append(np.ascontiguousarray(covered, dtype=np.float64))
    # The C side reads exactly `entries` values of each column: flat columns of that size only.
    if any(c.ndim != 1 or c.size != entries for c in columns) or not high <= width:
        raise ValueError(f"lengths add up to {entries} entries of at most {high} per position; "
                         f"got columns of {[c.shape for c in columns]} and width {width}")
    shape = (*lengths.shape, width)
    out = (np.empty(shape, np.int64), np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.bool_))
    mass = np.empty(lengths.shape, np.float64) if covered is not None else None
    lib.lc_collate(_address(flat), flat.size, width, *(_address(c) for c in columns[:3]),
                   _address(columns[3] if covered is not None else None), *(_address(a) for a in out), _address(mass))
    return (*out, mass) if covered is not None else out
