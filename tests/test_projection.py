import numpy as np
import pytest

from pipelines import build
from retrieval import exact
from retrieval.errors import ConfigError
from retrieval.projection import fit_pca, project
from serving import Searcher
from tests.helpers import images
from tests.helpers.shards import mixed_inputs


def test_pca_finds_the_principal_subspace_and_renormalises():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0][:, :6].T  # 6 orthonormal directions
    x = (rng.normal(size=(3000, 6)) * [9, 8, 7, 6, 5, 4]) @ basis + 0.05 * rng.normal(size=(3000, 64))
    x = (x + 3.0).astype(np.float32)  # an offset that the mean must remove
    p = fit_pca(x, 6)
    assert p.shape == (7, 64)
    np.testing.assert_allclose(p[0], x.mean(axis=0), atol=1e-3)
    # The learned axes span the true subspace: projecting them onto it keeps their length.
    np.testing.assert_allclose(np.linalg.norm(p[1:] @ basis.T, axis=1), 1.0, atol=1e-3)
    y = project(x, p)
    assert y.shape == (3000, 6) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # Neighbours survive the projection on data that lives in the subspace.
    xn = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0), axis=1, keepdims=True)
    a, _ = exact.exact_search(xn[:100], xn, 5, "dot_product")
    b, _ = exact.exact_search(y[:100], y, 5, "dot_product")
    assert np.mean([len(set(r) & set(s)) / 5 for r, s in zip(a, b)]) > 0.9


def test_pca_rejects_bad_dimensions():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ConfigError, match="between 1 and"):
        fit_pca(x, 4)
    with pytest.raises(ConfigError, match="needs more than 3 vectors"):
        fit_pca(np.random.rand(3, 8).astype(np.float32), 3)
    with pytest.raises(ConfigError, match="dimension 4"):
        project(np.zeros((2, 3), np.float32), fit_pca(np.random.rand(10, 4).astype(np.float32), 2))


@pytest.mark.slow
def test_build_with_pca_serves_queries_in_the_embedder_space(tmp_path, tiny_savedmodel):
    root = str(tmp_path / "root")
    result = build.run(
        mixed_inputs(tmp_path / "in", 0)
        + [f"--output={root}", f"--embedder=tiny={tiny_savedmodel},size=32", "--pca_dim=4"]
    )
    entry = result.manifest.embedders["tiny"]
    assert entry.d == 4 and entry.pca_dim == 4 and entry.spec["dim"] == 8
    searcher = Searcher.open(root)
    info = searcher.info()["embedders"]["tiny"]
    assert info["pca"] and info["d"] == 8 and info["index_d"] == 4
    query = images.jpeg(56, 44, seed=3)  # indexed as w3
    by_image = searcher.search_image(query, k=3)
    assert by_image[0].id == "w3"
    assert [h.id for h in searcher.search_id("w3", k=3)] == [h.id for h in by_image]
    with pytest.raises(Exception, match="dimension 8"):
        searcher.search_vector(np.ones(4, np.float32))


def test_pca_needs_cosine(tmp_path):
    with pytest.raises(ConfigError, match="cosine"):
        build.run([f"--input={tmp_path}", f"--output={tmp_path}/r", "--pca_dim=4", "--distance=squared_l2"])
