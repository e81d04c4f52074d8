"""The state a `Searcher` serves: one loaded run (`RunState`) with its embedders
(`EmbedderState`), loaded from a run directory by `load_run`.

A RunState is immutable: a query reads the searcher's current one once and runs entirely
against it, while a refresh builds the next one and swaps it in.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from retrieval import run_status, runs
from retrieval.errors import IndexFormatError
from retrieval.manifest import utc_now
from retrieval.searchable import SearchableIndex
from serving.errors import UnknownEmbedderError
from serving.id_lookup import IdLookup
from serving.metadata import MetadataColumns


@dataclasses.dataclass(frozen=True)
class EmbedderState:
    name: str
    entry: runs.EmbedderEntry  # the run manifest's record of this embedder
    spec: Mapping[str, Any] | None  # EmbedderSpec dict
    index: SearchableIndex
    index_dir: str
    row_of: IdLookup  # id -> row, for id queries
    metadata: MetadataColumns | None  # the index's metadata without "id", rows aligned with ids
    vectors: Any  # the index's stored vectors by row (normalised for cosine), or None

    @property
    def input_dim(self) -> int:
        """Dimension of query vectors: the embedder's, before any build-time projection."""
        return self.index.input_dim


@dataclasses.dataclass(frozen=True)
class RunState:
    run_id: str
    run_dir: str
    created_at: str | None
    status: str
    embedders: Mapping[str, EmbedderState]
    loaded_at: str
    load_seconds: float


def load_run(run_dir: str, only: str | None, verify: bool, allow_unpublished: bool) -> RunState:
    """Load the run at `run_dir` (every embedder, or `only` that one)."""
    start = time.perf_counter()
    manifest = runs.read_run_manifest(run_dir)
    status, _ = run_status.effective_status(run_dir, manifest)  # "publishing" and named by LATEST: published
    if status != runs.PUBLISHED and not allow_unpublished:
        raise IndexFormatError(
            f"run {manifest.run_id} ({run_dir}) has status {status!r}, not 'published'"
            f"{': ' + manifest.error if manifest.error else ''}; serve a published run or pass "
            "allow_unpublished=True to inspect it"
        )
    if not manifest.embedders:
        raise IndexFormatError(f"run {manifest.run_id} ({run_dir}) has no embedders to serve")
    names = sorted(manifest.embedders)
    if only is not None:
        if only not in manifest.embedders:
            raise UnknownEmbedderError(
                f"run {manifest.run_id} has no embedder {only!r}; available: {', '.join(names)}"
            )
        names = [only]
    loaded = {name: load_embedder(run_dir, name, manifest.embedders[name], verify) for name in names}
    return RunState(
        run_id=manifest.run_id,
        run_dir=str(run_dir),
        created_at=manifest.created_at,
        status=status,
        embedders=types.MappingProxyType(loaded),
        loaded_at=utc_now(),
        load_seconds=round(time.perf_counter() - start, 3),
    )


def load_embedder(run_dir: str, name: str, entry: runs.EmbedderEntry, verify: bool) -> EmbedderState:
    """Open the index of embedder `name` (`retrieval.runs.open_index`) and what queries need."""
    index = runs.open_index(run_dir, name, entry, verify=verify)
    spec = entry.spec or index.embedder
    index_spec = index.embedder or {}
    if not isinstance(spec, (dict, type(None))) or not isinstance(index_spec, dict):
        raise IndexFormatError(f"embedder {name!r}: the recorded embedder spec is not an object")
    if spec and index_spec and spec.get("fingerprint") != index_spec.get("fingerprint"):
        raise IndexFormatError(
            f"index of embedder {name!r}: its manifest names embedder fingerprint "
            f"{index_spec.get('fingerprint')!r} but the run manifest says "
            f"{spec.get('fingerprint')!r}; the run is inconsistent"
        )
    table = index.metadata()
    return EmbedderState(
        name=name,
        entry=entry,
        spec=types.MappingProxyType(dict(spec)) if spec else None,
        index=index,
        index_dir=os.path.join(run_dir, entry.index),
        row_of=IdLookup(np.asarray(index.ids, dtype=object)),
        metadata=None if table is None else MetadataColumns(table),
        vectors=index.stored_vectors(),
    )


def check_run_exists(root: str, run_dir: str) -> None:
    """Refuse a run directory that LATEST names but that does not exist."""
    if not os.path.isdir(run_dir):
        raise IndexFormatError(
            f"{root}/{runs.LATEST} names run {os.path.basename(run_dir.rstrip('/'))} "
            f"({run_dir}), which does not exist: it was deleted, or is not copied yet (a sync "
            f"that copies {runs.LATEST} before the run); restore or finish copying the run "
            f"directory, or point {runs.LATEST} at an existing run (`retrieval.run_status.publish`)"
        )


def same_dir(a: str, b: str) -> bool:
    """Whether two paths name one directory (by inode when both exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
