"""Ray workers: two tasks on a local CPU instance build the same cache as one worker, bit for bit.

Ray runs in a driver process of its own (tests/ray_driver.py), never inside pytest: see that file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import processes
import pytest
from conftest import SEQ_LEN, build_cache

from logitcache.build.settings import BuildSettings
from logitcache.cache.format import read_shard
from logitcache.errors import LogitcacheError
from logitcache.executors.ray import gpus_per_worker, run_ray_build

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("ray_driver.py")
DRIVER_TIMEOUT_S = 900  # Ray's start on a loaded machine and two small builds; a hang fails the test, not CI


def ray_builds(builds: dict[str, dict], tmp_path: Path) -> dict[str, dict]:
    """Run ``builds`` (BuildSettings fields) with ``run_ray_build`` in a driver process of their own
    (tests/ray_driver.py) and return each one's manifest or error. A driver that dies or hangs fails
    the calling test with Ray's output; every process Ray started is stopped, whatever happened."""
    temp_dir = tempfile.mkdtemp(prefix="lcray-")  # short: Ray's socket paths must fit in 107 bytes
    job, result, log = tmp_path / "job.json", tmp_path / "result.json", tmp_path / "driver.log"
    job.write_text(json.dumps({"temp_dir": temp_dir, "result": str(result),
                               "builds": {name: {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}
                                          for name, fields in builds.items()}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join a cluster already running
    try:
        with open(log, "w") as output, processes.tracked([sys.executable, str(DRIVER), str(job)], env=env, cwd=REPO,
                                                         stdin=subprocess.DEVNULL, stdout=output,
                                                         stderr=subprocess.STDOUT) as driver:
            try:
                code = driver.wait(timeout=DRIVER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if code != 0:
        what = f"did not finish in {DRIVER_TIMEOUT_S} s" if code is None else f"exited with {code}"
        pytest.fail(f"the Ray driver {what}; its output ends with:\n{log.read_text()[-6000:]}", pytrace=False)
    return json.loads(result.read_text())


def test_two_ray_workers_equal_one_worker(teacher_dir, corpus_file, tmp_path):
    options = dict(method="sample", samples=8, seq_len=SEQ_LEN, batch_size=4, shard_size=16, packing="documents")
    single = build_cache(teacher_dir, corpus_file, tmp_path / "single", **options)
    build = dict(teacher=teacher_dir, corpus=corpus_file, out=tmp_path / "ray", num_workers=2, ray=True, **options)

    merged = ray_builds({"ray": build}, tmp_path)["ray"]["manifest"]

    assert len(single["shards"]) >= 4, "both workers must have shards to write"
    assert merged == single
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text()) == single
    for shard in single["shards"]:
        got, want = read_shard(tmp_path / "ray" / shard["file"]), read_shard(tmp_path / "single" / shard["file"])
        for name, value in vars(want).items():
            np.testing.assert_array_equal(getattr(got, name), value, err_msg=f"{shard['file']}: {name}")


def test_a_failing_worker_is_one_clear_error(corpus_file, tmp_path):
    build = dict(teacher=tmp_path / "missing", corpus=corpus_file, out=tmp_path / "out", num_workers=2, ray=True)
    result = ray_builds({"missing": build}, tmp_path)["missing"]
    assert "error" in result, f"the build with a missing teacher did not fail: {result}"
    error = result["error"]
    assert re.search(r"worker \d: teacher .*missing is not a directory", error), error


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
