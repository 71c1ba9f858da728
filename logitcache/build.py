"""``logitcache build``: corpus → teacher → sparse targets → Parquet shards → manifest.

Crash safety: every file is written under a temporary name and renamed into place, and
``manifest.json`` comes last. ``build.json`` marks a folder as holding one particular build
(its fingerprint) while it is in progress. Re-running the same build skips every shard already
on disk and writes the rest; the result is byte-identical to an uninterrupted run.

Several workers (``num_workers``/``worker_index``) split the shards round-robin: worker ``w``
writes shards ``i`` with ``i % W == w`` and a partial manifest; whoever finishes last assembles
``manifest.json`` (or run ``logitcache merge``).
"""

from __future__ import annotations

import gc
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue
from threading import Event, Thread

import numpy as np

from logitcache import __version__
from logitcache.atomic import TMP_SUFFIX, sha256_file, write_json_atomic
from logitcache.corpus import Corpus, PackingStats, pack_windows, token_stream
from logitcache.errors import LogitcacheError
from logitcache.manifest import FORMAT_NAME, MANIFEST_NAME, fingerprint, shard_name, write_manifest
from logitcache.shards import FORMAT_VERSION, MAX_IDS_PER_POSITION, METHODS, WindowTargets, shard_metadata, write_shard
from logitcache.targets import SAMPLE_LOGPROB_BITS, TargetSpec
from logitcache.teacher import tokenizer_fingerprint

BUILD_MARKER = "build.json"
IN_FLIGHT = 2
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BuildSettings:
    """Everything ``logitcache build`` takes, one field per CLI option."""

    teacher: Path
    corpus: Path
    out: Path
    method: str = "topk"
    k: int = 32
    samples: int = 50
    seed: int = 0
    proposal_temperature: float = 1.0
    logprob_bits: int = SAMPLE_LOGPROB_BITS
    seq_len: int = 512
    batch_size: int = 8
    shard_size: int = 1024
    text_field: str = "text"
    overwrite: bool = False
    backend: str = "hf"
    device: str | None = None
    dtype: str | None = None
    chunk_mib: int | None = None
    cpu_streams: int | None = None
    num_workers: int = 1
    worker_index: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int | None = None
    ray: bool = False

    @property
    def spec(self) -> TargetSpec:
        return TargetSpec(self.method, self.k, self.samples, self.seed, self.proposal_temperature, self.logprob_bits)

    def check(self) -> None:
        """Reject settings that can never work, before anything is loaded or written."""
        if self.method not in METHODS:
            raise LogitcacheError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        rules = [
            (self.seq_len >= 2, f"--seq-len {self.seq_len}: need at least 2 tokens per window"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.shard_size >= 1, f"--shard-size {self.shard_size}: must be at least 1"),
            (self.k >= 1, f"--k {self.k}: must be at least 1"),
            (self.samples >= 1, f"--samples {self.samples}: N must be at least 1"),
            (self.k <= MAX_IDS_PER_POSITION and self.samples <= MAX_IDS_PER_POSITION,
             f"--k/--samples: at most {MAX_IDS_PER_POSITION} ids per position"),
            (self.proposal_temperature > 0, "--proposal-temperature must be positive"),
            (1 <= self.logprob_bits <= 10, f"--logprob-bits {self.logprob_bits}: float16 has 1 to 10 mantissa bits"),
            (self.cpu_streams is None or self.cpu_streams >= 1, f"--cpu-streams {self.cpu_streams}: must be at least 1"),
            (self.chunk_mib is None or self.chunk_mib >= 1, f"--chunk-mib {self.chunk_mib}: must be at least 1"),
            (self.dtype in (None, *TEACHER_DTYPES), f"--dtype {self.dtype}: choose one of {', '.join(TEACHER_DTYPES)}"),
            (self.num_workers >= 1 and 0 <= self.worker_index < self.num_workers,
             f"--worker-index {self.worker_index} must be in [0, --num-workers {self.num_workers})"),
            (not (self.overwrite and self.num_workers > 1),
             "--overwrite with several workers would delete each other's shards; empty the folder first"),
            (0 < self.gpu_memory_utilization <= 1, f"--gpu-memory-utilization {self.gpu_memory_utilization}: a fraction in (0, 1]"),
            (self.tensor_parallel_size >= 1, f"--tensor-parallel-size {self.tensor_parallel_size}: must be at least 1"),
            (self.max_num_seqs is None or self.max_num_seqs >= 1, f"--max-num-seqs {self.max_num_seqs}: must be at least 1"),
        ]
        for ok, message in rules:
            if not ok:
                raise LogitcacheError(message)
        Corpus.open(self.corpus, self.text_field)  # a missing or unreadable corpus fails before the teacher loads
        corpus, out = Path(self.corpus).resolve(), Path(self.out).resolve()
        if corpus.is_dir() and (out == corpus or corpus in out.parents):
            raise LogitcacheError(
                f"--out {self.out} lies inside --corpus {self.corpus}: a re-run (a resume) would read the cache's own "
                "shards as corpus documents; write the cache outside the corpus folder"
            )


def load_teacher(settings: BuildSettings):
    teacher_dir = Path(settings.teacher)
    if not teacher_dir.is_dir():
        raise LogitcacheError(f"teacher {teacher_dir} is not a directory")
    if settings.backend == "hf":
        from logitcache.teacher import HFTeacher

        return HFTeacher(teacher_dir, settings.device, settings.dtype, settings.chunk_mib)
    if settings.backend == "vllm":
        from logitcache.backends.vllm import VLLMTeacher

        return VLLMTeacher(teacher_dir, settings)
    raise LogitcacheError(f"--backend {settings.backend!r}: choose hf or vllm")


def _check_teacher(settings: BuildSettings, teacher) -> None:
    if teacher.max_positions is not None and settings.seq_len > teacher.max_positions:
        raise LogitcacheError(
            f"--seq-len {settings.seq_len} is beyond the teacher's context of {teacher.max_positions} tokens"
        )
    if settings.method == "topk" and settings.k > teacher.vocab_size:
        raise LogitcacheError(f"--k {settings.k} is larger than the teacher's vocabulary ({teacher.vocab_size})")
    if teacher.tokenizer.eos_token_id is None:
        raise LogitcacheError(f"the tokenizer in {settings.teacher} has no EOS token to separate documents")
    if len(teacher.tokenizer) > teacher.vocab_size:
        raise LogitcacheError(
            f"the tokenizer in {settings.teacher} has {len(teacher.tokenizer)} tokens but the teacher's output head "
            f"only {teacher.vocab_size}: ids from {teacher.vocab_size} on have no logits (tokens added after training?)"
        )


@dataclass
class _Plan:
    """What one build is: its identity, the metadata its shards carry and its windows."""

    identity: dict
    fingerprint: str
    teacher: dict
    tokenizer: dict
    corpus: Corpus
    stats: PackingStats


def _plan(settings: BuildSettings, teacher) -> _Plan:
    corpus = Corpus.open(settings.corpus, settings.text_field)
    teacher_info = teacher.describe()
    tok = teacher.tokenizer
    tokenizer_info = {
        "fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": len(tok),
        "eos_token_id": int(tok.eos_token_id),
    }
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": teacher_info["fingerprint"],
        "teacher_backend": teacher_info["backend"],  # backends differ in numerics and in the top-k tail
        "teacher_dtype": teacher_info["dtype"],
        "tokenizer_fingerprint": tokenizer_info["fingerprint"],
        "corpus_fingerprint": corpus.fingerprint(),
        "text_field": settings.text_field if corpus.has_fields else None,
        "method": settings.method,
        "params": settings.spec.params,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "shard_size": settings.shard_size,
    }
    return _Plan(identity, fingerprint(identity), teacher_info, tokenizer_info, corpus, PackingStats())


def _windows(plan: _Plan, teacher, seq_len: int) -> Iterator[np.ndarray]:
    tokens = token_stream(plan.corpus.documents(), teacher.tokenizer, teacher.tokenizer.eos_token_id, plan.stats)
    return pack_windows(tokens, seq_len, plan.stats)


def _prepare_out(settings: BuildSettings, plan: _Plan) -> None:
    """Claim the output folder for this build, refusing one that holds a different build."""
    out = Path(settings.out)
    ours = [BUILD_MARKER, MANIFEST_NAME]
    if out.exists() and not out.is_dir():
        raise LogitcacheError(f"--out {out} is a file, not a folder")
    # Temporaries do not count: another worker of this build may be writing build.json right now.
    if out.is_dir() and any(not p.name.endswith(TMP_SUFFIX) for p in out.iterdir()):
        marker = out / BUILD_MARKER
        manifest = out / MANIFEST_NAME
        recorded = _recorded_fingerprint(marker) or _recorded_fingerprint(manifest)
        if recorded != plan.fingerprint:
            if not settings.overwrite:
                what = "a different build" if recorded else "files that are not a logitcache build in progress"
                if recorded and not manifest.exists() and not any(out.glob("shard-*.parquet")):
                    # A build still running before its first shard looks the same as one that failed there.
                    what = ("a different build that has written no shard yet (one still running, or one that failed "
                            f"early: then delete {marker} or pass --overwrite)")
                raise LogitcacheError(f"--out {out} holds {what}; pass --overwrite to replace it")
            for path in itertools.chain(out.glob("shard-*.parquet*"), out.glob("manifest*.json*"), (out / p for p in ours)):
                if path.is_file():
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if settings.num_workers == 1:  # other workers may be writing their own temporaries right now
        clear_temporaries(out)
    write_json_atomic(out / BUILD_MARKER, {"format": FORMAT_NAME, "fingerprint": plan.fingerprint, "identity": plan.identity})


def _recorded_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _shard_record(path: Path, index: int, rows: int, seq_len: int, first_sequence_id: int) -> dict:
    return {
        "file": path.name,
        "index": index,
        "rows": rows,
        "tokens": rows * seq_len,
        "target_entries": shard_metadata(path)["target_entries"],
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "first_sequence_id": first_sequence_id,
    }


def _shard_complete(path: Path, plan: _Plan) -> bool:
    if not path.is_file():
        return False
    try:
        return shard_metadata(path).get("build_fingerprint") == plan.fingerprint
    except LogitcacheError:
        return False


def run_build(settings: BuildSettings, on_windows: Callable[[int], None] | None = None, teacher=None) -> dict:
    """Run (or resume) a build and return its manifest (or this worker's partial manifest).

    ``on_windows(n)`` is called as windows are queued on the teacher or found already on disk.
    ``teacher``: an already loaded teacher to reuse (benchmarks, long-lived workers); loaded from
    settings if None.
    """
    settings.check()
    if settings.ray:
        from logitcache.ray_build import run_ray_build

        return run_ray_build(settings)  # each Ray worker runs run_build with ray=False
    teacher = teacher or load_teacher(settings)
    _check_teacher(settings, teacher)
    plan = _plan(settings, teacher)
    windows = _windows(plan, teacher, settings.seq_len)
    first = next(windows, None)
    if first is None:
        raise LogitcacheError(
            f"corpus {settings.corpus} gives {plan.stats.tokens} tokens, fewer than one window of "
            f"--seq-len {settings.seq_len}"
        )
    _prepare_out(settings, plan)
    out = Path(settings.out)
    shard_meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "logitcache_version": __version__,
        "build_fingerprint": plan.fingerprint,
        "method": settings.method,
        "params": settings.spec.params,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "vocab_size": teacher.vocab_size,
        "teacher_fingerprint": plan.teacher["fingerprint"],
        "tokenizer_fingerprint": plan.tokenizer["fingerprint"],
    }
    records = []
    # vLLM schedules its own batches: hand it a whole shard at once (it splits into memory-bounded calls).
    piece = settings.shard_size if settings.backend == "vllm" else settings.batch_size
    pieces = _background(_pieces(itertools.chain([first], windows), settings.shard_size, piece),
                         depth=max(1, settings.shard_size // piece))
    with (closing(pieces), _frozen_heap(), ThreadPoolExecutor(max_workers=2) as host,
          _cpu_streams(teacher, settings.cpu_streams) as streams):
        write: Future | None = None
        in_flight: deque[Future] = deque()
        batches: list[Future] = []
        rows, todo = 0, False
        for index, part, last in pieces:
            if index % settings.num_workers != settings.worker_index:
                continue
            path = out / shard_name(index)
            first_id = index * settings.shard_size
            if rows == 0:  # the shard's first piece
                todo = not _shard_complete(path, plan)
            if todo:
                batch = np.stack(part)
                ids = np.arange(first_id + rows, first_id + rows + len(batch), dtype=np.int64)
                batches.append(_queue_batch(teacher, batch, ids, settings.spec, host, streams))
                in_flight.append(batches[-1])
                if len(in_flight) > IN_FLIGHT:
                    in_flight.popleft().result()
            rows += len(part)
            if on_windows is not None:
                on_windows(len(part))
            if not last:
                continue
            if todo:
                meta = {**shard_meta, "shard_index": index, "first_sequence_id": first_id}
                if write is not None:
                    write.result()
                write = host.submit(_write_shard, path, batches, meta)
            records.append((path, index, rows, first_id))
            batches, rows = [], 0
        if write is not None:
            write.result()
    shards = [_shard_record(p, i, rows, settings.seq_len, fid) for p, i, rows, fid in records]
    return _finish(settings, plan, teacher, shards)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects alive before the build (the teacher, torch, transformers: ~400k of them) out of
    Python's full garbage collections while it runs. Each full collection walks all of them (~0.3 s,
    ~5 % of a small CPU teacher's build), and a build's churn triggers one every few shards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _pieces(windows: Iterator[np.ndarray], shard_size: int, size: int) -> Iterator[tuple[int, list[np.ndarray], bool]]:
    """``(shard index, up to size windows, last piece of its shard?)``: shards cut into batches that
    never cross a shard boundary, so the teacher starts on a shard before all of it is tokenized."""
    for index in itertools.count():
        shard = itertools.islice(windows, shard_size)
        piece = list(itertools.islice(shard, size))
        if not piece:
            return
        while piece:
            following = list(itertools.islice(shard, size))
            yield index, piece, not following
            piece = following


TOKENIZER_THREAD = "logitcache-tokenizer"


def _background(items: Iterator, depth: int = 1) -> Iterator:
    """Run ``items`` (tokenization and packing) in a thread, ``depth`` items ahead of the consumer.

    A consumer that stops early (an error in the build) stops the thread too: it would otherwise
    stay blocked on the full queue for the life of the process, holding the corpus open.
    """
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stop = Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(done)
        except BaseException as exc:  # handed to the consumer, raised there
            hand_over(exc)

    Thread(target=produce, name=TOKENIZER_THREAD, daemon=True).start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@contextmanager
def _cpu_streams(teacher, requested: int | None) -> Iterator[ThreadPoolExecutor | None]:
    """On CPU, run ``requested`` teacher batches at once (default 2), each on an equal share of torch's threads.

    Small models leave cores idle inside one forward pass (many small ops, threads waiting at each),
    and the targets and Parquet work would otherwise run between forwards; independent streams fill
    those gaps. Each batch is computed exactly as without streams (the shards are byte-identical for
    1, 2 or 3 streams in tests/test_build.py). Yields None (no streams) on accelerators, which
    overlap through asynchronous queues instead.
    """
    import torch

    device = getattr(teacher, "device", None)
    threads = torch.get_num_threads()
    count = requested or min(2, threads)
    if device is None or torch.device(device).type != "cpu" or count <= 1:
        yield None
        return
    pool = ThreadPoolExecutor(count, thread_name_prefix="teacher", initializer=torch.set_num_threads,
                              initargs=(max(1, threads // count),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _queue_batch(teacher, batch: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec, host: ThreadPoolExecutor,
                 streams: ThreadPoolExecutor | None = None) -> Future:
    """Queue one batch of windows on the teacher; the future gives its :class:`WindowTargets`.

    Without CPU ``streams`` the device work is queued now and a host thread turns it into numpy as
    its copies land; the caller keeps at most ``IN_FLIGHT`` batches outstanding, which bounds pinned
    memory and lets the device run ahead of the host by that many batches. With ``streams`` the
    batch runs whole (forward, targets, numpy) on one stream; ``IN_FLIGHT + 1`` batches outstanding
    keep two streams busy.
    """
    if streams is None:
        return host.submit(teacher.compute_async(batch, sequence_ids, spec).result)
    return streams.submit(teacher.compute, batch, sequence_ids, spec)


def _write_shard(path: Path, batches: list[Future], metadata: dict) -> None:
    targets = WindowTargets.concat([f.result() for f in batches])
    check_finite(targets)
    write_shard(path, targets, {**metadata, "target_entries": len(targets.target_ids)})


def _manifest(settings: BuildSettings, plan: _Plan, teacher, shards: list[dict]) -> dict:
    rows = sum(s["rows"] for s in shards)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "logitcache_version": __version__,
        "fingerprint": plan.fingerprint,
        "method": settings.method,
        "params": settings.spec.params,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "shard_size": settings.shard_size,
        "vocab_size": teacher.vocab_size,
        "teacher": plan.teacher,
        "tokenizer": plan.tokenizer,
        "corpus": {
            "description": plan.corpus.describe(),
            "fingerprint": plan.identity["corpus_fingerprint"],
            "text_field": plan.identity["text_field"],
            "documents": plan.stats.documents,
            "tokens": plan.stats.tokens,
            "dropped_tokens": plan.stats.dropped_tokens,
        },
        "totals": {
            "sequences": rows,
            "tokens": rows * settings.seq_len,
            "positions": rows * (settings.seq_len - 1),
            "target_entries": sum(s["target_entries"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "shards": shards,
    }


def part_name(worker_index: int, num_workers: int) -> str:
    return f"manifest.part-{worker_index:05d}-of-{num_workers:05d}.json"


def _finish(settings: BuildSettings, plan: _Plan, teacher, shards: list[dict]) -> dict:
    out = Path(settings.out)
    manifest = _manifest(settings, plan, teacher, shards)
    if settings.num_workers == 1:
        write_manifest(out, manifest)
        (out / BUILD_MARKER).unlink(missing_ok=True)
        return manifest
    write_json_atomic(out / part_name(settings.worker_index, settings.num_workers), manifest)
    from logitcache.merge import merge_parts

    merged = merge_parts(out, missing_ok=True, num_workers=settings.num_workers)
    return merged or manifest


def check_finite(targets: WindowTargets) -> None:
    """Refuse targets holding NaN: a teacher whose logits overflowed (float16) or whose weights are broken."""
    columns = {"gold_logprob": targets.gold_logprob, "target_logprobs": targets.target_logprobs}
    if targets.tail_logprob is not None:
        columns["tail_logprob"] = targets.tail_logprob
    for name, values in columns.items():
        bad = np.isnan(values)
        if bad.any():
            row = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))[0] if values.ndim == 2 else None
            where = f" (first in sequence {int(targets.sequence_ids[row])})" if row is not None else ""
            raise LogitcacheError(
                f"the teacher gave NaN {name}{where}: its logits overflowed or its weights hold NaN; nothing of this "
                "shard was written. In float16 try --dtype bfloat16 or float32; check the checkpoint otherwise"
            )


def clear_temporaries(out: Path) -> None:
    """Remove ``*.tmp`` files a crashed run left behind (never counted as shards)."""
    for tmp in Path(out).glob(f"*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)

