"""Helpers shared by the benchmarks: timing rounds, medians, environment line."""

import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def median_rate(fn, items_per_call: int, rounds: int = 5, calls: int = 3) -> float:
    """Median over `rounds` of items/second, each round timing `calls` calls of fn()."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(items_per_call * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _tree_rss_kb(pid: int) -> tuple[int, int]:
    """Resident KiB of pid and all its descendants (Linux /proc): (sum, largest single process)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, IndexError, ValueError):
            continue
    total, biggest, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        biggest = max(biggest, rss.get(p, 0))
        stack.extend(children.get(p, []))
    return total, biggest


def run_child(module: str, args: list[str]) -> tuple[float, float, str]:
    """Runs `python -m <module> <args>` with TF quiet; returns (wall s, peak tree RSS MB, stdout).

    Peak RSS is the largest sum of resident memory over the process and all its descendants,
    sampled every 0.1 s.
    """
    wall, tree, _, out = run_child_rss(module, args)
    return wall, tree, out


def run_child_rss(module: str, args: list[str]) -> tuple[float, float, float, str]:
    """`run_child`, also returning the peak RSS of the largest single process (MB)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            total, largest = _tree_rss_kb(proc.pid)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"benchmark child {args} failed with {proc.returncode}:\n{out}")
    return wall, peak[0] / 1024, peak[1] / 1024, out


def clustered(n, d, clusters=2000, seed=0, noise=0.5, chunk=200_000):
    """n x d float32 points around `clusters` Gaussian centres, L2-normalised; made in chunks
    of `chunk` rows (None: all at once) so the float64 noise never exceeds one chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    chunk = chunk or n
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        block = centres[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, d)).astype(np.float32)
        x[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x
