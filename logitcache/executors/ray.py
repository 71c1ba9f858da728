"""``logitcache build --ray``: the ``--num-workers`` workers of one build as Ray tasks.

Each task runs :func:`logitcache.build.run.run_build` with its own ``worker_index`` (shards ``i`` with
``i % W == w``), exactly as W separate ``logitcache build --worker-index w`` processes would, so a Ray
build is byte-identical to any other split of the same build, and resumable the same way. The
driver joins a running cluster (``ray.init(address="auto")``; ``RAY_ADDRESS`` picks one) or starts
a local instance, waits, and returns the merged manifest.

Every node needs logitcache (the same version) installed and must see ``--teacher``, ``--corpus`` and
``--out`` at the same paths (a shared filesystem). A task asks for ``--tensor-parallel-size`` GPUs when
the cluster has GPUs (unless ``--device cpu``), else for one CPU; tasks beyond the free GPUs wait.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.merge import merge_parts
from logitcache.errors import LogitcacheError

log = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise LogitcacheError(f"--ray needs Ray, which is not installed ({exc}); pip install 'logitcache[ray]'") from exc
    return ray


def _connect(ray) -> bool:
    """Join the running cluster, or start a local instance; True if this call started the connection."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address="auto")
        log.info("joined the running Ray cluster")
    except ConnectionError:
        ray.init(include_dashboard=False)
        log.info("no running Ray cluster found: started a local instance")
    return True


def gpus_per_worker(settings: BuildSettings, cluster_gpus: float) -> int:
    """GPUs a worker task asks Ray for: one teacher replica's, when the cluster has GPUs to give."""
    if settings.device == "cpu" or cluster_gpus == 0:
        if settings.backend == "vllm":
            raise LogitcacheError("--backend vllm needs GPUs, and the Ray cluster has none (or --device cpu was given)")
        return 0
    return settings.tensor_parallel_size


def _worker(settings: BuildSettings) -> dict:
    return run_build(settings)


def run_ray_build(settings: BuildSettings) -> dict:
    """Run ``settings.num_workers`` workers of one build as Ray tasks; return the merged manifest."""
    settings.check()
    ray = _import_ray()
    started = _connect(ray)
    try:
        gpus = gpus_per_worker(settings, ray.cluster_resources().get("GPU", 0))
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_worker)
        workers = {task.remote(replace(settings, worker_index=w, ray=False)): w for w in range(settings.num_workers)}
        log.info("%d workers scheduled on Ray (%d GPUs each)", len(workers), gpus)
        manifests = _wait(ray, workers)
    finally:
        if started:
            ray.shutdown()
    return manifests[0] if settings.num_workers == 1 else merge_parts(Path(settings.out), num_workers=settings.num_workers)


def _wait(ray, workers: dict) -> list[dict]:
    """Results in worker order; the first failure cancels the rest (a rerun resumes) and is raised."""
    results: dict[int, dict] = {}
    pending = dict(workers)
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ref)
        try:
            results[index] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            for other in pending:
                ray.cancel(other)
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, LogitcacheError):
                raise LogitcacheError(f"worker {index}: {cause}") from exc
            raise LogitcacheError(f"worker {index} failed: {type(cause).__name__}: {cause}") from exc
        log.info("worker %d done", index)
    return [results[w] for w in sorted(results)]
