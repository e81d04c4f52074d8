"""Decode once, resize per embedder, with decoding overlapped with inference.

Pillow releases the GIL while it decodes and resizes and TensorFlow does while it runs the
model, so a small thread pool here keeps decoding the next images while the model (fused
downstream in the same bundle) works on the current batch.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from pipelines import progress
from pipelines.shards import Record
from retrieval import imaging
from retrieval import schema as S
from retrieval.embedders import EmbedderSpec

FAILURES = "failures"
NAMESPACE = "imgindex"


@dataclasses.dataclass(frozen=True)
class RowInfo:
    """The non-pixel fields of one embedding-table row.

    It is the key RunInference carries beside each image (KeyedModelHandler), so it must
    pickle, as a frozen dataclass defined at module level does.
    """

    id: str
    source: str
    sha256: str
    width: int
    height: int
    metadata: dict  # passthrough column name -> value (None for a null)


class Decoded(NamedTuple):
    info: RowInfo  # of the record decoded (its id, source, size)
    pixels: dict  # embedder name -> uint8 [size, size, 3] ([2, size, size, 3] for two views)
    request: Any = None  # the pipelines.content.EmbedRequest it answers


class ResizePlan(NamedTuple):
    """Which (size, mode) arrays to make, and which embedder uses which."""

    targets: tuple  # ((size, imaging.Preprocessing), ...) distinct
    by_embedder: dict  # name -> (size, imaging.Preprocessing)
    min_size: int  # draft JPEGs down to no less than this on both sides

    @classmethod
    def of(cls, specs: list[EmbedderSpec]) -> ResizePlan:
        by_embedder = {s.name: (s.input_size, s.resizing()) for s in specs}
        return cls(tuple(sorted(set(by_embedder.values()))), by_embedder, max(s.input_size for s in specs))


def decode_record(record: Record, plan: ResizePlan, max_pixels: int) -> Decoded | S.Failure:
    """A Decoded element, or a Failure saying why the record cannot be used."""
    try:
        image = imaging.decode(record.data, min_size=plan.min_size, max_pixels=max_pixels)
    except Exception as exc:  # ImageDecodeError, or whatever else Pillow raises on hostile input
        return S.Failure.of(record.source, "decode", exc, id=record.id)
    try:
        arrays = {target: imaging.resize(image.image, *target) for target in plan.targets}
    except Exception as exc:
        return S.Failure.of(record.source, "preprocess", exc, id=record.id)
    info = RowInfo(
        id=record.id,
        source=record.source,
        sha256=imaging.sha256_hex(record.data),
        width=image.width,
        height=image.height,
        metadata=record.metadata,
    )
    return Decoded(info, {name: arrays[target] for name, target in plan.by_embedder.items()})


def decode_request(item: tuple[Record, Any], plan: ResizePlan, max_pixels: int) -> list[Decoded | S.Failure]:
    """(Record, EmbedRequest) -> [Decoded carrying the request], or a Failure for each row of
    the request (each id with that content) when the record cannot be used."""
    record, request = item
    result = decode_record(record, plan, max_pixels)
    if isinstance(result, Decoded):
        return [result._replace(request=request)]
    if not request.embedders:
        return []  # a verification sample: its rows keep their reused vectors
    return [dataclasses.replace(result, id=row.id, source=row.source) for row in request.rows]


class DecodeDoFn(beam.DoFn):
    """(Record, EmbedRequest) -> Decoded (main) or a Failure per row (tagged `failures`).

    With threads > 0, up to `max_pending` records are decoded ahead in a thread pool and
    emitted in input order.
    """

    def __init__(self, plan: ResizePlan, *, max_pixels: int, threads: int, max_pending: int) -> None:
        self._plan = plan
        self._max_pixels = max_pixels
        self._threads = threads
        self._max_pending = max(1, max_pending)
        self._decoded = beam.metrics.Metrics.counter(NAMESPACE, "decoded")
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque[Future[list[Decoded | S.Failure]]] = collections.deque()

    def setup(self) -> None:
        if self._threads > 0:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="imgindex-decode")

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self) -> None:
        self._pending = collections.deque()

    def process(self, item: tuple[Record, Any]) -> Iterator[Decoded | beam.pvalue.TaggedOutput]:
        if self._pool is None:
            yield from self._output(decode_request(item, self._plan, self._max_pixels))
            return
        self._pending.append(self._pool.submit(decode_request, item, self._plan, self._max_pixels))
        while self._pending and (len(self._pending) > self._max_pending or self._pending[0].done()):
            yield from self._output(self._pending.popleft().result())

    def finish_bundle(self) -> Iterator[WindowedValue | beam.pvalue.TaggedOutput]:
        while self._pending:
            for out in self._output(self._pending.popleft().result()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
                else:
                    yield GlobalWindows.windowed_value(out)

    def _output(self, results: list[Decoded | S.Failure]) -> Iterator[Decoded | beam.pvalue.TaggedOutput]:
        for result in results:
            if isinstance(result, Decoded):
                self._decoded.inc()
                yield result
            else:
                yield tag_failure(result)


# error_type of `read` failures of records that were read (pipelines.content): the progress
# display counts them as done.
_READ_THEN_DROPPED = ("DuplicateId", "ChangedDuringRun")


def tag_failure(failure: S.Failure) -> beam.pvalue.TaggedOutput:
    """Counts a failure (Beam counter `failed.<stage>.<error_type>`, and the progress display's
    counts) and tags it for the failures table."""
    beam.metrics.Metrics.counter(NAMESPACE, f"failed.{failure.stage}.{failure.error_type}").inc()
    progress.count("failed")
    if failure.stage in ("decode", "preprocess") or failure.error_type in _READ_THEN_DROPPED:
        progress.count("dropped")
    return beam.pvalue.TaggedOutput(FAILURES, failure)
