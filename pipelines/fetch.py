"""Previous tables read row group by row group; reused vectors copied from them and checked.

`PreviousRowGroupsDoFn` and `PreviousKeysDoFn` read the previous tables' ids and sha256s one
Parquet row group at a time, so that each content is known by its place: (file, row group).
`FetchDoFn` gets, per (embedder, file, row group), the contents whose vectors that row group
holds, reads it and writes each vector into the rows of every id with that content, with
today's id, source and metadata.  Vectors are never shuffled, and no worker holds more than
one row group of a previous table, or more requests than one row group answers.

`CompareDoFn` meets, per (embedder, content) of the verification sample, the reused vector
and the one today's model made from the same bytes, and yields their cosine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.content import VERIFY, FetchRequest
from pipelines.decode import NAMESPACE, RowInfo
from retrieval import schema as S
from retrieval import storage
from retrieval.errors import ImgIndexError

# Objects are opened per record on every worker: one boto3 client per process, not per open.
storage.share_s3_clients()


def rows_tag(embedder: str) -> str:
    """The tag of the reused rows of one embedder."""
    return f"rows:{embedder}"


class ReuseError(ImgIndexError):
    """The previous tables cannot give what the run planned to reuse, or gave other vectors
    than today's model makes: the run fails (LATEST is left alone)."""


def _damaged(path: str, exc: BaseException) -> ReuseError:
    return ReuseError(
        f"previous table {path} cannot be read ({type(exc).__name__}: {exc}); it is damaged: "
        "rerun the build with --reuse_from none to embed everything again"
    )


class PreviousRowGroupsDoFn(beam.DoFn):
    """A previous table's file -> (file, row group number) for each of its row groups."""

    def process(self, path: str) -> Iterator[tuple[str, int]]:
        try:
            with FileSystems.open(path) as handle:
                groups = pq.ParquetFile(handle).num_row_groups
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise _damaged(path, exc) from exc
        for group in range(groups):
            yield path, group


class PreviousKeysDoFn(beam.DoFn):
    """(file, row group) -> (sha256, (file, row group)) for each content it holds (main), and
    (id, None) for each of its ids (tagged IDS)."""

    def process(self, where: tuple[str, int]) -> Iterator[tuple[str, object] | beam.pvalue.TaggedOutput]:
        path, group = where
        try:
            with FileSystems.open(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(group, columns=[S.ID, S.SHA256])
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise _damaged(path, exc) from exc
        for sha in set(table.column(S.SHA256).to_pylist()):
            yield sha, (path, group)
        for item_id in table.column(S.ID).to_pylist():
            yield beam.pvalue.TaggedOutput(IDS, (item_id, None))


IDS = "ids"


class FetchDoFn(beam.DoFn):
    """((embedder, file, row group), [FetchRequest]) -> (RowInfo, vector) per row (tagged
    rows_tag(embedder)), and ((embedder, sha256), vector) for the verification sample (tagged
    VERIFY)."""

    def __init__(self, dims: dict[str, int]) -> None:
        self._dims = dims

    def process(
        self, grouped: tuple[tuple[str, str, int], Iterable[FetchRequest]]
    ) -> Iterator[beam.pvalue.TaggedOutput]:
        (embedder, path, group), requests = grouped
        wanted = {request.sha256: request for request in requests}
        asked = len(wanted)
        try:
            yield from self._copy(embedder, path, group, wanted)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise _damaged(path, exc) from exc
        if wanted:
            raise ReuseError(
                f"previous table {path} (row group {group}) no longer holds {len(wanted)} of the {asked} "
                f"contents the run planned to copy from it (e.g. sha256 {next(iter(wanted))}): it changed "
                "while the run read it; rerun the build (with --reuse_from none if it persists)"
            )
        beam.metrics.Metrics.counter(NAMESPACE, f"reused_content.{embedder}").inc(asked)

    def _copy(
        self, embedder: str, path: str, group: int, wanted: dict[str, FetchRequest]
    ) -> Iterator[beam.pvalue.TaggedOutput]:
        dim = self._dims[embedder]
        columns = [S.SHA256, S.WIDTH, S.HEIGHT, S.EMBEDDING]
        with FileSystems.open(path) as handle:
            table = pq.ParquetFile(handle).read_row_group(group, columns=columns)
        value_set = pa.array(list(wanted), pa.string())
        hits = np.flatnonzero(pc.is_in(table.column(S.SHA256), value_set=value_set).to_numpy(False))
        picked = table.take(pa.array(hits, pa.int64()))
        vectors = picked.column(S.EMBEDDING).combine_chunks().flatten().to_numpy(False).reshape(-1, dim)
        for at, (sha, width, height) in enumerate(
            zip(*(picked.column(c).to_pylist() for c in (S.SHA256, S.WIDTH, S.HEIGHT)))
        ):
            request = wanted.pop(sha, None)
            if request is None:
                continue  # a content the row group holds more than once
            vector = np.array(vectors[at], dtype=np.float32)
            for row in request.rows:
                info = RowInfo(row.id, row.source, sha, width, height, row.metadata)
                yield beam.pvalue.TaggedOutput(rows_tag(embedder), (info, vector))
            if request.verify:
                yield beam.pvalue.TaggedOutput(VERIFY, ((embedder, sha), vector))


class CompareDoFn(beam.DoFn):
    """((embedder, sha256), {"previous": [vector], "today": [vector]}) -> a verification row
    (embedder, sha256, cosine); a content of the sample that today's model could not embed
    has cosine None."""

    def process(self, grouped: tuple[tuple[str, str], dict]) -> Iterator[dict]:
        (embedder, sha), vectors = grouped
        previous, today = list(vectors["previous"]), list(vectors["today"])
        for reused in previous[:1]:  # every sampled content has one previous vector
            cosine = None
            if today:
                a, b = reused.astype(np.float64), today[0].astype(np.float64)
                norms = float(np.linalg.norm(a) * np.linalg.norm(b))
                cosine = float(a @ b / norms) if norms > 0 else (1.0 if not a.any() and not b.any() else 0.0)
            beam.metrics.Metrics.counter(NAMESPACE, f"verified.{embedder}").inc()
            yield {"embedder": embedder, "sha256": sha, "cosine": cosine}


CHECKS_SCHEMA = pa.schema(
    [
        pa.field("embedder", pa.string(), nullable=False),
        pa.field(S.SHA256, pa.string(), nullable=False),
        pa.field("cosine", pa.float64()),
    ]
)
