"""`ModelCache`: the image models of the served run's embedders, for image queries.

A model is loaded on first use (TensorFlow is imported then, never for vector or id
queries) and kept while the served run uses it.  It must have the weights the index was
built with (the spec's fingerprint); a failed load is remembered for
MODEL_FAILURE_TTL_SECONDS.  After a refresh, `forget_unused` drops the models (and failures)
that the new run does not use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from retrieval.errors import ConfigError, HandleError, QueryError
from serving.run_state import EmbedderState

if TYPE_CHECKING:
    from retrieval.embedders import EmbedderSpec

log = logging.getLogger(__name__)

# A failed model load (e.g. fingerprint mismatch) is remembered this long, so a burst of
# image queries does not re-hash the model directory each time.
MODEL_FAILURE_TTL_SECONDS = 60.0

ModelKey = tuple[str | None, str | None]  # (handle, fingerprint)


class ModelCache:
    """Thread-safe.  handles: {embedder name: handle} overriding the recorded handles;
    cache_dir: cache for builtin models; served: the embedders of the run served now;
    clock: the monotonic clock that times the failure TTL."""

    def __init__(
        self,
        handles: Mapping[str, str] | None,
        cache_dir: str | None,
        served: Callable[[], Iterable[EmbedderState]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self._handles = dict(handles or {})
        self._cache_dir = cache_dir
        self._served = served
        self._clock = clock
        self._models: dict[ModelKey, Any] = {}
        self._failures: dict[ModelKey, tuple[float, HandleError]] = {}
        self._lock = threading.Lock()

    def handle(self, emb: EmbedderState) -> Any:
        """The handle image queries of `emb` load (an override, else the recorded one)."""
        spec = emb.spec or {}
        return self._handles.get(emb.name, spec.get("handle"))

    def is_loaded(self, emb: EmbedderState) -> bool:
        return self._key(emb) in self._models

    def spec_for(self, emb: EmbedderState) -> EmbedderSpec:
        """The spec image queries of `emb` embed with; QueryError when it records no model, or
        pixels this code does not make (an index from another imgindex's preprocessing)."""
        from retrieval.embedders import EmbedderSpec

        spec = dict(emb.spec or {})
        if emb.name in self._handles:
            spec["handle"] = self._handles[emb.name]
        if not spec.get("handle") or not spec.get("fingerprint"):
            raise QueryError(
                f"embedder {emb.name!r} has no recorded model (handle and "
                "fingerprint), so image queries are unavailable; query by vector",
                code="image_queries_unavailable",
            )
        try:
            checked = EmbedderSpec.from_dict(spec)
            checked.check_pixels()
        except ConfigError as exc:
            raise QueryError(
                f"image queries are unavailable: {exc}", code="image_queries_unavailable"
            ) from None
        return checked

    def _key(self, emb: EmbedderState) -> ModelKey:
        """(handle, fingerprint) under which the model of `emb` is cached (as in `model`);
        None for a value that is not a string (such an embedder has no usable model)."""
        handle, fingerprint = self.handle(emb), (emb.spec or {}).get("fingerprint")
        return (
            handle if isinstance(handle, str) else None,
            fingerprint if isinstance(fingerprint, str) else None,
        )

    def forget_unused(self) -> None:
        """Drop the cached models (and remembered failures) that no embedder of the served
        run uses, e.g. last night's model after a run built with new weights is swapped in.
        A query still running on the old run keeps its own reference to its model."""
        with self._lock:
            used = {self._key(emb) for emb in self._served()}
            for cache in (self._models, self._failures):
                for key in [key for key in cache if key not in used]:
                    del cache[key]

    def model(self, spec: EmbedderSpec) -> Any:
        """The loaded model of `spec`; HandleError when it cannot be loaded or has other
        weights than `spec.fingerprint`."""
        key = (spec.handle, spec.fingerprint)
        model = self._models.get(key)
        if model is not None:
            return model
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                return model
            failed = self._failures.get(key)
            if failed and self._clock() - failed[0] < MODEL_FAILURE_TTL_SECONDS:
                raise failed[1]
            from retrieval import embedders

            try:
                model, resolved = embedders.load(spec.handle, cache_dir=self._cache_dir)
                if resolved.fingerprint != spec.fingerprint:
                    raise HandleError(
                        f"embedder {spec.name!r}: handle {spec.handle!r} resolves to weights with "
                        f"fingerprint {resolved.fingerprint}, but the index was built with other "
                        f"weights (fingerprint {spec.fingerprint}); refusing to embed queries "
                        "with a different model. Point the handle at the model the run was "
                        "built with (Searcher.open(handles={...}))"
                    )
            except HandleError as exc:
                self._failures[key] = (self._clock(), exc)
                raise
            # Cached only while the served run uses it: a query that started on a run swapped
            # out meanwhile gets its model without keeping it for the server's lifetime.
            if key in {self._key(emb) for emb in self._served()}:
                self._models[key] = model
            self._failures.pop(key, None)
            log.info("loaded embedder %s (%s)", spec.name, spec.handle)
            return model
