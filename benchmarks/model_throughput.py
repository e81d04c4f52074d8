"""The builtin embedder's bare forward speed (pre-made tensors, no decode).

Prints images/s (median of rounds) at several batch sizes for efficientnet-lite0, as the
baseline the embedding pipeline is measured against.
"""

import argparse

import numpy as np

from benchmarks.common import environment, median_rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:efficientnet-lite0")
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from retrieval import embedders

    spec = embedders.parse_embedder_arg(f"m={args.model}")
    model, spec = embedders.complete_spec(spec)
    size = spec.input_size
    print(f"# model throughput: {args.model} at {size}x{size}, {environment()}")
    print("| batch | images/s (median) |\n|---:|---:|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
        np.asarray(model(x))  # trace and warm up
        rate = median_rate(
            lambda x=x: np.asarray(model(x)), batch, rounds=args.rounds, calls=max(1, 64 // batch)
        )
        print(f"| {batch} | {rate:.1f} |")


if __name__ == "__main__":
    main()
