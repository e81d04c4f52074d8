"""How much memory ScaNN's `serialize()` of a tree searcher allocates, by scoring method.

    python -m benchmarks.scann_serialize_memory [--rows 50000] [--leaves 1000]

Builds a tree searcher (no reordering) on the first ROWS rows of the 200k peer-benchmark
set (benchmarks/out/peers/scale200000_base.npy, made by `python -m benchmarks.peer_data
--dataset scale --scale_n 200000`) for each scoring method -- brute force, AH with 2, 4 and 8
dimensions per block (LUT16), AH with LUT256 codes -- each in a fresh process, and prints how
much its RSS grew across one `serialize()` call.  ScaNN frees that memory when the call returns,
but glibc keeps it until the heap is trimmed (malloc_trim), so the growth is the call's own peak.
It scales with leaves x AH blocks x centres, and it is why the index stage
(retrieval/scann_assets.py) keeps ~1,000 leaves at 1M rows.
"""

import argparse
import os
import subprocess
import sys
import tempfile

VARIANTS = ("brute_force", "ah2", "ah4", "ah8", "lut256")
DATA = "benchmarks/out/peers/scale200000_base.npy"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(variant: str, rows: int, leaves: int) -> None:
    import numpy as np

    from retrieval.scann_import import import_scann_pybind

    scann = import_scann_pybind()
    x = np.array(np.load(DATA, mmap_mode="r")[:rows])
    builder = scann.builder(x, 10, "dot_product").tree(leaves, 10, training_sample_size=rows)
    if variant == "brute_force":
        builder = builder.score_brute_force()
    else:
        dims, hash_type = (2, "lut256") if variant == "lut256" else (int(variant[2:]), "lut16")
        builder = builder.score_ah(
            dims, anisotropic_quantization_threshold=0.2, training_sample_size=rows, hash_type=hash_type
        )
    searcher = builder.build()
    del x
    before = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        searcher.serialize(out, relative_path=True)
    grew = _rss_mb() - before
    print(f"| {variant} | {leaves} | {grew:.0f} MB | {grew / leaves * 1024:.0f} KB |")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.rows, args.leaves)
    if not os.path.exists(DATA):
        sys.exit(f"{DATA} is missing: run `python -m benchmarks.peer_data --dataset scale --scale_n 200000`")
    print(f"# serialize() of a tree searcher on {args.rows} x 256 rows")
    print("| scoring | leaves | RSS growth | per leaf |\n|---|---:|---:|---:|")
    for variant in VARIANTS:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.scann_serialize_memory",
                "--child",
                variant,
                "--rows",
                str(args.rows),
                "--leaves",
                str(args.leaves),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
