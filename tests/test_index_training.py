"""Reusing a previous index's tree-AH training (retrieval.index.training): the nightly index
without k-means every night, with the recall still measured on today's index."""

import numpy as np
import pytest

from retrieval import exact, metrics
from retrieval.index import build_index, load_index
from retrieval.index.training import MAX_GENERATIONS
from tests.helpers.index_data import clusters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Night 1: 20k clustered vectors, indexed and saved; night 2: 1% of them replaced."""
    sample = clusters(seed=7)
    first = sample(20_000)
    second = first.copy()
    second[::100] = sample(200)
    ids = [f"v{i}" for i in range(len(first))]
    path = tmp_path_factory.mktemp("night1") / "index"
    build_index(first, ids, distance="cosine").save(path)
    return first, second, ids, path, sample(300)


def test_a_night_reuses_the_training_and_keeps_the_recall(nights, tmp_path):
    _, second, ids, previous, queries = nights
    warm = build_index(second, ids, distance="cosine", trained_from=previous)
    old = load_index(previous)
    training = warm.manifest.training
    assert training == {"reused_from": str(previous), "generation": 1, "trained_n": 20_000, "note": None}
    assert warm.manifest.index_config["num_leaves"] == old.manifest.index_config["num_leaves"]
    # The previous search defaults were measured, not tuned again, and reached the target.
    assert warm.search_defaults == old.search_defaults and warm.manifest.recall["reached_target"]
    assert [t["leaves_to_search"] for t in warm.manifest.recall["tuning"]] == [
        old.search_defaults["leaves_to_search"]
    ]
    # The partitioner and codebooks are the previous ones, byte for byte, after a save.
    warm.save(tmp_path / "warm")
    for name in ("scann/serialized_partitioner.pb", "scann/ah_codebook.pb"):
        assert (tmp_path / "warm" / name).read_bytes() == (previous / name).read_bytes()
    # And the index answers fresh queries as well as a freshly trained one.
    fresh = build_index(second, ids, distance="cosine")
    truth, _ = exact.exact_search(queries, exact.normalize_rows(second), 10, "cosine")
    truth_ids = [[ids[r] for r in row] for row in truth]
    warm_recall = metrics.recall_at_k(warm.search_batch(queries, k=10)[0], truth_ids, 10)
    fresh_recall = metrics.recall_at_k(fresh.search_batch(queries, k=10)[0], truth_ids, 10)
    assert warm_recall >= 0.95 and abs(warm_recall - fresh_recall) < 0.03
    assert fresh.manifest.training == {
        "reused_from": None,
        "generation": 0,
        "trained_n": 20_000,
        "note": None,
    }


def test_training_is_not_reused_when_it_would_not_fit(nights, tmp_path):
    first, second, ids, previous, _ = nights
    # Far fewer rows than it was trained on.
    small = build_index(second[:15_700], ids[:15_700], distance="cosine", trained_from=previous)
    assert (
        small.manifest.training["generation"] == 0
        and "15700 rows now, 20000" in small.manifest.training["note"]
    )
    # Another distance.
    l2 = build_index(second, ids, distance="squared_l2", trained_from=previous)
    assert l2.manifest.training["generation"] == 0 and "cosine" in l2.manifest.training["note"]
    # Data the training never saw: the previous defaults miss the target, so it trains again.
    other = clusters(seed=99)(20_000)
    drifted = build_index(other, ids, distance="cosine", trained_from=previous)
    assert drifted.manifest.training["generation"] == 0
    assert "missed the target" in drifted.manifest.training["note"]
    assert drifted.manifest.recall["reached_target"]


def test_the_training_is_renewed_every_few_builds(nights, tmp_path):
    first, _, ids, previous, _ = nights
    path = previous
    generations = []
    for night in range(MAX_GENERATIONS):
        built = build_index(first, ids, distance="cosine", trained_from=path)
        generations.append(built.manifest.training["generation"])
        path = tmp_path / f"night{night}"
        built.save(path)
    assert generations == list(range(1, MAX_GENERATIONS)) + [0]


def test_a_damaged_previous_training_is_not_reused(nights, tmp_path):
    import shutil

    _, second, ids, previous, _ = nights
    copy = tmp_path / "previous"
    shutil.copytree(previous, copy)
    codebook = copy / "scann" / "ah_codebook.pb"
    data = bytearray(codebook.read_bytes())
    data[len(data) // 2] ^= 0xFF
    codebook.unlink()  # a hard link to the original: replace, do not write through it
    codebook.write_bytes(bytes(data))
    built = build_index(second, ids, distance="cosine", trained_from=copy)
    assert built.manifest.training["generation"] == 0
    assert "does not match its manifest" in built.manifest.training["note"]
    assert np.isfinite(built.manifest.recall["value"])
