"""The build's moving parts: tokenization ahead in a thread, batches cut at shard boundaries, CPU
teacher streams, device work queued ahead of the host."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from queue import Full, Queue
from threading import Event, Thread

import numpy as np

from logitcache.chat import ChatExample, pad_behavior, pad_examples
from logitcache.corpus import pad_rows
from logitcache.targets.spec import TargetSpec

IN_FLIGHT = 2


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive before the build (the teacher, torch, transformers: ~400k of them) out of
    Python's full garbage collections while it runs. Each full collection walks all of them (~0.3 s,
    ~5 % of a small CPU teacher's build), and a build's churn triggers one every few shards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def pieces_of(windows: Iterator, shard_size: int, size: int,
              tokens: int | None = None) -> Iterator[tuple[int, list, np.ndarray, bool]]:
    """``(shard index, a batch of rows, their places in the shard [R] int64, last piece of its shard?)``:
    shards cut into batches that never cross a shard boundary.

    ``tokens`` None: batches of ``size`` rows in corpus order, so the teacher starts on a shard before
    all of it is tokenized. ``tokens``: rows of different lengths (``--packing documents``, chat), the
    whole shard sorted longest first and cut into batches of at most ``tokens`` tokens padded (and
    ``size`` rows at least one): a batch pads little, and short rows go many to a batch instead of
    ``size`` to a small one (the rows are put back in order when written).
    """
    for index in itertools.count():
        shard = itertools.islice(windows, shard_size)
        if tokens is not None:
            rows = list(shard)
            if not rows:
                return
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # stable: ties keep corpus order
            start = 0
            while start < len(order):
                count = max(1, tokens // len(rows[order[start]]))  # longest first: the first row sets the width
                places = np.asarray(order[start : start + count], dtype=np.int64)
                start += len(places)
                yield index, [rows[i] for i in places], places, start >= len(order)
            continue
        piece, done = list(itertools.islice(shard, size)), 0
        if not piece:
            return
        while piece:
            following = list(itertools.islice(shard, size))
            yield index, piece, np.arange(done, done + len(piece), dtype=np.int64), not following
            done += len(piece)
            piece = following


TOKENIZER_THREAD = "logitcache-tokenizer"


def background(items: Iterator, depth: int = 1) -> Iterator:
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
def cpu_streams(teacher, requested: int | None) -> Iterator[ThreadPoolExecutor | None]:
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


def batch_of(rows: list) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A batch of rows (token id arrays, or :class:`~logitcache.chat.ChatExample`) as the teacher takes it:
    ``input_ids [B, n] int64`` right-padded, ``token_counts [B]`` (None: no padding) and ``target_mask
    [B, n-1] bool`` (None: every real position gets targets)."""
    if isinstance(rows[0], ChatExample):
        return pad_examples(rows)
    return (*pad_rows(rows), None)


def behavior_of(rows: list) -> np.ndarray | None:
    """The behaviour log-probabilities of a batch of rows as :func:`batch_of` pads them, ``[B, n-1] float32``
    (NaN where a token was not drawn by a recorded sampler): for chat rows, which shard format v3 stores them
    for; None for text rows."""
    return pad_behavior(rows) if isinstance(rows[0], ChatExample) else None


def queue_batch(teacher, batch: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec, host: ThreadPoolExecutor,
                 streams: ThreadPoolExecutor | None = None, token_counts: np.ndarray | None = None,
                 target_mask: np.ndarray | None = None) -> Future:
    """Queue one batch of rows ``[B, n]`` (see :func:`batch_of`) on the teacher; the future gives its
    :class:`WindowTargets`.

    Without CPU ``streams`` the device work is queued now and a host thread turns it into numpy as
    its copies land; the caller keeps at most ``IN_FLIGHT`` batches outstanding, which bounds pinned
    memory and lets the device run ahead of the host by that many batches. With ``streams`` the
    batch runs whole (forward, targets, numpy) on one stream; ``IN_FLIGHT + 1`` batches outstanding
    keep two streams busy.
    """
    if streams is None:
        return host.submit(teacher.compute_async(batch, sequence_ids, spec, token_counts, target_mask).result)
    return streams.submit(teacher.compute, batch, sequence_ids, spec, token_counts, target_mask)
