"""Ray workers: two tasks on a local CPU instance build the same cache as one worker, bit for bit."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import SEQ_LEN, build_cache
from logitcache.build import BuildSettings
from logitcache.errors import LogitcacheError
from logitcache.ray_build import gpus_per_worker, run_ray_build
from logitcache.shards import read_shard

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_two_ray_workers_equal_one_worker(local_ray, teacher_dir, corpus_file, tmp_path):
    options = dict(method="sample", samples=8, seq_len=SEQ_LEN, batch_size=4, shard_size=16)
    single = build_cache(teacher_dir, corpus_file, tmp_path / "single", **options)
    settings = BuildSettings(
        teacher=teacher_dir, corpus=corpus_file, out=tmp_path / "ray", num_workers=2, ray=True, **options
    )

    merged = run_ray_build(settings)

    assert len(single["shards"]) >= 4, "both workers must have shards to write"
    assert merged == single
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text()) == single
    for shard in single["shards"]:
        got, want = read_shard(tmp_path / "ray" / shard["file"]), read_shard(tmp_path / "single" / shard["file"])
        for name, value in vars(want).items():
            np.testing.assert_array_equal(getattr(got, name), value, err_msg=f"{shard['file']}: {name}")


def test_a_failing_worker_is_one_clear_error(local_ray, corpus_file, tmp_path):
    settings = BuildSettings(teacher=tmp_path / "missing", corpus=corpus_file, out=tmp_path / "out", num_workers=2, ray=True)
    with pytest.raises(LogitcacheError, match=r"worker \d: teacher .*missing is not a directory"):
        run_ray_build(settings)


def test_workers_ask_for_one_replica_of_gpus(tmp_path):
    settings = BuildSettings(teacher=tmp_path, corpus=tmp_path, out=tmp_path, tensor_parallel_size=4)
    assert gpus_per_worker(settings, cluster_gpus=8) == 4
    assert gpus_per_worker(settings, cluster_gpus=0) == 0
    assert gpus_per_worker(BuildSettings(teacher=tmp_path, corpus=tmp_path, out=tmp_path, device="cpu"), 8) == 0
    with pytest.raises(LogitcacheError, match="needs GPUs"):
        gpus_per_worker(BuildSettings(teacher=tmp_path, corpus=tmp_path, out=tmp_path, backend="vllm"), cluster_gpus=0)


def test_missing_ray_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    corpus = tmp_path / "corpus.txt"  # settings are checked first, the corpus among them
    corpus.write_text("some text\n")
    with pytest.raises(LogitcacheError, match=r"pip install 'logitcache\[ray\]'"):
        run_ray_build(BuildSettings(teacher=tmp_path, corpus=corpus, out=tmp_path, num_workers=2, ray=True))
