"""Recall measured at build time against exact search, and the search knobs tuned with it
(retrieval.index.recall)."""

import numpy as np
import pytest

import retrieval.index.recall as recall_module
from retrieval.exact import exact_search, normalize_rows
from retrieval.index import TUNING_MARGIN_SE, build_index, choose_config
from retrieval.index.recall import RecallRecord, TuningTrial, geometric_ladder, tuning_candidates
from retrieval.metrics import recall_at_k
from tests.helpers.index_data import D, exact_ids


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
@pytest.mark.parametrize("distance", ["cosine", "dot_product", "squared_l2"])
def test_default_tree_ah_reaches_recall_on_fresh_queries(tree_indexes, large, distance):
    vectors, ids, queries = large
    index = tree_indexes[distance]
    assert index.method == "tree_ah"
    recall = index.manifest.recall
    # Half the 1,000 sampled rows tune the search knobs, the other half measure recall.
    assert recall["k"] == 10 and recall["n_queries"] == recall["n_tuning_queries"] == 500
    assert recall["value"] >= 0.95 and recall["reached_target"]

    got_ids, scores = index.search_batch(queries)
    assert recall_at_k(got_ids, exact_ids(distance, vectors, queries, ids, 10), 10) >= 0.95
    assert scores.shape == (len(queries), 10)
    # Best first: similarities descend, squared distances ascend.
    steps = np.diff(scores, axis=1)
    assert np.all(steps >= 0) if distance == "squared_l2" else np.all(steps <= 0)


@pytest.mark.slow  # the tree_indexes fixture builds three 20k tree-AH indexes
def test_tuning_picks_the_first_candidate_reaching_the_target(tree_indexes):
    index = tree_indexes["squared_l2"]
    trials = index.manifest.recall["tuning"]
    chosen = trials[-1]

    def lower_bound(trial):
        return trial["recall"] - TUNING_MARGIN_SE * trial["standard_error"]

    assert lower_bound(chosen) >= 0.95 and all(lower_bound(t) < 0.95 for t in trials[:-1])
    assert all(t["standard_error"] > 0 for t in trials if t["recall"] < 1)
    assert [t["cost"] for t in trials] == sorted(t["cost"] for t in trials)
    defaults = index.search_defaults
    assert (defaults["leaves_to_search"], defaults["pre_reorder_num_neighbors"]) == (
        chosen["leaves_to_search"],
        chosen["pre_reorder_num_neighbors"],
    )


def test_tuning_falls_back_to_best_found(small, monkeypatch):
    # Two reorder depths and an unreachable target: every candidate is tried and
    # the highest recall wins.
    monkeypatch.setattr(recall_module, "REORDER_MULTIPLES", (2, 3))
    config = choose_config(3_000, D, "squared_l2", method="tree_ah")
    index = build_index(*small, distance="squared_l2", config=config, target_recall=1.0)
    recall = index.manifest.recall
    assert not recall["reached_target"]
    best = max(recall["tuning"], key=lambda t: t["recall"])
    assert best["recall"] < 1.0 and recall["value"] < 1.0
    assert (
        index.search_defaults["leaves_to_search"],
        index.search_defaults["pre_reorder_num_neighbors"],
    ) == (best["leaves_to_search"], best["pre_reorder_num_neighbors"])


def _near_duplicates(rng, groups=200, copies=30, d=32, noise=0.01):
    centres = normalize_rows(rng.standard_normal((groups, d)).astype(np.float32))
    rows = np.repeat(centres, copies, axis=0) + noise * rng.standard_normal((groups * copies, d))
    return normalize_rows(rows.astype(np.float32))


def test_held_out_tuning_queries_measure_and_tune_on_outside_queries():
    # Every row has 29 near-copies, so leave-self-out finds them in the query's own leaf;
    # random outside queries have their neighbours spread over many leaves.
    rng = np.random.default_rng(4)
    vectors = _near_duplicates(rng)
    ids = [f"v{i}" for i in range(len(vectors))]
    queries = rng.standard_normal((300, vectors.shape[1])).astype(np.float32) * 3.0
    config = choose_config(len(vectors), vectors.shape[1], "cosine", method="tree_ah")
    self_tuned = build_index(vectors, ids, config=config, target_recall=0.9)
    held_out = build_index(vectors, ids, config=config, target_recall=0.9, tuning_queries=queries)
    recall = held_out.manifest.recall
    assert recall["method"].startswith("held-out: 300 query vectors")
    assert recall["n_queries"] + recall["n_tuning_queries"] == 300
    assert self_tuned.manifest.recall["method"].startswith("leave-self-out")
    # The recorded value is the recall of the reporting half (odd queries) at the defaults
    # (within float noise: the build re-normalises the rows, which can swap near-ties).
    report = normalize_rows(queries[1::2])
    found, _ = held_out.search_batch(report)
    exact_rows, _ = exact_search(report, vectors, 10, "dot_product")
    row_of = {item: row for row, item in enumerate(ids)}
    approx = [[row_of[item] for item in hits] for hits in found]
    assert recall["value"] == pytest.approx(recall_at_k(approx, exact_rows, 10), abs=0.005)
    assert recall["reached_target"] and recall["value"] >= 0.9
    assert held_out.search_defaults["leaves_to_search"] > self_tuned.search_defaults["leaves_to_search"]


def test_tuning_candidates_climb_a_geometric_ladder_cheapest_first():
    assert geometric_ladder(20) == [1, 2, 3, 4, 6, 8, 11, 16, 20]
    assert geometric_ladder(1) == [1]
    candidates = tuning_candidates(141, 20_000, 10)
    assert candidates == sorted(candidates)
    assert {leaves for _, leaves, _ in candidates} == set(geometric_ladder(141))
    # Multiples of k, at least k + 1 (the depth recall is measured at) and at most n.
    assert {reorder for _, _, reorder in candidates} == {20, 50, 100, 200, 500, 1000}
    assert {reorder for _, _, reorder in tuning_candidates(4, 300, 10)} == {20, 50, 100, 200, 300}
    assert {reorder for _, _, reorder in tuning_candidates(4, 300, 1)} == {2, 5, 10, 20, 50, 100}
    cost, leaves, reorder = candidates[0]
    assert (leaves, reorder) == (1, 20) and cost == round(20_000 / 141 + 30 * 20)


def test_recall_record_is_the_manifests_recall_dict():
    trial = TuningTrial(
        leaves_to_search=3, pre_reorder_num_neighbors=50, cost=1925, recall=0.96, standard_error=0.01
    )
    tuned = RecallRecord(
        k=10,
        value=0.955,
        n_queries=500,
        target=0.95,
        method="leave-self-out: ...",
        tuning=(trial,),
        n_tuning_queries=500,
    )
    assert tuned.reached_target
    assert tuned.to_dict() == {
        "k": 10,
        "value": 0.955,
        "n_queries": 500,
        "target": 0.95,
        "tuning": [
            {
                "leaves_to_search": 3,
                "pre_reorder_num_neighbors": 50,
                "cost": 1925,
                "recall": 0.96,
                "standard_error": 0.01,
            }
        ],
        "n_tuning_queries": 500,
        "reached_target": True,
        "method": "leave-self-out: ...",
    }
    # Nothing measured (a single row): no method, the target not reached.
    assert RecallRecord(k=None, value=None, n_queries=0, target=0.95).to_dict() == {
        "k": None,
        "value": None,
        "n_queries": 0,
        "target": 0.95,
        "reached_target": False,
    }
    merged = RecallRecord(
        k=10, value=0.9, n_queries=200, target=0.95, method="merged", per_shard=(0.97, None)
    )
    assert merged.to_dict() == {
        "k": 10,
        "value": 0.9,
        "n_queries": 200,
        "target": 0.95,
        "per_shard": [0.97, None],
        "reached_target": False,
        "method": "merged",
    }
