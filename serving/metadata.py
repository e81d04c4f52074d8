"""`MetadataColumns`: an index's metadata columns, for fetching the few rows of a result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# A metadata column of several chunks is combined into one Arrow array (faster fetches)
# only below this size: string and binary arrays have 32-bit offsets (at most 2 GiB of data).
COMBINE_MAX_BYTES = 1 << 30


class MetadataColumns:
    """The index's metadata columns (without id) for fetching a few rows at a time.

    Null-free integer and float columns are NumPy arrays (faster to index); the others are
    Arrow arrays, the chunks of each (one per shard or row group) combined into one when
    they hold less than `combine_max_bytes` (one array is faster to fetch from than several,
    or than Table.take).  A bigger column stays chunked and a fetch takes from each chunk its
    rows: a string or binary column over 2 GiB (e.g. sha256 at ~33M rows) cannot be one
    `string` array (32-bit offsets), and ChunkedArray.take combines the chunks itself
    (pyarrow 25: "offset overflow").
    """

    def __init__(self, table: Any, combine_max_bytes: int = COMBINE_MAX_BYTES):
        import pyarrow as pa

        self.column_names: list[str] = table.column_names
        # Per column: a NumPy array, or the index of its chunk layout in self._layouts and
        # its non-empty chunks.
        self._numpy: list[np.ndarray | None] = []
        self._chunks: list[list | None] = []
        self._layout_of: list[int | None] = []
        self._layouts: list[np.ndarray] = []  # first global row of each chunk
        for name in self.column_names:
            column = table.column(name)
            if (
                pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            ) and column.null_count == 0:
                # Fixed-width values: combining cannot overflow (one copy when several chunks).
                self._numpy.append(column.combine_chunks().to_numpy(zero_copy_only=True))
                self._chunks.append(None)
                self._layout_of.append(None)
                continue
            if column.num_chunks <= 1 or column.nbytes < combine_max_bytes:
                chunks = [column.combine_chunks()]
            else:
                chunks = [chunk for chunk in column.chunks if len(chunk)] or [column.chunk(0)]
            starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]], dtype=np.int64)
            for at, layout in enumerate(self._layouts):  # noqa: B007 (used after the loop)
                if np.array_equal(layout, starts):
                    break
            else:
                at = len(self._layouts)
                self._layouts.append(starts)
            self._numpy.append(None)
            self._chunks.append(chunks)
            self._layout_of.append(at)

    def column_chunks(self, name: str) -> list | None:
        """The Arrow arrays that fetches take column `name` from (one when it was combined),
        or None for a column held as a NumPy array."""
        chunks = self._chunks[self.column_names.index(name)]
        return None if chunks is None else list(chunks)

    def rows(self, rows: Sequence[int] | np.ndarray) -> list[dict]:
        """The metadata of `rows` (in that order, repeats allowed), one dict a row."""
        import pyarrow as pa

        positions = np.asarray(rows, dtype=np.int64)
        # Per chunk layout: [(chunk number, positions in the result, rows in the chunk)].
        groups: list[list[tuple[int, Any, Any]]] = []
        for starts in self._layouts:
            if len(starts) == 1:
                groups.append([(0, None, pa.array(positions))])
                continue
            chunk_of = np.searchsorted(starts, positions, side="right") - 1
            parts: list[tuple[int, Any, Any]] = []
            for c in np.unique(chunk_of).tolist():
                where = np.flatnonzero(chunk_of == c)
                parts.append((c, where, pa.array(positions[where] - starts[c])))
            groups.append(parts)
        values: list[list] = []
        for numpy, chunks, layout in zip(self._numpy, self._chunks, self._layout_of):
            if numpy is not None:
                values.append(numpy[positions].tolist())
                continue
            assert chunks is not None and layout is not None
            parts = groups[layout]
            if len(parts) == 1:
                values.append(chunks[parts[0][0]].take(parts[0][2]).to_pylist())
                continue
            column = [None] * len(positions)
            for c, where, local in parts:
                for at, value in zip(where.tolist(), chunks[c].take(local).to_pylist()):
                    column[at] = value
            values.append(column)
        return [dict(zip(self.column_names, row)) for row in zip(*values)]
