"""Which preprocessing gives the best retrieval from the same weights? mAP per variant and set.

Every image goes through the product's own path: `retrieval.imaging.decode` (JPEG draft to the
model's input size), a resize variant, `retrieval.embedders.embed_batch` (the builtin model,
l2-normalised); the vectors are ranked by exact cosine (the query left out of its own
ranking).  The "pad-grey" variant is the product's preprocessing before issue 15; `--check`
compares a variant's vectors with an `imgindex embed` table of the same images (cosine
1.000000 expected when the table was made with that variant).  Variants are `resize`, `pad`, `filter` values of `retrieval.imaging.Preprocessing`
plus "two-view" averages of two variants' vectors.

    python -m benchmarks.preprocessing --sets ukbench,holidays,holidays-upright,varied-aspect,cifar10

Vectors are cached under benchmarks/out/preprocessing/ (delete it after changing the model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchmarks import quality_data
from benchmarks.common import median_rate
from retrieval import embedders, imaging

OUT = os.path.join(os.path.dirname(__file__), "out", "preprocessing")
# name -> Preprocessing fields; "+"-joined names are two-view averages.
VARIANTS = {
    "pad-grey": dict(resize="pad", pad="grey", filter="bilinear"),
    "pad-black": dict(resize="pad", pad="black", filter="bilinear"),
    "pad-black-bicubic": dict(resize="pad", pad="black", filter="bicubic"),
    "pad-black-lanczos": dict(resize="pad", pad="black", filter="lanczos"),
    "pad-mean": dict(resize="pad", pad="mean", filter="bilinear"),
    "pad-edge": dict(resize="pad", pad="edge", filter="bilinear"),
    "pad-white": dict(resize="pad", pad="white", filter="bilinear"),
    "crop": dict(resize="crop", filter="bilinear"),
    "crop-lanczos": dict(resize="crop", filter="lanczos"),
    "stretch": dict(resize="stretch", filter="bilinear"),
    "stretch-lanczos": dict(resize="stretch", filter="lanczos"),
    "fit-black": dict(resize="fit", pad="black", filter="bilinear"),
    "fit-black-lanczos": dict(resize="fit", pad="black", filter="lanczos"),
    "pad-grey-bicubic": dict(resize="pad", pad="grey", filter="bicubic"),
    "pad-grey-lanczos": dict(resize="pad", pad="grey", filter="lanczos"),
    "crop-bicubic": dict(resize="crop", filter="bicubic"),
    "fit-grey": dict(resize="fit", pad="grey", filter="bilinear"),
    "fit-grey-lanczos": dict(resize="fit", pad="grey", filter="lanczos"),
    "fit-grey-bicubic": dict(resize="fit", pad="grey", filter="bicubic"),
}
TWO_VIEW = (
    "pad-black+crop",
    "pad-black-lanczos+crop-lanczos",
    "fit-black+crop",
    "pad-grey+crop",
    "fit-grey+crop",
    "stretch+crop",
    "pad-grey-lanczos+crop-lanczos",
    "fit-grey-bicubic+crop-bicubic",
)


def embed_variant(task, variant: str, model, spec, batch: int = 32) -> np.ndarray:
    path = os.path.join(OUT, f"{task.name}-{len(task.files)}-{variant}.npy")
    if os.path.exists(path):
        return np.load(path)
    if "+" in variant:
        first, second = variant.split("+")
        vectors = embed_variant(task, first, model, spec) + embed_variant(task, second, model, spec)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    else:
        prep = imaging.Preprocessing(**VARIANTS[variant])
        chunks, pending = [], []
        for file in task.files:
            with open(file, "rb") as f:
                decoded = imaging.decode(f.read(), min_size=spec.input_size)
            pending.append(imaging.resize(decoded.image, spec.input_size, prep))
            if len(pending) == batch:
                chunks.append(embedders.embed_batch(model, spec, np.stack(pending)))
                pending = []
        if pending:
            chunks.append(embedders.embed_batch(model, spec, np.stack(pending)))
        vectors = np.concatenate(chunks)
    os.makedirs(OUT, exist_ok=True)
    np.save(path, vectors.astype(np.float32))
    return vectors


def decode_resize_rates(task, variants: list[str], size: int, rounds: int = 5) -> dict[str, float]:
    """Images per second on one core, decode (draft) + resize of every image of `task`, per
    variant: the median of `rounds` rounds, the variants' rounds interleaved."""
    datas = []
    for file in task.files:
        with open(file, "rb") as f:
            datas.append(f.read())

    def work(preps: list) -> None:
        for data in datas:
            image = imaging.decode(data, min_size=size).image
            for prep in preps:
                imaging.resize(image, size, prep)

    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            preps = [imaging.Preprocessing(**VARIANTS[v]) for v in variant.split("+")]
            rates[variant].append(median_rate(lambda p=preps: work(p), len(datas), rounds=1, calls=1))
    return {v: statistics.median(r) for v, r in rates.items()}


def average_precisions(vectors: np.ndarray, task) -> np.ndarray:
    """AP of each query, ranking every other image by cosine."""
    aps = np.empty(len(task.queries))
    for start in range(0, len(task.queries), 500):
        rows = np.asarray(task.queries[start : start + 500])
        sims = vectors[rows] @ vectors.T
        sims[np.arange(len(rows)), rows] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
        for i, (row_order, q) in enumerate(zip(order, range(start, start + len(rows)))):
            relevant = np.isin(row_order, list(task.relevant[q]))
            hits = np.cumsum(relevant)
            aps[start + i] = (hits / np.arange(1, len(hits) + 1))[relevant].sum() / len(task.relevant[q])
    return aps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", default="ukbench,holidays,holidays-upright,varied-aspect,cifar10")
    parser.add_argument("--variants", default=",".join(list(VARIANTS) + list(TWO_VIEW)))
    parser.add_argument("--handle", default="builtin:efficientnet-lite0")
    parser.add_argument("--baseline", default="pad-grey")
    parser.add_argument("--cifar_per_class", type=int, default=300)
    parser.add_argument(
        "--check",
        metavar="TABLE",
        help="compare the first variant's vectors of the first set with an embedding table of the "
        "same images (`imgindex embed --input <the set's glob>`): the lowest cosine is printed",
    )
    parser.add_argument(
        "--throughput", action="store_true", help="only measure decode + resize images/s per variant"
    )
    args = parser.parse_args(argv)
    if args.check:
        from retrieval import tables

        task = quality_data.load(args.sets.split(",")[0], cifar_per_class=args.cifar_per_class)
        variant = args.variants.split(",")[0]
        model, spec = embedders.complete_spec(embedders.parse_embedder_arg(args.handle))
        ours = embed_variant(task, variant, model, spec)
        table = tables.read_embeddings(args.check)
        row_of = {item_id: row for row, item_id in enumerate(table.ids)}
        product = table.vectors[[row_of[i] for i in task.ids()]]
        cosines = np.sum(ours * product, axis=1)
        print(
            f"{task.name} {variant} vs {args.check}: {len(cosines)} rows, lowest cosine {cosines.min():.6f}"
        )
        return
    if args.throughput:
        for name in args.sets.split(","):
            task = quality_data.load(name, cifar_per_class=args.cifar_per_class)
            variants = [args.baseline] + [v for v in args.variants.split(",") if v != args.baseline]
            rates = decode_resize_rates(task, variants, 224)
            print(f"\n{name}: decode + resize to 224, images/s on one core (median of 5 rounds)")
            for variant in variants:
                rate = rates[variant]
                print(f"  {variant:32s} {rate:7.0f}  x{rate / rates[args.baseline]:.2f} of {args.baseline}")
        return
    model, spec = embedders.complete_spec(embedders.parse_embedder_arg(args.handle))
    variants = args.variants.split(",")
    print(f"model {args.handle}; mAP x100 (paired SE of the difference to {args.baseline})")
    for name in args.sets.split(","):
        task = quality_data.load(name, cifar_per_class=args.cifar_per_class, cifar_queries_per_class=100)
        start = time.time()
        base = average_precisions(embed_variant(task, args.baseline, model, spec), task)
        print(f"\n{name}: {len(task.files)} images, {len(task.queries)} queries")
        for variant in variants:
            aps = average_precisions(embed_variant(task, variant, model, spec), task)
            diff = aps - base
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
            better = int((diff > 1e-9).sum())
            worse = int((diff < -1e-9).sum())
            print(
                f"  {variant:32s} {100 * aps.mean():6.2f}  {100 * diff.mean():+6.2f} (SE {100 * se:4.2f})"
                f"  queries better/worse {better}/{worse}"
            )
        print(f"  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
