"""Run one build (or one worker's share of it): corpus → teacher → shards → manifest.

Crash safety: every file is written under a temporary name and renamed into place, and
``manifest.json`` comes last. ``build.json`` marks a folder as holding one particular build
(its fingerprint) while it is in progress. Re-running the same build skips every shard already
on disk and writes the rest; the result is byte-identical to an uninterrupted run.

Several workers (``num_workers``/``worker_index``) split the shards round-robin: worker ``w``
writes shards ``i`` with ``i % W == w`` and a partial manifest; whoever finishes last assembles
``manifest.json`` (or run ``logitcache merge``). :mod:`logitcache.executors.ray` runs the workers
as Ray tasks.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np

from logitcache.build.pipeline import IN_FLIGHT, background, batch_of, behavior_of, cpu_streams, frozen_heap, pieces_of, queue_batch
from logitcache.build.plan import Plan, plan_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import WindowTargets, shard_metadata, write_shard
from logitcache.cache.layout import BUILD_MARKER, MANIFEST_NAME, MANIFESTS_PATTERN, SHARD_PATTERN, part_name, shard_name
from logitcache.cache.manifest import write_manifest
from logitcache.cache.merge import merge_parts
from logitcache.errors import LogitcacheError
from logitcache.files import TMP_SUFFIX, clear_temporaries, sha256_file, write_json_atomic
from logitcache.teacher.base import Teacher
from logitcache.teacher.load import load_teacher


def _check_teacher(settings: BuildSettings, teacher: Teacher) -> None:
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


def _prepare_out(settings: BuildSettings, plan: Plan) -> None:
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
                if recorded and not manifest.exists() and not any(out.glob(SHARD_PATTERN)):
                    # A build still running before its first shard looks the same as one that failed there.
                    what = ("a different build that has written no shard yet (one still running, or one that failed "
                            f"early: then delete {marker} or pass --overwrite)")
                raise LogitcacheError(f"--out {out} holds {what}; pass --overwrite to replace it")
            for path in itertools.chain(out.glob(f"{SHARD_PATTERN}*"), out.glob(MANIFESTS_PATTERN), (out / p for p in ours)):
                if path.is_file():
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if settings.num_workers == 1:  # other workers may be writing their own temporaries right now
        clear_temporaries(out)
    write_json_atomic(out / BUILD_MARKER, plan.marker())


def _recorded_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _shard_record(path: Path, index: int, rows: int, first_sequence_id: int) -> dict:
    own = shard_metadata(path)
    return {
        "file": path.name,
        "index": index,
        "rows": rows,
        "tokens": own["tokens"],
        "target_entries": own["target_entries"],
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "first_sequence_id": first_sequence_id,
    }


def _shard_complete(path: Path, plan: Plan) -> bool:
    if not path.is_file():
        return False
    try:
        return shard_metadata(path).get("build_fingerprint") == plan.fingerprint
    except LogitcacheError:
        return False


def run_build(settings: BuildSettings, on_windows: Callable[[int], None] | None = None, teacher: Teacher | None = None) -> dict:
    """Run (or resume) a build and return its manifest (or this worker's partial manifest).

    ``on_windows(n)`` is called as windows are queued on the teacher or found already on disk.
    ``teacher``: an already loaded teacher to reuse (benchmarks, long-lived workers); loaded from
    settings if None.
    """
    settings.check()
    if settings.ray:  # the build never starts Ray itself: the executor runs its workers (ray=False each)
        raise LogitcacheError("ray=True: run the workers with logitcache.executors.ray.run_ray_build")
    teacher = teacher or load_teacher(settings.teacher, settings.teacher_options())
    _check_teacher(settings, teacher)
    plan = plan_build(settings, teacher)
    windows = plan.windows(teacher.tokenizer)
    first = next(windows, None)
    if first is None:
        raise LogitcacheError(
            f"corpus {settings.corpus} gives {plan.stats.tokens} tokens, fewer than one window of "
            f"--seq-len {settings.seq_len}" if settings.packing == "stream" else
            f"corpus {settings.corpus} gives no document of 2 tokens or more" if settings.format == "text" else
            f"corpus {settings.corpus} gives no example with a target within --seq-len {settings.seq_len}"
        )
    _prepare_out(settings, plan)
    out = Path(settings.out)
    records = []
    # vLLM schedules its own batches: hand it a whole shard at once (it splits into memory-bounded calls).
    piece = settings.shard_size if settings.backend == "vllm" else settings.batch_size
    # Rows of different lengths: batches of up to batch_size × seq_len tokens, the longest first.
    tokens = piece * settings.seq_len if settings.packing == "documents" else None
    pieces = background(pieces_of(itertools.chain([first], windows), settings.shard_size, piece, tokens),
                        depth=max(1, settings.shard_size // piece))
    with (closing(pieces), frozen_heap(), ThreadPoolExecutor(max_workers=2) as host,
          cpu_streams(teacher, settings.cpu_streams) as streams):
        write: Future | None = None
        in_flight: deque[Future] = deque()
        batches: list[Future] = []
        rows, todo = 0, False
        for index, part, places, last in pieces:
            if index % settings.num_workers != settings.worker_index:
                continue
            path = out / shard_name(index)
            first_id = index * settings.shard_size
            if rows == 0:  # the shard's first piece
                todo = not _shard_complete(path, plan)
            if todo:
                batch, token_counts, target_mask = batch_of(part)
                computed = queue_batch(teacher, batch, first_id + places, settings.spec, host, streams, token_counts,
                                       target_mask)
                batches.append((computed, behavior_of(part)))
                in_flight.append(computed)
                if len(in_flight) > IN_FLIGHT:
                    in_flight.popleft().result()
            rows += len(part)
            if on_windows is not None:
                on_windows(len(part))
            if not last:
                continue
            if todo:
                meta = plan.shard_metadata(index, first_id)
                if write is not None:
                    write.result()
                write = host.submit(_write_shard, path, batches, meta)
            records.append((path, index, rows, first_id))
            batches, rows = [], 0
        if write is not None:
            write.result()
    shards = [_shard_record(p, i, rows, fid) for p, i, rows, fid in records]
    return _finish(settings, plan, shards)


def _write_shard(path: Path, batches: list[tuple[Future, np.ndarray | None]], metadata: dict) -> None:
    """The teacher's targets of ``batches`` (each with the rows' behaviour log-probabilities, or None) as shard ``path``."""
    targets = WindowTargets.concat([replace(f.result(), behavior_logprob=behavior) for f, behavior in batches])
    targets = targets.select(np.argsort(targets.sequence_ids, kind="stable"))  # batched by length: back in order
    check_finite(targets)
    write_shard(path, targets, {**metadata, "target_entries": len(targets.target_ids),
                                "tokens": int(targets.tokens().sum())})


def _finish(settings: BuildSettings, plan: Plan, shards: list[dict]) -> dict:
    out = Path(settings.out)
    manifest = plan.manifest(shards)
    if settings.num_workers == 1:
        write_manifest(out, manifest)
        (out / BUILD_MARKER).unlink(missing_ok=True)
        return manifest
    write_json_atomic(out / part_name(settings.worker_index, settings.num_workers), manifest)
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
