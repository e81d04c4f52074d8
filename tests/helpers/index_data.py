"""Test data shared by the index tests (their fixtures are in tests/conftest.py)."""

import numpy as np

from retrieval.exact import exact_search, normalize_rows

# Dimension of the clustered index test data.
D = 64


def clusters(seed=1234, d=D, n_centres=100):
    """Sampler of points around n_centres fixed Gaussian cluster centres in d dimensions; each
    call draws the next points from one seeded generator."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, d)).astype(np.float32)

    def sample(n):
        labels = rng.integers(0, len(centres), n)
        return (centres[labels] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)

    return sample


def exact_ids(index_distance, database, queries, ids, k):
    """The ids of each query's exact top k, as an index of `index_distance` ranks them."""
    if index_distance == "cosine":
        database = normalize_rows(database)
    rows, _ = exact_search(queries, database, k, index_distance)
    return ids[rows].tolist()
