"""Does the build-time PCA projection help retrieval? mAP on a real labelled set.

Input: an embedding table of labelled images whose id starts with the label folder
(e.g. `imgindex embed --input '../shared/data/cifar10-test/*/*.jpg'` gives ids like
`cat/0001.jpg`).  Every image is a query against all others (itself excluded); relevant =
same label.  Compares the full embedding with PCA projections (fit on all rows, mean
removed, top-N axes, re-normalised), with and without whitening, by exact cosine search.
"""

import argparse

import numpy as np

from retrieval import projection, tables


def mean_ap(vectors, labels, queries):
    """mAP of `queries` rows against every other row; exact cosine ranking."""
    aps = []
    for start in range(0, len(queries), 500):
        rows = queries[start : start + 500]
        sims = vectors[rows] @ vectors.T
        sims[np.arange(len(rows)), rows] = -np.inf  # the query itself is not a result
        order = np.argsort(-sims, axis=1)[:, :-1]
        relevant = labels[order] == labels[rows][:, None]
        hits = np.cumsum(relevant, axis=1)
        ranks = np.arange(1, relevant.shape[1] + 1)
        aps.extend((hits / ranks * relevant).sum(1) / np.maximum(relevant.sum(1), 1))
    return float(np.mean(aps))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--embeddings", required=True)
    parser.add_argument("--dims", default="64,128,256,512")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args(argv)
    data = tables.read_embeddings(args.embeddings)
    labels = np.array([i.split("/")[0] for i in data.ids])
    x = data.vectors / np.linalg.norm(data.vectors, axis=1, keepdims=True)
    queries = np.sort(np.random.default_rng(0).choice(len(x), size=min(args.queries, len(x)), replace=False))
    base = mean_ap(x, labels, queries)
    print(
        f"# PCA vs full embedding: {len(x)} images, {len(set(labels))} labels, {len(queries)} queries, "
        f"exact cosine, {data.spec.handle} (d={data.spec.dim})"
    )
    print("| embedding | mAP | vs full |\n|---|---:|---:|")
    print(f"| full {data.spec.dim}-d | {base:.4f} | - |")
    for dim in [int(d) for d in args.dims.split(",")]:
        p = projection.fit_pca(x, dim)
        m = mean_ap(projection.project(x, p), labels, queries)
        centred = (x - p[0]) @ p[1:].T
        whitened = centred / centred.std(axis=0)
        whitened /= np.linalg.norm(whitened, axis=1, keepdims=True)
        w = mean_ap(whitened.astype(np.float32), labels, queries)
        print(f"| PCA {dim} | {m:.4f} | {100 * (m - base):+.2f} pts |")
        print(f"| PCA {dim} whitened | {w:.4f} | {100 * (w - base):+.2f} pts |")


if __name__ == "__main__":
    main()
