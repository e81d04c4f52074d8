"""What a query returns: `SearchResult`, a list of `SearchHit`s best first."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One neighbour.  rank: 1 = best.  metadata: the item's metadata row (the index's) without
    `id` (source, sha256, width, height, passthrough columns), {} when the index has none."""

    rank: int
    id: str
    score: float
    metadata: dict

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "metadata": self.metadata}


class SearchResult(list):
    """The hits of one query, best first, plus what answered it.

    embedder, run_id: the index that answered (a refresh may change them between queries).
    distance: the index's distance; higher_is_better: True for cosine / dot_product
    (scores are similarities), False for squared_l2 (scores are squared distances).
    """

    def __init__(self, hits: Iterable[SearchHit], *, embedder: str, run_id: str, distance: str):
        super().__init__(hits)
        self.embedder, self.run_id, self.distance = embedder, run_id, distance
        self.higher_is_better = distance != "squared_l2"

    def __repr__(self) -> str:
        return (
            f"SearchResult(embedder={self.embedder!r}, run_id={self.run_id!r}, "
            f"distance={self.distance!r}, hits={list.__repr__(self)})"
        )
