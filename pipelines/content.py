"""Records by content: read and hash, refuse duplicate ids, route each distinct content.

The embedding pipeline first reads every shard without decoding anything: each record
becomes a `Seen` (its id, source, metadata and the sha256 of its bytes; the bytes are
dropped).  Then, with Beam's keyed joins (so no worker holds more than one key's records):

- by id: the first record of an id in input order is kept; every later one is a `read`
  failure naming both sources (and the ids of the previous tables that are gone are counted);
- by content (sha256): the ids sharing one content are embedded once, and for each
  embedder the content's vector is either reused from the previous run's table (a
  `Candidate`, later a `FetchRequest` to its row group of that table) or embedded (an `EmbedRequest`,
  which re-reads the record's bytes from its shard).

A random sample of the reused contents is embedded again to check that today's runtime
still gives the vectors it reuses (`pipelines.reuse`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from pipelines import progress
from pipelines.decode import NAMESPACE, RowInfo, tag_failure
from pipelines.shards import CorruptShard, ReaderConfig, Record, Shard, Skipped, Untrusted, read_shard
from retrieval import imaging, killpoints
from retrieval import schema as S

# Tags of the routed outputs, of today's records in the keyed joins, and of the vectors
# handed to the verification.
REUSE, EMBED, TODAY, VERIFY = "reuse", "embed", "today", "verify:"
# error_type of the `read` failures of records that were read: a later record of an id, a
# record whose shard changed between the two reads of the run.
DUPLICATE_ID, CHANGED = "DuplicateId", "ChangedDuringRun"


def previous_tag(embedder: str) -> str:
    """The tag of one embedder's previous table in the keyed joins."""
    return f"previous:{embedder}"


@dataclasses.dataclass(frozen=True)
class Seen:
    """A record read and hashed: everything of it but its bytes."""

    id: str
    source: str
    sha256: str
    metadata: dict
    shard: Shard  # where to read the bytes again
    order: tuple[int, int]  # (the shard's number in the input list, the record's in the shard)


@dataclasses.dataclass(frozen=True)
class EmbedRequest:
    """Decode and embed one content (the record at `source` in shard `shard`).

    rows: every id with this content, in input order: each gets a row with the vector.
    embedders: the embedders whose tables take the vector; verify: the embedders whose reused
    vector of this content is checked against today's embedding (the rows are not written).
    """

    sha256: str
    source: str
    shard: Shard
    rows: tuple[Seen, ...]
    embedders: tuple[str, ...]
    verify: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A content whose vector for `embedder` is in a previous table at `location`
    (file, row group)."""

    embedder: str
    location: tuple[str, int]
    sha256: str
    rows: tuple[Seen, ...]
    draw: float  # uniform in [0, 1) per (run, embedder, content): picks the verification sample


@dataclasses.dataclass(frozen=True)
class FetchRequest:
    """Copy the vector of `sha256` from a previous table's file into the rows of `rows`."""

    sha256: str
    rows: tuple[Seen, ...]
    verify: bool  # also hand the previous vector to the verification


class ReadHashDoFn(beam.DoFn):
    """(shard number, Shard) -> Seen per record (main), Failure per unreadable part (tagged).

    A shard's records are held (as Seens, without their bytes) until the reader is done with
    it: when a gzip shard fails its integrity check at the end (`Untrusted`), each of them
    becomes a `read` failure (CorruptShard) instead.  Tar members that are no records
    (`Skipped`) are counted (`skipped_members.<kind>`)."""

    def __init__(self, config: ReaderConfig) -> None:
        self._config = config
        self._read = beam.metrics.Metrics.counter(NAMESPACE, "read")

    def process(self, numbered: tuple[int, Shard]) -> Iterator[Seen | beam.pvalue.TaggedOutput]:
        number, shard = numbered
        held: list[Seen] = []
        untrusted = None
        for item in read_shard(shard, self._config):
            if isinstance(item, Record):
                killpoints.reached("reading")  # a test hook, inert unless set
                held.append(
                    Seen(
                        id=item.id,
                        source=item.source,
                        sha256=imaging.sha256_hex(item.data),
                        metadata=item.metadata,
                        shard=shard,
                        order=(number, len(held)),
                    )
                )
            elif isinstance(item, Skipped):
                beam.metrics.Metrics.counter(NAMESPACE, f"skipped_members.{item.kind}").inc()
            elif isinstance(item, Untrusted):
                untrusted = item
            else:
                yield tag_failure(item)
        if untrusted is not None:
            error = CorruptShard(
                f"{shard.path} fails its gzip integrity check ({untrusted.reason}): the damage can "
                "be anywhere in what was read, so none of its records is used; fetch the shard again"
            )
            for seen in held:
                yield tag_failure(S.Failure.of(seen.source, "read", error, id=seen.id))
            progress.count("shards")
            return
        self._read.inc(len(held))
        progress.count("shards")
        progress.count("read", len(held))
        yield from held


class KeepFirstIdDoFn(beam.DoFn):
    """(id, {TODAY: [Seen], previous_tag(embedder): [None per previous row]}) -> the first Seen in input order
    (main); every later record of the id -> a `read` Failure naming both sources (tagged).

    An id that only the previous tables hold was deleted since: counted per embedder."""

    def __init__(self, previous_tables: Iterable[str]) -> None:
        self._previous = tuple(previous_tables)
        self._duplicates = beam.metrics.Metrics.counter(NAMESPACE, "duplicate_ids")

    def process(self, grouped: tuple[str, dict]) -> Iterator[Seen | beam.pvalue.TaggedOutput]:
        item_id, groups = grouped
        records = sorted(groups[TODAY], key=lambda s: s.order)
        if not records:  # an id only the previous tables hold: deleted since
            for name in self._previous:
                if groups.get(previous_tag(name)):
                    beam.metrics.Metrics.counter(NAMESPACE, f"deleted.{name}").inc()
        else:
            yield records[0]
        for later in records[1:]:
            kept = records[0]
            self._duplicates.inc()
            message = (
                f"duplicate id {item_id!r}: the record at {kept.source} has it already (kept), "
                f"so this one at {later.source} was not embedded"
            )
            failure = S.Failure.of(later.source, "read", message, id=item_id)
            yield tag_failure(dataclasses.replace(failure, error_type=DUPLICATE_ID))


class RouteDoFn(beam.DoFn):
    """(sha256, {TODAY: [Seen], previous_tag(embedder): [(file, row group)]}) -> per embedder, a Candidate
    when a previous table holds the content (tagged REUSE), else the content goes into one
    EmbedRequest for every embedder that needs it (tagged EMBED, keyed by shard)."""

    def __init__(self, embedders: Iterable[str], reusable: Iterable[str], salt: str) -> None:
        self._embedders = tuple(embedders)
        self._reusable = frozenset(reusable)
        self._salt = salt
        self._duplicate_content = beam.metrics.Metrics.counter(NAMESPACE, "duplicate_content")

    def process(self, grouped: tuple[str, dict]) -> Iterator[beam.pvalue.TaggedOutput]:
        sha, groups = grouped
        rows = tuple(sorted(groups[TODAY], key=lambda s: s.order))
        self._duplicate_content.inc(max(0, len(rows) - 1))
        needed = []
        # A content only the previous tables hold (no rows) gives nothing.
        for name in self._embedders if rows else ():
            locations = groups.get(previous_tag(name)) if name in self._reusable else None
            if locations:
                yield beam.pvalue.TaggedOutput(
                    REUSE, Candidate(name, min(locations), sha, rows, draw(self._salt, name, sha))
                )
            else:
                needed.append(name)
        if needed:
            first = rows[0]
            request = EmbedRequest(sha, first.source, first.shard, rows, tuple(needed))
            yield beam.pvalue.TaggedOutput(EMBED, (first.shard.path, request))


def draw(salt: str, embedder: str, sha: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, embedder, content)."""
    digest = hashlib.blake2b(f"{salt}\0{embedder}\0{sha}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class DecideReuseDoFn(beam.DoFn):
    """Candidate -> ((embedder, file, row group), FetchRequest) (main), plus, for the verification sample,
    (shard, EmbedRequest) with `verify` (tagged EMBED).

    The sample: every candidate whose draw is below `fraction`, and the `minimum` lowest draws
    of each embedder (side input `lowest`: embedder -> [(draw, sha256)])."""

    def __init__(self, fraction: float) -> None:
        self._fraction = fraction
        self._lowest: tuple[int, dict[str, set]] = (0, {})

    def process(
        self, candidate: Candidate, lowest: dict[str, list[tuple[float, str]]]
    ) -> Iterator[tuple[tuple[str, str, int], FetchRequest] | beam.pvalue.TaggedOutput]:
        beam.metrics.Metrics.counter(NAMESPACE, f"reused.{candidate.embedder}").inc(len(candidate.rows))
        progress.count(f"rows.{candidate.embedder}", len(candidate.rows))
        progress.count(f"reused.{candidate.embedder}", len(candidate.rows))
        if self._lowest[0] != id(lowest):  # the same side input for the whole bundle
            self._lowest = (id(lowest), {name: set(map(tuple, draws)) for name, draws in lowest.items()})
        sample = self._lowest[1].get(candidate.embedder, set())
        verify = candidate.draw < self._fraction or (candidate.draw, candidate.sha256) in sample
        path, group = candidate.location
        yield (candidate.embedder, path, group), FetchRequest(candidate.sha256, candidate.rows, verify)
        if verify:
            first = candidate.rows[0]
            request = EmbedRequest(
                candidate.sha256, first.source, first.shard, candidate.rows[:1], (), (candidate.embedder,)
            )
            yield beam.pvalue.TaggedOutput(EMBED, (first.shard.path, request))


class RereadDoFn(beam.DoFn):
    """(shard path, [EmbedRequest]) -> (Record, EmbedRequest) for each request, its bytes read
    again from the shard; a request whose record is gone or changed since the first read gives
    a `read` Failure for each of its rows (tagged)."""

    def __init__(self, config: ReaderConfig) -> None:
        self._config = config

    def process(
        self, grouped: tuple[str, Iterable[EmbedRequest]]
    ) -> Iterator[tuple[Record, EmbedRequest] | beam.pvalue.TaggedOutput]:
        _, requests = grouped
        wanted: dict[str, list[EmbedRequest]] = {}
        for request in requests:
            wanted.setdefault(request.source, []).append(request)
        shard = next(iter(wanted.values()))[0].shard  # a group is never empty
        for item in read_shard(shard, self._config):
            if not wanted:
                break  # everything asked for is read: the rest of the shard is not needed
            if not isinstance(item, Record) or item.source not in wanted:
                continue  # failures were reported by the first read
            found = wanted.pop(item.source)
            sha = imaging.sha256_hex(item.data)
            for request in found:
                if sha == request.sha256:
                    yield item, request
                else:
                    yield from _lost(
                        request,
                        f"{item.source} changed while the run read it (sha256 {sha} "
                        f"now, {request.sha256} before); rerun the build",
                    )
        for found in wanted.values():
            for request in found:
                yield from _lost(
                    request,
                    f"{request.source} is no longer in {shard.path} (the shard "
                    "changed while the run read it); rerun the build",
                )


def _lost(request: EmbedRequest, message: str) -> Iterator[beam.pvalue.TaggedOutput]:
    if not request.embedders:
        beam.metrics.Metrics.counter(NAMESPACE, "verify_unread").inc()
        return  # a verification sample: its rows are reused, nothing fails
    for row in request.rows:
        failure = S.Failure.of(row.source, "read", message, id=row.id)
        yield tag_failure(dataclasses.replace(failure, error_type=CHANGED))


class EmbedKey(NamedTuple):
    """What RunInference carries beside each image: the content's request (every row waiting
    for its vector) and the decoded image's upright size."""

    request: EmbedRequest
    width: int
    height: int


class FanOutDoFn(beam.DoFn):
    """(EmbedKey, vector) -> (RowInfo, vector) for every id with that content (main), and
    ((embedder, sha256), vector) when the content is in the verification sample (tagged VERIFY)."""

    def __init__(self, embedder: str) -> None:
        self._embedder = embedder
        self._rows = beam.metrics.Metrics.counter(NAMESPACE, f"embedded.{embedder}")
        self._contents = beam.metrics.Metrics.counter(NAMESPACE, f"embedded_content.{embedder}")

    def process(
        self, keyed: tuple[EmbedKey, np.ndarray]
    ) -> Iterator[tuple[RowInfo, np.ndarray] | beam.pvalue.TaggedOutput]:
        key, vector = keyed
        request = key.request
        if self._embedder in request.embedders:
            self._contents.inc()
            progress.count(f"rows.{self._embedder}", len(request.rows))
            for row in request.rows:
                self._rows.inc()
                info = RowInfo(row.id, row.source, request.sha256, key.width, key.height, row.metadata)
                yield info, vector
        if self._embedder in request.verify:
            yield beam.pvalue.TaggedOutput(VERIFY, ((self._embedder, request.sha256), vector))
