"""`make bench`: every benchmark, one after the other, each in its own process."""

import subprocess
import sys

BENCHMARKS = [
    "benchmarks.model_throughput",
    "benchmarks.index_search",
    "benchmarks.pipeline_throughput",
    "benchmarks.serving_latency",
    "benchmarks.build_memory",
    "benchmarks.sharded_build",
    "benchmarks.incremental",
    "benchmarks.reuse_tolerance",
    "benchmarks.object_storage",
]


def main():
    failed = []
    for module in BENCHMARKS:
        print(f"\n$ python -m {module}", flush=True)
        if subprocess.run([sys.executable, "-m", module]).returncode:
            failed.append(module)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
