"""Beam's external SDK worker pool in a subprocess, for tests of the portable runner.

`python -m apache_beam.runners.worker.worker_pool_main` is the harness that Flink and Spark
task managers (and Beam's SDK container with --worker_pool) start: a gRPC service that starts
one SDK worker process per request, as `python -c ...` found on PATH.  Started here with the
test's interpreter first on PATH, so its workers import imgindex as the installed package
(`pip install -e .` in .venv), and in its own process group, so that `stop` also ends the
workers it started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# worker_pool_main logs this once its gRPC server listens (port 0: the port it was given).
_STARTED = re.compile(r"Started worker pool servicer at port: \S*:(\d+)")


class WorkerPool:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        """What the pool and its workers wrote (stderr and the pool's stdout)."""
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Ends the pool and every worker it started (its process group): SIGTERM, then
        SIGKILL after 10 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # Workers outliving the pool (none expected): they are in its group still.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start(workdir: Path, timeout: float = 60.0) -> WorkerPool:
    """Starts the pool with `workdir` as its working directory (so workers find imgindex only
    as an installed package, never from the current directory) and waits until it listens.
    RuntimeError, with its output, when it exits or does not listen within `timeout`."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "worker_pool.log"
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # the workers must import the installed product
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port=0"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pool = WorkerPool(proc, 0, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _STARTED.search(pool.output())
        if found:
            pool.port = int(found.group(1))
            return pool
        if proc.poll() is not None:
            raise RuntimeError(f"the worker pool exited ({proc.returncode}): {pool.output()[-2000:]}")
        time.sleep(0.1)
    pool.stop()
    raise RuntimeError(f"the worker pool did not listen within {timeout:.0f} s: {pool.output()[-2000:]}")
