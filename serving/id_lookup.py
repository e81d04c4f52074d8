"""id -> row for id queries, in two 8-byte arrays instead of a dict: smaller, and faster to
build over many ids (BENCHMARKS.md, serving).
Here the rows are ordered by the ids' string hashes: a lookup hashes the id, binary-searches
the sorted hashes and compares the id itself, so two ids with one hash still resolve.
Python's string hash differs between processes, which is fine: nothing here is stored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class IdLookup:
    """Row of an id in `ids` (row i names vector i), or None."""

    def __init__(self, ids: np.ndarray, hash_fn: Callable[[object], int] = hash):
        self._ids = ids
        self._hash = hash_fn
        hashes = np.fromiter(map(hash_fn, ids), dtype=np.int64, count=len(ids))
        self._rows = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, item_id: str) -> int | None:
        h = self._hash(item_id)
        at = int(np.searchsorted(self._hashes, h))
        while at < len(self._hashes) and self._hashes[at] == h:
            row = int(self._rows[at])
            if self._ids[row] == item_id:
                return row
            at += 1
        return None
