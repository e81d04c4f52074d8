"""The recall of a sharded index's merged search (`pipelines.build_shards`): each shard's
answers to the probe queries, exact and approximate, merged into the global top k at every k
of the index's ladder."""

from __future__ import annotations

from collections.abc import Sequence

from retrieval import index as index_lib
from retrieval import metrics, sharded


def merged_recall(
    answers: list[dict], ladder: Sequence[int], higher_is_better: bool, target_recall: float
) -> index_lib.RecallRecord:
    """Recall@k of the merged shard answers against the merged exact answers at each k of
    `ladder` (`retrieval.index.k_ladder`; the record's k and value are its first): leave-self-out
    when each probe is a database row (its own id is dropped from both lists), plain when the
    probes are held-out queries (id None); with the recall@k each shard measured itself
    (`per_shard`; each shard's manifest has its own recall per k)."""
    per_shard = tuple(a["recall"]["value"] for a in answers)
    unmeasured = index_lib.RecallRecord(
        k=ladder[0], value=None, n_queries=0, target=target_recall, per_shard=per_shard, per_k=()
    )
    queries = len(answers[0]["exact"])
    if queries == 0:
        return unmeasured
    self_ids = answers[0]["probe_ids"]
    exact = _merged([a["exact"] for a in answers], ladder[-1], self_ids, higher_is_better)
    # A tiny index has fewer neighbours than the ladder asks: each k is measured at most there.
    most = min(len(e) for e in exact)
    per_k: list[index_lib.RecallAtK] = []
    for asked in ladder:
        k = min(asked, most)
        if k < 1 or (per_k and per_k[-1].k == k):
            continue
        approx = _merged([a["approx"][str(asked)] for a in answers], k, self_ids, higher_is_better)
        truth = [e[:k] for e in exact]
        per_k.append(index_lib.RecallAtK(k, metrics.recall_at_k(approx, truth, k), queries))
    if not per_k:
        return unmeasured
    if self_ids[0] is None:
        method = (
            f"held-out over the merged shards: {queries} query vectors given to the build are "
            f"queried in every shard, exactly and with each shard's index; the per-shard lists are "
            f"merged and recall@k = mean |approx & exact| / k"
        )
    else:
        method = (
            f"leave-self-out over the merged shards: {queries} rows chosen by a hash of the id are "
            f"queried for k+1 neighbours in every shard, exactly and with each shard's index; the "
            f"per-shard lists are merged, the query's own id dropped, and recall@k = mean "
            f"|approx & exact| / k"
        )
    return index_lib.RecallRecord(
        k=per_k[0].k,
        value=per_k[0].value,
        n_queries=queries,
        target=target_recall,
        method=method,
        per_shard=per_shard,
        per_k=tuple(per_k),
    )


def _merged(lists: list[list], k: int, self_ids: list, higher_is_better: bool) -> list[list[str]]:
    """Each probe's top k over the shards' (ids, scores) lists, its own id dropped."""
    out = []
    for query, self_id in enumerate(self_ids):
        ids, _ = sharded.merge_top_k(
            [shard[query][0] for shard in lists],
            [shard[query][1] for shard in lists],
            k + 1,
            higher_is_better,
        )
        out.append([i for i in ids if i != self_id][:k])
    return out
