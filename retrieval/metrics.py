"""Retrieval quality metrics (pure NumPy / Python; no ScaNN, no TensorFlow).

Two families:

- ANN fidelity: `recall_at_k` compares an approximate neighbour list with the
  exact one (how much of the true top-k the index found).
- Labelled evaluation: `precision_at_k`, `average_precision`,
  `mean_average_precision` and `ns_score` judge a ranking against ground-truth
  relevance.

"Relevant" is expressed per query as a collection of items: either the ids of
the relevant database items, or, for a labelled set, the query's label(s) with
the rankings given as the labels of the retrieved items.  An item at rank i is
relevant when it is `in` that collection.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence, Sized
from typing import TypeAlias

import numpy as np

from retrieval.errors import ConfigError

# Per query, a list of ids or labels, best first: a sequence of lists, or a 2-D array.
Rankings: TypeAlias = "Sequence[Iterable[Hashable]] | np.ndarray"


def recall_at_k(approx_ids: Rankings, exact_ids: Rankings, k: int) -> float:
    """Mean over queries of |approx[:k] ∩ exact[:k]| / k (see `recall_per_query`)."""
    return _mean(recall_per_query(approx_ids, exact_ids, k))


def recall_per_query(approx_ids: Rankings, exact_ids: Rankings, k: int) -> list[float]:
    """Per query, |approx[:k] ∩ exact[:k]| / k, as a list of floats.

    Args:
      approx_ids: per query, the ids returned by the approximate index, best first.
        Rows may be shorter than k (the index found fewer); missing entries count as misses.
      exact_ids: per query, the exact neighbour ids, best first; each row needs >= k entries.
      k: cut-off, >= 1.

    Ties: an approximate result that ties with an exact neighbour at the cut-off
    but has a different id counts as a miss (id-based recall).
    """
    _check_k(k)
    _check_same_length(approx_ids, exact_ids, "approx_ids", "exact_ids")
    hits = []
    for approx, exact in zip(approx_ids, exact_ids):
        exact = list(exact)
        if len(exact) < k:
            raise ConfigError(f"recall_at_k: an exact row has {len(exact)} < k={k} ids.")
        hits.append(len(set(list(approx)[:k]) & set(exact[:k])) / k)
    return hits


def relevance(ranking: Iterable[Hashable], relevant: Iterable[Hashable]) -> np.ndarray:
    """Boolean array: relevance[i] is True when ranking[i] is in `relevant`."""
    if isinstance(relevant, (str, bytes)):
        # set("cat") would be {"c", "a", "t"}: almost certainly a bare label.
        raise ConfigError(
            f"relevant items must be a collection, got the string {relevant!r}; "
            f"wrap a single label in a set: {{{relevant!r}}}."
        )
    relevant = set(relevant)
    return np.array([item in relevant for item in ranking], dtype=bool)


def precision_at_k(rankings: Rankings, relevant: Sequence[Iterable[Hashable]], k: int) -> float:
    """Mean over queries of (number of relevant items among the first k) / k.

    Args:
      rankings: per query, retrieved ids (or labels), best first; each needs >= k entries.
      relevant: per query, the collection of relevant ids (or the query's label(s)).
      k: cut-off, >= 1.
    """
    _check_k(k)
    _check_same_length(rankings, relevant, "rankings", "relevant")
    values = []
    for ranking, rel in zip(rankings, relevant):
        ranking = list(ranking)
        if len(ranking) < k:
            raise ConfigError(f"precision_at_k: a ranking has {len(ranking)} < k={k} items.")
        values.append(relevance(ranking[:k], rel).sum() / k)
    return _mean(values)


def average_precision(
    ranking: Iterable[Hashable], relevant: Iterable[Hashable], n_relevant: int | None = None
) -> float:
    """Average precision of one ranking.

    AP = (1 / R) * sum over ranks i (1-based) where the item is relevant of P@i,
    with P@i = (relevant items among the first i) / i, and R the total number of
    relevant items in the collection, retrieved or not, so relevant items the
    ranking misses lower AP.

    Args:
      ranking: retrieved ids (or labels), best first.
      relevant: collection of relevant ids (or the query's label).
      n_relevant: R.  Defaults to len(relevant), which is right for id sets;
        with labels pass the number of database items carrying the label
        (minus one if the query itself was excluded from the ranking).
    """
    rel = relevance(ranking, relevant)
    total = len(set(relevant)) if n_relevant is None else n_relevant
    if total < 1:
        raise ConfigError("average_precision: a query has no relevant items (R = 0); AP is undefined.")
    if rel.sum() > total:
        raise ConfigError(
            f"average_precision: the ranking holds {rel.sum()} relevant items but n_relevant={total}."
        )
    precision_at_rank = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float(precision_at_rank[rel].sum() / total)


def mean_average_precision(
    rankings: Rankings,
    relevant: Sequence[Iterable[Hashable]],
    n_relevant: Sequence[int | None] | None = None,
) -> float:
    """Mean over queries of `average_precision` (mAP).

    Args:
      rankings: per query, retrieved ids (or labels), best first.
      relevant: per query, the collection of relevant ids (or labels).
      n_relevant: optional per-query R values (see `average_precision`).
    """
    _check_same_length(rankings, relevant, "rankings", "relevant")
    if n_relevant is None:
        n_relevant = [None] * len(rankings)
    _check_same_length(rankings, n_relevant, "rankings", "n_relevant")
    return _mean([average_precision(r, rel, n) for r, rel, n in zip(rankings, relevant, n_relevant)])


def ns_score(retrieved_groups: Rankings, query_groups: Sequence[Hashable], top: int = 4) -> float:
    """UKBench N-S score: mean number of same-group items among the top `top` results.

    UKBench has 4 images per object and every image is used as a query against
    the full set, the query included (it is normally its own first hit), so the
    score ranges from 0 to 4.

    Args:
      retrieved_groups: per query, group labels of the retrieved items, best first
        (>= `top` entries; the query itself must not have been removed).
      query_groups: per query, its group label.
    """
    _check_k(top)
    _check_same_length(retrieved_groups, query_groups, "retrieved_groups", "query_groups")
    counts = []
    for groups, group in zip(retrieved_groups, query_groups):
        groups = list(groups)
        if len(groups) < top:
            raise ConfigError(f"ns_score: a query has {len(groups)} < top={top} results.")
        counts.append(sum(g == group for g in groups[:top]))
    return _mean(counts)


def _check_k(k: int) -> None:
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}.")


def _check_same_length(a: Sized, b: Sized, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ConfigError(f"{name_a} and {name_b} differ in length: {len(a)} != {len(b)}.")
    if len(a) == 0:
        raise ConfigError(f"{name_a} is empty: need at least one query.")


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))
