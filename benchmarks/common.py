"""Helpers shared by the benchmarks: timing rounds, medians, environment line."""
import os
import platform
import resource
import statistics
import time


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
