"""Optional PCA projection learned at build time, applied to the database and to queries.

Off by default (`imgindex build --pca_dim N` turns it on).  Projection: subtract the mean,
multiply by the top-N principal axes, re-normalise to unit length.  No whitening: on a
labelled set it lowered mAP where plain PCA raised it (benchmarks/pca_map.py, BENCHMARKS.md).

Stored in an index directory as `projection.npy`, float32 of shape (N + 1, d_in): row 0 is
the mean, rows 1..N the principal axes (unit vectors, largest variance first).
"""

from __future__ import annotations

import numpy as np

from retrieval.errors import ConfigError
from retrieval.exact import unit_rows

PROJECTION_FILE = "projection.npy"
DEFAULT_SAMPLE = 200_000


def fit_pca(vectors: np.ndarray, dim: int, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> np.ndarray:
    """Learns the projection from (a sample of) the rows of `vectors` (n, d_in)."""
    n, d_in = vectors.shape
    if not 1 <= dim < d_in:
        raise ConfigError(
            f"--pca_dim must be between 1 and the embedding dimension - 1 ({d_in - 1}), got {dim}"
        )
    if n <= dim:
        raise ConfigError(
            f"--pca_dim {dim} needs more than {dim} vectors to learn {dim} axes, got {n}; "
            "lower --pca_dim or leave it off for small sets"
        )
    rows = np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False)
    x = vectors[np.sort(rows)].astype(np.float64)
    mean = x.mean(axis=0)
    x -= mean
    # d_in x d_in covariance: cheap for embedding sizes (1280^2), unlike an SVD of the sample.
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    axes = eigenvectors[:, np.argsort(eigenvalues)[::-1][:dim]].T
    return np.vstack([mean[None, :], axes]).astype(np.float32)


def project(vectors: np.ndarray, projection: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """(q, d_in) -> (q, N) float32, unit length (rows that project to zero stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != projection.shape[1]:
        raise ConfigError(
            f"projection expects vectors of dimension {projection.shape[1]}, got shape {vectors.shape}"
        )
    mean, axes = projection[0], projection[1:]
    out = np.empty((vectors.shape[0], axes.shape[0]), np.float32)
    for start in range(0, vectors.shape[0], chunk):
        out[start : start + chunk] = unit_rows(
            (vectors[start : start + chunk] - mean) @ axes.T, in_place=True
        )
    return out
