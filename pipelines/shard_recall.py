"""The recall of a sharded index's merged search (`pipelines.build_shards`): each shard's
answers to the probe queries, exact and approximate, merged into the global top k."""

from __future__ import annotations

from retrieval import index as index_lib
from retrieval import metrics, sharded


def merged_recall(
    answers: list[dict], k: int, higher_is_better: bool, target_recall: float
) -> index_lib.RecallRecord:
    """Recall@k of the merged shard answers against the merged exact answers: leave-self-out
    when each probe is a database row (its own id is dropped from both lists), plain when the
    probes are held-out queries (id None); with the recall each shard measured itself."""
    per_shard = tuple(a["recall"]["value"] for a in answers)
    unmeasured = index_lib.RecallRecord(
        k=k, value=None, n_queries=0, target=target_recall, per_shard=per_shard
    )
    queries = len(answers[0]["exact"])
    if queries == 0:
        return unmeasured
    approx_lists, exact_lists = [], []
    for query in range(queries):
        merged = {}
        for kind in ("exact", "approx"):
            ids, _ = sharded.merge_top_k(
                [a[kind][query][0] for a in answers],
                [a[kind][query][1] for a in answers],
                k + 1,
                higher_is_better,
            )
            merged[kind] = ids
        self_id = answers[0]["probe_ids"][query]
        exact_lists.append([i for i in merged["exact"] if i != self_id][:k])
        approx_lists.append([i for i in merged["approx"] if i != self_id][:k])
    k_eff = min(k, min(len(e) for e in exact_lists))
    if k_eff < 1:
        return unmeasured
    if answers[0]["probe_ids"][0] is None:
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
        k=k_eff,
        value=metrics.recall_at_k(approx_lists, exact_lists, k_eff),
        n_queries=queries,
        target=target_recall,
        method=method,
        per_shard=per_shard,
    )
