"""The recall records a build writes into its index manifest (`recall`), and reads back.

`RecallRecord` is the manifest's `recall` dict; `RecallAtK` one entry of its `per_k` list (the
recall and the tree-AH knobs at one k of the index's ladder); `TuningTrial` one candidate
tried while tuning.  `retrieval.index.recall` measures them; `SearchLadder` is what a loaded
index reads back from them to pick its knobs per k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from retrieval.errors import IndexFormatError
from retrieval.index.config import SEARCH_KNOBS


@dataclasses.dataclass(frozen=True)
class TuningTrial:
    """One (leaves_to_search, pre_reorder_num_neighbors) candidate evaluated while tuning."""

    leaves_to_search: int
    pre_reorder_num_neighbors: int
    cost: int  # estimated, in AH-scored points (see `tuning_candidates`)
    recall: float
    standard_error: float


@dataclasses.dataclass(frozen=True)
class RecallAtK:
    """The recall at one k of the index's ladder and the tree-AH knobs it was measured with,
    which searches for k up to this one (and above the previous ladder k) use.  The knobs are
    None for brute force, and for a sharded index's merged record (each shard has its own)."""

    k: int
    value: float | None
    n_queries: int
    leaves_to_search: int | None = None
    pre_reorder_num_neighbors: int | None = None

    @property
    def knobs(self) -> dict[str, int]:
        """The tree-AH knobs set here, by name (empty for brute force)."""
        return {name: value for name in SEARCH_KNOBS if (value := getattr(self, name)) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object, source: str) -> RecallAtK:
        """One entry of a manifest's recall.per_k, checked (IndexFormatError when damaged)."""
        if not (isinstance(data, dict) and _valid_entry(data)):
            raise IndexFormatError(
                f"{source}: recall.per_k holds {data!r}, not an object with an integer k >= 1, "
                "value, n_queries and the search knobs; the manifest is damaged or hand-edited. "
                "Rebuild the index."
            )
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _valid_entry(data: dict[str, Any]) -> bool:
    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    value = data.get("value")
    return (
        is_int(data.get("k"))
        and data["k"] >= 1
        and is_int(data.get("n_queries"))
        and all(data.get(name) is None or is_int(data[name]) for name in SEARCH_KNOBS)
        and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)))
    )


def read_per_k(recall: Mapping[str, Any], source: str = "manifest") -> tuple[RecallAtK, ...] | None:
    """A manifest recall dict's per-k entries in ascending k, or None for an index built before
    recall was measured per k (it has none: searches use its search_defaults at any k)."""
    entries = recall.get("per_k")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise IndexFormatError(
            f"{source}: recall.per_k is not a list; the manifest is damaged. Rebuild the index."
        )
    return tuple(sorted((RecallAtK.from_dict(e, source) for e in entries), key=lambda e: e.k))


@dataclasses.dataclass(frozen=True)
class RecallRecord:
    """The recall measured at build time, as manifests keep it (`to_dict`).

    k: the recall cut-off (None when nothing was measured: fewer than 2 rows, no queries).
    value: mean recall@k of the measuring queries, or None.
    n_queries: how many queries measured `value`.
    target: the recall the build aimed for at every k; `reached_target` compares the values
      (`value` and each of `per_k`) with it.
    method: how the queries were chosen and recall computed (None when not measured).
    tuning: every candidate tried while tuning the search knobs at k, in order (tuned tree-AH
      only), and n_tuning_queries the queries they were measured on.
    per_shard: a sharded index's shard recall@k values, in shard order (sharded indexes only).
    per_k: the recall and knobs at every k of the index's ladder, ascending (its first is
      `k`, `value`); empty when nothing was measured, None in records of indexes built before
      it existed.
    """

    k: int | None
    value: float | None
    n_queries: int
    target: float
    method: str | None = None
    tuning: tuple[TuningTrial, ...] | None = None
    n_tuning_queries: int | None = None
    per_shard: tuple[float | None, ...] | None = None
    per_k: tuple[RecallAtK, ...] | None = None

    @property
    def reached_target(self) -> bool:
        values = [self.value, *(entry.value for entry in self.per_k or ())]
        return all(value is not None and value >= self.target for value in values)

    @property
    def missed(self) -> tuple[RecallAtK, ...]:
        """The ladder entries measured below the target (the gate names them)."""
        return tuple(e for e in self.per_k or () if e.value is not None and e.value < self.target)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `recall` dict: k, value, n_queries, target, reached_target, and method,
        tuning with n_tuning_queries, per_shard, per_k where they apply."""
        out: dict[str, Any] = {
            "k": self.k,
            "value": self.value,
            "n_queries": self.n_queries,
            "target": self.target,
        }
        if self.tuning is not None:
            out["tuning"] = [dataclasses.asdict(trial) for trial in self.tuning]
            out["n_tuning_queries"] = self.n_tuning_queries
        if self.per_shard is not None:
            out["per_shard"] = list(self.per_shard)
        if self.per_k is not None:
            out["per_k"] = [entry.to_dict() for entry in self.per_k]
        out["reached_target"] = self.reached_target
        if self.method is not None:
            out["method"] = self.method
        return out


@dataclasses.dataclass(frozen=True)
class SearchLadder:
    """The knobs an index searches with for each k, from its manifest (`of`).

    entries: the recall per k, ascending (empty for an index built before per-k tuning).
    max_k: the most neighbours a search may ask (search_defaults.max_k), None for such an index.
    defaults: the search defaults' tree-AH knobs (those of the recall k).
    """

    entries: tuple[RecallAtK, ...]
    max_k: int | None
    defaults: Mapping[str, int]

    @classmethod
    def of(cls, recall: Mapping[str, Any], search_defaults: Mapping[str, Any], source: str) -> SearchLadder:
        max_k = search_defaults.get("max_k")
        if max_k is not None and (isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1):
            raise IndexFormatError(
                f"{source}: search_defaults.max_k is {max_k!r}, not an integer >= 1; the manifest is "
                "damaged or hand-edited. Rebuild the index."
            )
        defaults = {name: search_defaults[name] for name in SEARCH_KNOBS if name in search_defaults}
        return cls(read_per_k(recall, source) or (), max_k, defaults)

    def knobs_at(self, k: int) -> dict[str, int]:
        """The knobs tuned at the smallest ladder k >= k (the largest when k is above them all:
        a tiny index's ladder stops at its n), else the search defaults."""
        chosen = next((e for e in self.entries if e.k >= k), self.entries[-1] if self.entries else None)
        return {**self.defaults, **(chosen.knobs if chosen is not None else {})}
