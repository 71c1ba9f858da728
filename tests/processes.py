"""Processes the tests start, and their clean-up: nothing a test starts outlives it, pass or fail.

Every process started here carries ``LOGITCACHE_TEST_PROCESS=<session>:<call>`` in its environment,
and so does everything it starts in turn (torchrun's workers, Ray's raylet, agents and workers),
including processes in sessions of their own or re-parented to init when their parent died (on
Linux the marks are read from ``/proc``). On leaving :func:`tracked` every process carrying the
call's mark is killed and reaped; at the end of the test session :func:`stop_session` does the same
for the whole session, as a last resort.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psutil

MARK = "LOGITCACHE_TEST_PROCESS"
SESSION = uuid.uuid4().hex
STOP_WAIT_S = 60  # how long a SIGKILLed process may take to disappear (a loaded machine)


def _mark(pid: int) -> str:
    """The mark in process ``pid``'s environment ('' if none). Read from ``/proc`` rather than with
    ``psutil.Process.environ``: Ray's processes set their title over the start of that block, and
    psutil's parser stops there (it finds none of their variables)."""
    try:
        block = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return ""
    key = f"{MARK}=".encode()
    return next((entry[len(key):].decode() for entry in block.split(b"\0") if entry.startswith(key)), "")


def marked(prefix: str) -> list[psutil.Process]:
    """The running processes whose environment carries a mark starting with ``prefix``."""
    found = []
    for pid in psutil.pids():
        if pid != os.getpid() and _mark(pid).startswith(prefix):
            try:
                found.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
    return found


def stop_marked(prefix: str) -> list[str]:
    """SIGKILL every process carrying a mark starting with ``prefix`` and wait for each to go; returns
    what was still running (name and command line), for the failure message of a test that checks."""
    stopped = []
    for _ in range(3):  # a dying parent may start nothing new, but a process found mid-fork can
        processes = marked(prefix)
        if not processes:
            break
        for process in processes:
            try:
                what = f"{process.pid} {' '.join(process.cmdline())[:200]}"
                process.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if what not in stopped:
                stopped.append(what)
        psutil.wait_procs(processes, timeout=STOP_WAIT_S)
    return stopped


@contextmanager
def tracked(args: list[str], env: Mapping[str, str] | None = None, **popen: object) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(args, ...)`` in a session of its own; on leaving (also on an error) the
    process and everything it started are killed and reaped."""
    mark = f"{SESSION}:{uuid.uuid4().hex}"
    process = subprocess.Popen(args, env={**(os.environ if env is None else env), MARK: mark}, start_new_session=True, **popen)
    try:
        yield process
    finally:
        try:  # its own process group first (start_new_session), then anything marked elsewhere
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        process.wait()
        stop_marked(mark)


def run(args: list[str], *, timeout: float | None = None, env: Mapping[str, str] | None = None,
        **popen: object) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)`` whose whole process tree is gone when it returns.

    ``timeout`` raises :class:`subprocess.TimeoutExpired`, as ``subprocess.run`` does, after killing the tree.
    """
    with tracked(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()  # what it printed before it hung, for the failure message
            raise subprocess.TimeoutExpired(args, expired.timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def stop_session() -> list[str]:
    """Kill whatever any test of this session started and left running; returns what that was."""
    return stop_marked(f"{SESSION}:")
