"""What every benchmark shares: the import path, timing, peak memory, and the inputs they measure on.

Timing: :func:`best_time` (best of a few runs), :func:`fastest` (several cases, rounds
interleaved), :func:`median_time`; ``--clock cpu`` picks :data:`CLOCKS`' process CPU time, steadier
on a shared machine.

Memory is measured one way: the peak resident set size of a process from ``/proc/self/status``
(``VmHWM``), read inside the process whose peak it is, a fresh interpreter per case
(:func:`run_fresh`). Not ``getrusage``'s ``ru_maxrss``: Linux carries it across fork + exec, so a
child of the (large) benchmark process reports at least the parent's peak, and so does the parent's
``RUSAGE_CHILDREN`` after it.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, installed or not

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

# Where a benchmark makes the demo teacher when none is given (kept for the next run).
DEFAULT_WORK = Path("/tmp/logitcache-bench")


# ---- time ---------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeat: int = 3, clock: Callable[[], float] = time.perf_counter,
              warmup: bool = True) -> float:
    """Seconds of the fastest of ``repeat`` runs of ``fn`` by ``clock``, after one warm-up run."""
    if warmup:
        fn()
    best = math.inf
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def fastest(cases: Mapping[str, Callable[[], object]], rounds: int,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds of each case's fastest run over ``rounds`` rounds that run every case in turn: a slow
    spell on a shared machine hits all of them, and the fastest run of each is the least disturbed."""
    best = dict.fromkeys(cases, math.inf)
    for _ in range(rounds):
        for name, fn in cases.items():
            best[name] = min(best[name], best_time(fn, repeat=1, clock=clock, warmup=False))
    return best


def median_time(fn: Callable[[], object], runs: int, clock: Callable[[], float] = time.perf_counter,
                wait: Callable[[], object] | None = None) -> float:
    """Median seconds of ``runs`` runs of ``fn``; ``wait`` (e.g. ``torch.cuda.synchronize``) ends each run."""
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        if wait is not None:
            wait()
        times.append(clock() - start)
    return statistics.median(times)


# ---- memory -------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))


def peak_rss() -> int:
    """Bytes: this process's peak resident set (``VmHWM``) since it started or since :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def rss() -> int:
    """Bytes: this process's resident set now (``VmRSS``)."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Set :func:`peak_rss` back to the resident set now (Linux ``clear_refs``), to measure one stretch of work."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def run_fresh(script: str | Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Stdout of ``python SCRIPT ARGS`` in a fresh interpreter (one case: its own peak RSS and warm-up);
    a failure stops the benchmark with the end of the case's stderr."""
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"{Path(script).name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


# ---- inputs -------------------------------------------------------------------------------


def small_corpus(corpus: Path, out: Path, approx_bytes: int) -> Path:
    """The first documents of a JSON Lines corpus, about ``approx_bytes`` of it, written to ``out``."""
    lines, size = [], 0
    for line in corpus.open():
        lines.append(line)
        size += len(line)
        if size >= approx_bytes:
            break
    out.write_text("".join(lines))
    return out


def ensure_teacher(teacher: Path, corpus: Path, work: Path = DEFAULT_WORK) -> tuple[Path, Path]:
    """(teacher, corpus): the given ones if they exist, else ``make demo``'s teacher made under ``work``
    (bit for bit the demo's, with :func:`logitcache.demo.make_trained_teacher`) and reused next time."""
    if (teacher / "config.json").is_file() and corpus.is_file():
        return teacher, corpus
    from logitcache.demo import make_trained_teacher, stdlib_docstrings, write_corpus

    corpus, trained = work / "corpus.jsonl", work / "teacher-run" / "student"
    if not (trained / "config.json").is_file():
        print(f"no teacher at {teacher}: making the demo's under {work} (a few minutes)...", file=sys.stderr, flush=True)
        docs = list(stdlib_docstrings())
        write_corpus(corpus, iter(docs))
        shutil.rmtree(work / "teacher-run", ignore_errors=True)  # an interrupted pretraining starts afresh
        make_trained_teacher(work, docs)
    return trained, corpus


def teacher_arguments(parser, corpus_bytes: int = 400_000) -> None:
    """The options every benchmark that runs the demo teacher takes: teacher, corpus, sizes."""
    parser.add_argument("--teacher", type=Path, default=Path("demo-out/teacher-run/student"))
    parser.add_argument("--corpus", type=Path, default=Path("demo-out/corpus.jsonl"))
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where a missing teacher is pretrained")
    parser.add_argument("--corpus-bytes", type=int, default=corpus_bytes, help="how much of the corpus to build over")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)


# ---- writers --------------------------------------------------------------------------------

