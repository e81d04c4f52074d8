"""Recall measured at build time, and the search knobs tuned with it.

A `RecallProbe` holds queries with their exact neighbours; `choose_search_defaults` measures
a freshly built searcher with it at every k of the index's ladder (`config.k_ladder`: the
recall cut-off, 100, serve_max_k), tuning the tree-AH knobs per k on one half of the queries
and reporting on the other, and returns the `RecallRecord` that manifests keep as their
`recall` dict: one `RecallAtK` (knobs and recall) per ladder k, which searches then use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from retrieval.exact import exact_search_by_chunks
from retrieval.index.config import (
    REORDER_COST_IN_POINTS,
    REORDER_MULTIPLES,
    SEARCH_KNOBS,
    TUNING_MARGIN_SE,
    IndexConfig,
)
from retrieval.index.records import RecallAtK, RecallRecord, TuningTrial
from retrieval.metrics import recall_per_query
from retrieval.scann_import import ScannSearcher

__all__ = [
    "RecallAtK",
    "RecallProbe",
    "RecallRecord",
    "TuningTrial",
    "choose_search_defaults",
    "geometric_ladder",
    "tuning_candidates",
]

RECALL_METHOD = (
    "leave-self-out: {q} database rows sampled with seed {seed} are queried for k+1 "
    "neighbours in the index and by exact search; each query's own row is dropped from "
    "both lists, which are truncated to k; recall@k = mean |approx & exact| / k. When "
    "search knobs are tuned, alternate sampled rows tune them and the others measure this value"
)
HELD_OUT_METHOD = (
    "held-out: {q} query vectors given to the build (not rows of the index) are queried for "
    "k neighbours in the index and by exact search over all rows; recall@k = mean "
    "|approx & exact| / k. When search knobs are tuned, alternate queries tune them and the "
    "others measure this value"
)


@dataclasses.dataclass
class RecallProbe:
    """Queries with their exact neighbours: sampled database rows (leave-self-out, `rows`
    names them) or held-out query vectors (`rows` is None).  `method` says which, for the
    recall record."""

    rows: np.ndarray | None
    queries: np.ndarray
    exact: np.ndarray
    k: int
    method: str

    @classmethod
    def sample(
        cls, x: np.ndarray, scann_distance: str, k: int, num_queries: int, seed: int
    ) -> RecallProbe | None:
        """min(num_queries, n) rows of `x` sampled with `seed` (None when there are too few rows
        or no queries): leave-self-out."""
        n = x.shape[0]
        k = min(k, n - 1)
        if k < 1 or num_queries < 1:
            return None
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(num_queries, n), replace=False))
        queries = np.array(x[rows])
        # x is already normalised for cosine, so dot product is the exact cosine score.
        exact, _ = exact_search_by_chunks(queries, x, k + 1, scann_distance)
        method = RECALL_METHOD.format(q=len(rows), seed=seed)
        return cls(rows=rows, queries=queries, exact=_drop_self(exact, rows, k), k=k, method=method)

    @classmethod
    def held_out(cls, x: np.ndarray, queries: np.ndarray, scann_distance: str, k: int) -> RecallProbe:
        """Held-out `queries` (prepared like the rows of `x`) against all rows of `x`."""
        k = min(k, x.shape[0])
        exact, _ = exact_search_by_chunks(queries, x, k, scann_distance)
        method = HELD_OUT_METHOD.format(q=len(queries))
        return cls(rows=None, queries=queries, exact=exact, k=k, method=method)

    def at(self, k: int) -> RecallProbe:
        """This probe for recall@k, k <= self.k: the exact lists cut to their first k."""
        assert 1 <= k <= self.k
        return dataclasses.replace(self, exact=self.exact[:, :k], k=k)

    def ladder(self, ks: Sequence[int]) -> tuple[int, ...]:
        """The ladder `ks` as this probe can measure it: each k at most self.k (a tiny index
        has fewer neighbours than the ladder asks), ascending, without repeats."""
        return tuple(sorted({min(k, self.k) for k in ks}))

    def split(self) -> tuple[RecallProbe, RecallProbe]:
        """Two disjoint probes (alternate queries); both halves are the whole probe when it has one."""
        if len(self.queries) < 2:
            return self, self
        first, second = (
            dataclasses.replace(
                self,
                rows=None if self.rows is None else self.rows[i::2],
                queries=self.queries[i::2],
                exact=self.exact[i::2],
            )
            for i in (0, 1)
        )
        return first, second

    def recall(self, searcher: ScannSearcher, **knobs: int) -> float:
        return float(np.mean(self.recalls(searcher, **knobs)))

    def recalls(self, searcher: ScannSearcher, **knobs: int) -> list[float]:
        """Recall@k of each query."""
        # Leave-self-out needs k + 1 results before the query's own row is dropped.
        wanted = self.k if self.rows is None else self.k + 1
        if "pre_reorder_num_neighbors" in knobs:
            knobs["pre_reorder_num_neighbors"] = max(knobs["pre_reorder_num_neighbors"], wanted)
        rows, scores = searcher.search_batched_parallel(self.queries, final_num_neighbors=wanted, **knobs)
        rows = rows.astype(np.int64)
        rows[np.isnan(scores)] = -1  # ScaNN's padding for "not found"
        if self.rows is not None:
            rows = _drop_self(rows, self.rows, self.k)
        return recall_per_query(rows, self.exact, self.k)


def _drop_self(neighbours: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own row from its neighbour list, then keep the first k.

    A stable argsort on "is self" moves the self entry (if any) to the end and
    keeps the others in rank order.
    """
    order = np.argsort(neighbours == query_rows[:, None], axis=1, kind="stable")
    return np.take_along_axis(neighbours, order, axis=1)[:, :k]


def choose_search_defaults(
    searcher: ScannSearcher,
    config: IndexConfig,
    probe: RecallProbe | None,
    ladder: Sequence[int],
    target_recall: float,
    *,
    first_guess: Mapping[int, Mapping[str, int]] | None = None,
) -> tuple[dict[str, int], RecallRecord]:
    """Search defaults and the recall record for a freshly built searcher, measured (and for
    tuned tree-AH, tuned) at every k of `ladder` (`config.k_ladder`: the recall cut-off k
    first, serve_max_k last); the probe holds exact neighbours for the largest.

    The defaults are {"k": ladder[0], its knobs, "max_k": ladder[-1]}; the knobs of every k are
    in the record's per_k.  first_guess: {k: knobs} (a previous index's tuned knobs) tried
    instead of the tuning ladder at those k: kept when they reach the target, else the record
    says it was missed; a k without a guess is tuned."""
    k, max_k = ladder[0], ladder[-1]
    record = RecallRecord(
        k=None if probe is None else min(k, probe.k),
        value=None,
        n_queries=0 if probe is None else len(probe.queries),
        target=target_recall,
        method=None if probe is None else probe.method,
        per_k=(),
    )
    fixed: dict[str, int] = {}
    if config.method == "tree_ah":
        assert config.leaves_to_search is not None and config.pre_reorder_num_neighbors is not None
        fixed = {
            "leaves_to_search": config.leaves_to_search,
            "pre_reorder_num_neighbors": config.pre_reorder_num_neighbors,
        }
    if probe is None:
        return {"k": k, **fixed, "max_k": max_k}, record
    tuned = config.method == "tree_ah" and config.tune
    # Tune on one half of the queries and report on the other, so the recorded recall is not
    # flattered by having been the tuning objective.
    tune_probe, report_probe = probe.split() if tuned else (probe, probe)
    per_k, first_trials = [], None
    for at_k in probe.ladder(ladder):
        knobs = dict(fixed)
        if tuned:
            guess = None if first_guess is None else first_guess.get(at_k)
            knobs, trials = _tune(searcher, config, tune_probe.at(at_k), at_k, target_recall, guess)
            first_trials = trials if first_trials is None else first_trials
        elif knobs:  # fixed knobs: a search for k reorders at least k (`Index._search_params`)
            knobs["pre_reorder_num_neighbors"] = max(knobs["pre_reorder_num_neighbors"], at_k)
        measure = report_probe.at(at_k)
        per_k.append(RecallAtK(at_k, measure.recall(searcher, **knobs), len(measure.queries), **knobs))
    first = per_k[0]
    record = dataclasses.replace(
        record,
        value=first.value,
        n_queries=first.n_queries,
        tuning=first_trials,
        n_tuning_queries=len(tune_probe.queries) if tuned else None,
        per_k=tuple(per_k),
    )
    knobs = first.knobs if tuned else fixed
    return {"k": k, **knobs, "max_k": max_k}, record


def _tune(
    searcher: ScannSearcher,
    config: IndexConfig,
    probe: RecallProbe,
    k: int,
    target_recall: float,
    first_guess: Mapping[str, int] | None = None,
) -> tuple[dict[str, int], tuple[TuningTrial, ...]]:
    """The cheapest (leaves_to_search, pre_reorder_num_neighbors) reaching target_recall.

    A candidate reaches the target when its recall on the tuning queries, less
    TUNING_MARGIN_SE standard errors of that mean, is at least target_recall: the
    recorded recall comes from the other half of the queries, and a candidate that only
    just reaches the target on one half misses it on the other about half the time.
    Candidates are tried in increasing estimated cost.  One is skipped when an
    already-failed candidate searched at least as many leaves and reordered at
    least as many candidates, as recall is (close to) monotone in both knobs.
    When none reaches the target, the highest recall found wins (cheapest on ties).
    With a `first_guess` (leaves_to_search, pre_reorder_num_neighbors), only it is tried.

    Returns (knobs, trials) where trials lists every evaluated candidate.
    """
    assert config.num_leaves is not None  # a tree-AH config
    trials: list[TuningTrial] = []
    n = searcher.size()
    candidates = tuning_candidates(config.num_leaves, n, k)
    if first_guess is not None:  # only the guess: a miss is for the caller to handle
        leaves, reorder = (
            min(int(first_guess.get(name, 1)), top) for name, top in zip(SEARCH_KNOBS, (config.num_leaves, n))
        )
        candidates = [
            (round(leaves * n / config.num_leaves + REORDER_COST_IN_POINTS * reorder), leaves, reorder)
        ]
    for cost, leaves, reorder in candidates:
        if any(leaves <= t.leaves_to_search and reorder <= t.pre_reorder_num_neighbors for t in trials):
            continue
        per_query = probe.recalls(searcher, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder)
        value = float(np.mean(per_query))
        error = float(np.std(per_query, ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
        trials.append(TuningTrial(leaves, reorder, cost, value, error))
        if value - TUNING_MARGIN_SE * error >= target_recall:
            break
    best = trials[-1]
    if best.recall < target_recall:
        best = max(trials, key=lambda t: (t.recall, -t.cost))
    knobs = {name: getattr(best, name) for name in SEARCH_KNOBS}
    return knobs, tuple(trials)


def tuning_candidates(num_leaves: int, n: int, k: int) -> list[tuple[int, int, int]]:
    """(estimated cost, leaves_to_search, pre_reorder_num_neighbors), cheapest first.

    Cost is in "AH-scored points": leaves searched times the mean leaf size, plus
    REORDER_COST_IN_POINTS per exactly re-scored candidate.  Leaves follow a
    ~sqrt(2) geometric ladder up to all `num_leaves`; reorder depths are REORDER_MULTIPLES
    of k (at least k + 1, the depth recall is measured at, and at most n).
    """
    leaf_size = n / num_leaves
    reorders = sorted({min(n, max(k + 1, m * k)) for m in REORDER_MULTIPLES})
    return sorted(
        (round(leaves * leaf_size + REORDER_COST_IN_POINTS * reorder), leaves, reorder)
        for leaves in geometric_ladder(num_leaves)
        for reorder in reorders
    )


def geometric_ladder(upper: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 11, 16, ... (ratio ~sqrt(2)), ending with `upper`."""
    values, value = [], 1
    while value < upper:
        values.append(value)
        value = max(value + 1, round(value * math.sqrt(2)))
    return values + [upper]
