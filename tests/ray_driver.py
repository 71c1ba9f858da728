"""The Ray half of tests/test_executors_ray.py, run as a process of its own (``python ray_driver.py JOB``).

A Ray driver shares its fate with the processes Ray starts for it: when the raylet or the GCS goes,
the driver's core worker ends the whole process at once (exit 1, no Python clean-up). Run inside
pytest, that ended pytest itself, without a summary. Here only this process goes, the test that
started it fails with Ray's own output, and :mod:`processes` stops what Ray left behind.

JOB is a JSON file: ``{"temp_dir": ..., "result": ..., "builds": {name: BuildSettings fields}}``;
each build's manifest, or its LogitcacheError's message, goes to ``result`` as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray

from logitcache.build.settings import BuildSettings
from logitcache.errors import LogitcacheError
from logitcache.executors.ray import run_ray_build


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    # Its own temporary folder: no session, socket or port shared with another Ray on this machine.
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=job["temp_dir"],
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    results = {}
    try:
        for name, fields in job["builds"].items():
            try:
                results[name] = {"manifest": run_ray_build(BuildSettings(**fields))}
            except LogitcacheError as exc:
                results[name] = {"error": str(exc)}
    finally:
        ray.shutdown()
    Path(job["result"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
