"""A sharded index: rows partitioned by a stable hash of their id, one index per shard.

    <index dir>/
        shard-00000-of-00004/   an index directory (retrieval.index), with its own manifest
        ...
        manifest.json           kind "imgindex.sharded_index", written last: the shards with
                                their row counts and the SHA-256 of each shard's manifest.json,
                                the hash, the merged recall

Row i of shard s is id `ids[i]` of that shard; a row belongs to shard `shard_of(id, N)`
(`retrieval.shard_hash`), which depends only on the id and N (not on the input order, file
layout or runner), so a rebuild puts every id in the same shard.  A query searches every shard for its top k and
merges them: the result is the exact top k of the union of what the shards returned.

`open_index` loads either layout; a missing, replaced or corrupted shard is an
IndexFormatError naming it, never a silently smaller index.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from retrieval import atomic_files
from retrieval import manifest as mf
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.queries import check_k, prepare_queries, prepare_query
from retrieval.shard_hash import HASH, shard_name, shard_of, shards_for
from retrieval.version import __version__

if TYPE_CHECKING:
    import pyarrow as pa

    from retrieval.index import Index
    from retrieval.index.files import StoredVectors

KIND = "imgindex.sharded_index"
FORMAT_VERSION = 1
__all__ = [  # the hash's names are re-exported: callers know them as sharded.*
    "HASH",
    "KIND",
    "ShardedIndex",
    "ShardedManifest",
    "describe_method",
    "manifest_kind",
    "merge_top_k",
    "open_index",
    "shard_name",
    "shard_of",
    "shards_for",
    "write_manifest",
]


@dataclasses.dataclass
class ShardedManifest:
    """The sharded index's manifest.

    shards: [{"dir": "shard-00000-of-00002", "n": rows, "manifest_sha256": hex}, ...] in
      shard order.
    recall: recall@k of the merged search against exact search over all rows (see
      pipelines.build_shards), with "per_shard" values as the shards measured them, and
      "per_k": the merged recall at every k of the ladder (`retrieval.index.recall`).
    search_defaults: {"k": ..., "max_k": ...} (max_k: the most a search may ask; absent in
      indexes built before it); the search knobs of each shard, per k, are in its own manifest.
    """

    distance: str
    n: int
    d: int
    num_shards: int
    shards: list
    recall: dict
    search_defaults: dict
    build_seconds: float
    embedder: dict | None = None
    hash: str = HASH
    created_at: str = dataclasses.field(default_factory=mf.utc_now)
    producer_version: str = __version__
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object, source: str | Path) -> ShardedManifest:
        """Build from parsed JSON, checking what every manifest kind checks
        (`retrieval.manifest.ManifestSchema`), then the hash and the shard list."""
        fields = SHARDED_SCHEMA.check(data, str(source))
        if fields.get("hash") != HASH:
            raise IndexFormatError(
                f"{source}: rows were partitioned by {fields.get('hash')!r}, which this "
                f"imgindex does not know ({HASH}). Rebuild the index."
            )
        manifest = cls(**fields)
        if (
            not isinstance(manifest.shards, list)
            or len(manifest.shards) != manifest.num_shards
            or not all(
                isinstance(s, dict) and {"dir", "n", "manifest_sha256"} <= s.keys() for s in manifest.shards
            )
        ):
            raise IndexFormatError(
                f"{source}: the shard list is damaged (expected {manifest.num_shards} "
                "entries with dir, n and manifest_sha256). Rebuild the index."
            )
        return manifest


SHARDED_SCHEMA = mf.ManifestSchema.of(
    ShardedManifest,
    kind=KIND,
    format_version=FORMAT_VERSION,
    types={
        "distance": str,
        "n": int,
        "d": int,
        "num_shards": int,
        "recall": dict,
        "search_defaults": dict,
    },
    messages=mf.ManifestMessages(
        not_object="{source}: expected a JSON object, got {got}. Rebuild the index.",
        wrong_kind="{source}: kind is {kind!r}, expected {expected!r}; this is not an imgindex "
        "sharded index manifest.",
        unsupported_version="{source}: unsupported sharded index format_version {version!r}; "
        "this imgindex ({imgindex}) reads {supported}. Rebuild the index.",
        missing="{source}: incomplete sharded index manifest (missing {fields}). Rebuild the index.",
        wrong_type="{source}: field(s) {fields} of the sharded index manifest have the wrong type "
        "(damaged or hand-edited). Rebuild the index.",
    ),
)


def write_manifest(directory: str | Path, manifest: ShardedManifest) -> None:
    atomic_files.write_json_atomic(Path(directory) / mf.MANIFEST_NAME, manifest.to_dict())


def manifest_kind(directory: str | Path) -> str | None:
    """The `kind` of directory/manifest.json, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(directory) / mf.MANIFEST_NAME).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def describe_method(shard_methods: Iterable[str]) -> str:
    """`sharded(<N>x <methods>)`, as run manifests and `info()` show a sharded index."""
    shard_methods = list(shard_methods)
    return f"sharded({len(shard_methods)}x {'/'.join(sorted(set(shard_methods)))})"


def merge_top_k(
    id_lists: Sequence[Sequence[str]], score_lists: Sequence[npt.ArrayLike], k: int, higher_is_better: bool
) -> tuple[list[str], np.ndarray]:
    """Merge per-shard results (lists of ids, scores best first) into the best k overall."""
    ids, scores = _merge_rows(
        [np.asarray(part, dtype=object) for part in id_lists], score_lists, k, higher_is_better
    )
    return ids.tolist(), scores


class ShardedIndex:
    """Several indexes searched as one; implements `retrieval.searchable.SearchableIndex` like
    `retrieval.index.Index`.  Global row numbers run through shard 0's rows, then shard 1's..."""

    def __init__(
        self,
        shards: Sequence[Index],
        manifest: ShardedManifest,
        directories: Sequence[str | os.PathLike[str]],
    ) -> None:
        self.shards = list(shards)
        self.manifest = manifest
        self.directories = [Path(d) for d in directories]
        self.offsets = np.cumsum([0] + [s.n for s in self.shards])
        self._ids = np.concatenate([np.asarray(s.ids, dtype=object) for s in self.shards])

    n = property(lambda self: self.manifest.n)
    d = property(lambda self: self.manifest.d)
    input_dim = property(lambda self: self.manifest.d, doc="sharded indexes have no projection")
    projection = None
    distance = property(lambda self: self.manifest.distance)
    ids = property(lambda self: self._ids, doc="global row -> id (shard 0's rows first, then shard 1's...)")
    num_shards = property(lambda self: len(self.shards))
    recall = property(lambda self: self.manifest.recall, doc="merged recall measured at build time")
    embedder = property(lambda self: self.manifest.embedder, doc="the embedder spec (dict) or None")

    @property
    def method(self) -> str:
        return describe_method(s.method for s in self.shards)

    @property
    def search_defaults(self) -> dict[str, Any]:
        return dict(self.manifest.search_defaults)

    @property
    def max_k(self) -> int | None:
        """The most neighbours a search may ask, or None (built before it was recorded)."""
        return self.manifest.search_defaults.get("max_k")

    def __repr__(self) -> str:
        return f"ShardedIndex(n={self.n}, d={self.d}, distance={self.distance!r}, shards={self.num_shards})"

    def metadata(self) -> pa.Table | None:
        """Every shard's metadata table, concatenated in global row order, or None when no shard
        has one.  Some shards with and others without, or differing schemas: IndexFormatError."""
        import pyarrow as pa

        tables = [shard.metadata() for shard in self.shards]
        if all(t is None for t in tables):
            return None
        where = self.directories[0].parent
        if any(t is None for t in tables):
            raise IndexFormatError(f"{where}: some shards have metadata and others do not; rebuild the index")
        try:
            return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        except pa.ArrowInvalid as exc:
            raise IndexFormatError(
                f"{where}: the shards' metadata schemas differ ({exc}); rebuild the index"
            ) from exc

    def stored_vectors(self) -> StoredVectors | _ShardVectors | None:
        """Row lookup over every shard's stored vectors (global row), or None when any lacks them."""
        return self._stored_vectors

    indexed_vectors = stored_vectors  # without DBA the vectors searched are the stored ones

    @functools.cached_property
    def _stored_vectors(self) -> StoredVectors | _ShardVectors | None:
        arrays = [shard.stored_vectors() for shard in self.shards]
        present = [a for a in arrays if a is not None]
        if len(present) < len(arrays):
            return None
        return present[0] if len(present) == 1 else _ShardVectors(present)

    dba = None  # refused for sharded builds: the neighbours span every shard

    def prepare_query(self, query: npt.ArrayLike) -> np.ndarray:
        return prepare_query(query, dim=self.d, distance=self.distance, label=self._label)

    def prepare_queries(self, queries: npt.ArrayLike) -> np.ndarray:
        return prepare_queries(queries, dim=self.d, distance=self.distance, label=self._label)

    def search(self, query: npt.ArrayLike, k: int | None = None) -> tuple[list[str], np.ndarray]:
        """Top k of one query over all shards: (ids, scores) best first."""
        rows, scores = self.search_rows(query, k)
        return self._ids[rows].tolist(), scores

    def search_batch(
        self, queries: npt.ArrayLike, k: int | None = None
    ) -> tuple[list[list[str]], np.ndarray]:
        """Top k of each query over all shards: (list of id lists, (q, k) float32 scores, NaN-padded)."""
        row_lists, scores = self.search_batch_rows(queries, k)
        return [self._ids[rows].tolist() for rows in row_lists], scores

    def search_rows(self, query: npt.ArrayLike, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`search`, answering with global row numbers (row i is ids[i]) instead of ids."""
        k = check_k(self.manifest.search_defaults["k"] if k is None else k, self.max_k, self._label)
        return self._search_prepared(self.prepare_query(query), k)

    def search_batch_rows(
        self, queries: npt.ArrayLike, k: int | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """`search_batch`, answering with q arrays of global row numbers instead of id lists."""
        k = check_k(self.manifest.search_defaults["k"] if k is None else k, self.max_k, self._label)
        return self.search_prepared_rows(self.prepare_queries(queries), k)

    def search_prepared_rows(
        self, queries: np.ndarray, k: int | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """`search_batch_rows` of queries in the index's space (`prepare_queries`, stored rows);
        k may be max_k + 1, as for `neighbours_of_row`."""
        limit = None if self.max_k is None else self.max_k + 1
        k = check_k(self.manifest.search_defaults["k"] if k is None else k, limit, self._label)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        parts = [shard._search_batch_prepared(queries, k) for shard in self.shards]
        q = len(queries)
        width = min(k, self.n)
        out_rows, out_scores = [], np.full((q, width), np.nan, dtype=np.float32)
        higher = self.distance != "squared_l2"
        for row in range(q):
            rows, scores = _merge_rows(
                [p[0][row] + offset for p, offset in zip(parts, self.offsets)],
                [p[1][row] for p in parts],
                width,
                higher,
            )
            out_rows.append(rows)
            out_scores[row, : len(rows)] = scores
        return out_rows, out_scores

    def neighbours_of_row(self, row: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours (global rows, scores) of the indexed vector at global `row`; k
        may be max_k + 1 (see `retrieval.index.Index.neighbours_of_row`)."""
        vectors = self.stored_vectors()
        if vectors is None:
            raise ConfigError(f"{self._label} stores no vectors, so it cannot search by row")
        limit = None if self.max_k is None else self.max_k + 1
        k = check_k(self.manifest.search_defaults["k"] if k is None else k, limit, self._label)
        return self._search_prepared(np.array(vectors[row], dtype=np.float32), k)  # stored rows are ready

    def _search_prepared(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each shard's top k of a query checked once (`retrieval.queries`), merged."""
        parts = [shard._search_prepared(query, k) for shard in self.shards]
        return _merge_rows(
            [rows + offset for (rows, _), offset in zip(parts, self.offsets)],
            [scores for _, scores in parts],
            k,
            self.distance != "squared_l2",
        )

    @property
    def _label(self) -> str:
        name = (self.manifest.embedder or {}).get("name")
        return "the index" if not isinstance(name, str) else f"the index of embedder {name!r}"


class _ShardVectors:
    """Row lookup across the shards' stored vectors (global row = shard offset + row)."""

    def __init__(self, arrays: Sequence[StoredVectors]) -> None:
        self._arrays = arrays
        self._offsets = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, row: int) -> np.ndarray:
        shard = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return self._arrays[shard][row - self._offsets[shard]]


def _merge_rows(
    row_parts: Sequence[np.ndarray], score_parts: Sequence[npt.ArrayLike], k: int, higher_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of per-shard (rows, scores) parts as two arrays; NaN scores (ScaNN's padding)
    are dropped, and ties keep shard order."""
    rows = np.concatenate(row_parts)
    scores = np.concatenate(
        [np.asarray(s, dtype=np.float32)[: len(r)] for r, s in zip(row_parts, score_parts)]
    )
    order = np.flatnonzero(~np.isnan(scores))
    key = -scores[order] if higher_is_better else scores[order]
    order = order[np.argsort(key, kind="stable")[:k]]
    return rows[order], scores[order]


def open_index(path: str | os.PathLike[str], verify: bool = True) -> Index | ShardedIndex:
    """Load an index directory of either layout: retrieval.index.Index or ShardedIndex.

    For a sharded index every shard listed in its manifest must be present, have the
    manifest.json recorded there (SHA-256) and hold the recorded number of rows; each shard
    is then loaded (and, with verify, checksummed) by retrieval.index.load_index.
    """
    from retrieval.index import load_index

    path = Path(path)
    if manifest_kind(path) != KIND:
        return load_index(path, verify=verify)
    source = path / mf.MANIFEST_NAME
    manifest = ShardedManifest.from_dict(json.loads(source.read_text(encoding="utf-8")), source)
    shards, directories = [], []
    for number, entry in enumerate(manifest.shards):
        expected_dir = shard_name(number, manifest.num_shards)
        if entry["dir"] != expected_dir:
            raise IndexFormatError(
                f"{source}: shard {number} is recorded as {entry['dir']!r}, expected "
                f"{expected_dir!r}. Rebuild the index."
            )
        directory = path / expected_dir
        try:
            actual = atomic_files.sha256_file(directory / mf.MANIFEST_NAME)
        except FileNotFoundError as e:
            raise IndexFormatError(
                f"{path}: shard {number} of {manifest.num_shards} ({directory}) is missing "
                "or incomplete; refusing to serve a partial index. Rebuild the index."
            ) from e
        if actual != entry["manifest_sha256"]:
            raise IndexFormatError(
                f"{path}: shard {number} ({directory}) was replaced or modified after the "
                "sharded index was written (its manifest.json does not match). Rebuild the index."
            )
        shard = load_index(directory, verify=verify)
        if (shard.n, shard.d, shard.distance) != (entry["n"], manifest.d, manifest.distance):
            raise IndexFormatError(
                f"{path}: shard {number} holds n={shard.n} d={shard.d} {shard.distance}, the sharded manifest "
                f"says n={entry['n']} d={manifest.d} {manifest.distance}. Rebuild the index."
            )
        shards.append(shard)
        directories.append(directory)
    max_k = manifest.search_defaults.get("max_k")
    if max_k is not None and (isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1):
        raise IndexFormatError(
            f"{source}: search_defaults.max_k is {max_k!r}, not an integer >= 1. Rebuild the index."
        )
    if sum(s.n for s in shards) != manifest.n:
        raise IndexFormatError(
            f"{path}: the shards hold {sum(s.n for s in shards)} rows, the manifest says "
            f"n={manifest.n}. Rebuild the index."
        )
    return ShardedIndex(shards, manifest, directories)
