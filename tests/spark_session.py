"""A local Apache Spark session for the tests whose JVM is gone when it ends, pass, fail or error.

pyspark starts its JVM (``spark-submit``) as a child of the test process and keeps it for the
life of the interpreter, even after ``SparkSession.stop()``. The JVM is started with the test
process mark of ``processes.py`` in its environment, so that leaving :func:`local_spark` kills it
(and everything it started) and forgets the gateway, and a later session starts a fresh JVM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import processes
import pytest

MIN_JAVA = 17  # Spark 4 runs on Java 17 or newer


def java_problem() -> str | None:
    """Why Spark cannot start here (None if it can), from the ``java`` that spark-submit would run."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if java is None or not Path(java).exists():
        return "no Java runtime (install Java 17+, e.g. Debian's default-jre-headless; .ci/run does)"
    banner = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(\d+)', banner)
    if found is None or int(found.group(1)) < MIN_JAVA:
        return f"{java} is not Java {MIN_JAVA}+ ({banner.splitlines()[0] if banner else 'no version'})"
    return None


def require_java() -> None:
    """Skip the test without Java 17+, or fail it under CI (where .ci/run installs Java)."""
    problem = java_problem()
    if problem:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"Spark cannot start: {problem}")


@contextmanager
def local_spark() -> Iterator:
    """A ``local[1]`` SparkSession (no UI, no console progress); see :func:`require_java`."""
    require_java()
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    mark = f"{processes.SESSION}:{uuid.uuid4().hex}"
    outer = os.environ.get(processes.MARK)
    os.environ[processes.MARK] = mark  # inherited by the JVM that getOrCreate starts, and only by it
    try:
        session = (SparkSession.builder.master("local[1]").appName("logitcache-tests")
                   .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                   .config("spark.sql.shuffle.partitions", "1").getOrCreate())
    except BaseException:
        _forget_gateway(SparkContext, mark)
        raise
    finally:
        if outer is None:
            del os.environ[processes.MARK]
        else:
            os.environ[processes.MARK] = outer
    try:
        assert processes.marked(mark), "Spark's JVM does not carry the test mark: nothing could stop it"
        yield session
    finally:
        try:
            session.stop()
        finally:
            _forget_gateway(SparkContext, mark)


def _forget_gateway(spark_context: type, mark: str) -> None:
    """Kill the JVM carrying ``mark`` and drop pyspark's handle on it, so the next session starts anew."""
    processes.stop_marked(mark)
    spark_context._gateway = None
    spark_context._jvm = None
    left = processes.marked(mark)
    assert not left, f"Spark's JVM outlived its session: {[p.pid for p in left]}"
