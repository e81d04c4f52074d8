"""What is left of query handling in serving once the index has checked the query
(`retrieval.queries`): which embedder answers, the row of an id, the result, an image query's
vector (the decoded size it may have, decoding, the model), and the recall per k that
`info()` shows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from retrieval.errors import HandleError, QueryError
from serving.errors import BadImageError, EmbedderRequiredError, UnknownEmbedderError, UnknownIdError, shorten
from serving.models import ModelCache
from serving.results import SearchHit, SearchResult
from serving.run_state import EmbedderState, RunState


def pick_embedder(state: RunState, embedder: str | None) -> EmbedderState:
    """The embedder a query names, or the run's only one when it names none."""
    if embedder is None:
        if len(state.embedders) == 1:
            return next(iter(state.embedders.values()))
        raise EmbedderRequiredError(
            f"run {state.run_id} serves several embedders; name one with embedder=...: "
            f"{', '.join(sorted(state.embedders))}"
        )
    emb = state.embedders.get(embedder) if isinstance(embedder, str) else None
    if emb is None:
        raise UnknownEmbedderError(
            f"unknown embedder {shorten(embedder)}; available: {', '.join(sorted(state.embedders))}"
        )
    return emb


def row_of(state: RunState, emb: EmbedderState, item_id: object) -> int:
    """The row of an indexed id whose stored vector is available, for id queries."""
    if not isinstance(item_id, str):
        raise QueryError(f"id must be a string, got {type(item_id).__name__}", code="bad_id")
    row = emb.row_of.get(item_id)
    if row is None:
        raise UnknownIdError(item_id, emb.name, state.run_id)
    if emb.vectors is None:
        raise QueryError(
            f"the index of embedder {emb.name!r} stores no vectors, so id queries are unavailable; "
            "query by vector",
            code="id_queries_unavailable",
        )
    return row


def to_result(state: RunState, emb: EmbedderState, rows: np.ndarray, scores: np.ndarray) -> SearchResult:
    """The hits of index rows and their scores (NaN: no hit), with their ids and metadata."""
    scores = np.asarray(scores, dtype=np.float32)[: len(rows)]
    found = ~np.isnan(scores)
    rows, score_list = rows[found], scores[found].tolist()
    ids = emb.index.ids[rows].tolist()
    if emb.metadata is not None and len(rows):
        metadata = emb.metadata.rows(rows)
    else:
        metadata = [{} for _ in ids]
    hits = [
        SearchHit(rank=rank, id=item_id, score=score, metadata=md)
        for rank, (item_id, score, md) in enumerate(zip(ids, score_list, metadata), 1)
    ]
    return SearchResult(hits, embedder=emb.name, run_id=state.run_id, distance=emb.index.distance)


def checked_decode_size(data: bytes, input_size: int, max_pixels: int) -> int:
    """The `max_pixels` to decode `data` with, after refusing an image that would decode to
    more than `max_pixels` pixels.  Reads the header only: JPEGs decode at the reduced scale
    `retrieval.imaging.decode` asks Pillow for (`Image.draft`), so their declared size may be
    larger (up to the pipeline's bomb guard); other formats decode whole."""
    import io

    from PIL import Image

    from retrieval import imaging

    try:
        with Image.open(io.BytesIO(data)) as probe:
            declared = probe.size
            if probe.format == "JPEG":  # as imaging.decode: Image.draft for JPEG only
                probe.draft("RGB", (input_size, input_size))
            width, height = probe.size
    except Exception:  # not readable: imaging.decode refuses it with its reason
        return max_pixels
    if width * height > max_pixels:
        scaled = f", decoded at {width}x{height}" if (width, height) != declared else ""
        raise imaging.ImageDecodeError(
            f"image of {declared[0]}x{declared[1]} pixels{scaled} is above the query limit of "
            f"{max_pixels} decoded pixels (max_image_pixels)"
        )
    return max(max_pixels, imaging.DEFAULT_MAX_PIXELS) if (width, height) != declared else max_pixels


def recall_per_k(recall: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An index's recall at each k its build measured ({k, value, n_queries}, ascending k): its
    recall.per_k, or for an index built before per-k recall its one measured k."""
    entries = recall.get("per_k")
    if entries is None:
        entries = [recall] if recall.get("value") is not None else []
    return [{key: entry.get(key) for key in ("k", "value", "n_queries")} for entry in entries]


def embed_image(models: ModelCache, emb: EmbedderState, data: bytes, max_image_pixels: int) -> np.ndarray:
    """The vector of an encoded image query, embedded like the indexed images (same decode,
    resize and normalisation) with the run's model (`models`); BadImageError or HandleError."""
    from retrieval import embedders, imaging

    spec = models.spec_for(emb)
    data = bytes(data)
    try:
        max_pixels = checked_decode_size(data, spec.input_size, max_image_pixels)
        decoded = imaging.decode(data, min_size=spec.input_size, max_pixels=max_pixels)
        pixels = imaging.resize(decoded.image, spec.input_size, spec.resizing())
    except imaging.ImageDecodeError as exc:
        raise BadImageError(f"the query image cannot be used: {exc}") from exc
    model = models.model(spec)
    vector = embedders.embed_batch(model, spec, pixels[None])[0]
    if vector.shape != (emb.input_dim,):
        raise HandleError(
            f"embedder {emb.name!r} ({spec.handle}) returned a vector of shape "
            f"{vector.shape}, but the index expects dimension {emb.input_dim}"
        )
    return vector
