"""RunInference adapter for TF Hub image embedders (one ModelHandler, any handle).

Beam's RunInference supplies batching (BatchElements), one shared model per process
(or per machine with `share_model_across_processes`), inference metrics and the
dead-letter output; this handler only loads a handle and embeds a batch.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference import base as _run_inference
from apache_beam.ml.inference.base import ModelHandler

from retrieval import embedders, killpoints
from retrieval.embedders import EmbedderSpec
from retrieval.errors import HandleError

# Beam 2.77 imports `resource` in the same try block as a torch-only module, so without torch
# it loses RunInference's memory metrics and warns on every model load.  Give it back.
if _run_inference.resource is None:
    _run_inference.resource = resource


class TFHubImageEmbedder(ModelHandler[np.ndarray, np.ndarray, Any]):
    """uint8 [size, size, 3] images in, float32 [dim] embeddings out, per `EmbedderSpec`.

    The spec must be complete (fingerprint and dim known on the driver); a worker that
    resolves the handle to different weights refuses to run rather than mix embeddings.
    """

    def __init__(
        self,
        spec: EmbedderSpec,
        *,
        batch_size: int = 32,
        cache_dir: str | None = None,
        share_across_processes: bool = False,
        intra_op_threads: int = 0,
    ) -> None:
        super().__init__()
        if not spec.fingerprint or spec.dim <= 0:
            raise ValueError(f"embedder spec {spec.name!r} is incomplete: {spec}")
        self._spec = spec
        self._batch_size = batch_size
        self._cache_dir = cache_dir
        self._share = share_across_processes
        self._intra_op_threads = intra_op_threads

    def load_model(self) -> embedders.EmbeddingModel:
        import tensorflow as tf

        if self._intra_op_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self._intra_op_threads)
            except RuntimeError:  # TF already initialised in this process; keep its setting
                pass
        model, resolved = embedders.load(self._spec.handle, cache_dir=self._cache_dir)
        if resolved.fingerprint != self._spec.fingerprint:
            raise HandleError(
                f"embedder {self._spec.name!r}: {self._spec.handle} resolves to weights with "
                f"fingerprint {resolved.fingerprint} on this worker, but the run was planned with "
                f"{self._spec.fingerprint}; refusing to mix embeddings from different weights"
            )
        return model

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: embedders.EmbeddingModel,
        inference_args: dict | None = None,
    ) -> Iterable[np.ndarray]:
        killpoints.reached("embedding")  # a test hook, inert unless set
        vectors = embedders.embed_batch(model, self._spec, np.stack(batch))
        if vectors.shape != (len(batch), self._spec.dim):
            raise ValueError(
                f"embedder {self._spec.name!r} returned shape {vectors.shape} for "
                f"{len(batch)} images, expected (n, {self._spec.dim})"
            )
        return list(vectors)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(a.nbytes for a in batch)

    def get_metrics_namespace(self) -> str:
        return f"imgindex.embed.{self._spec.name}"

    def batch_elements_kwargs(self) -> dict[str, int]:
        # A fixed batch: the model's CPU throughput rises steeply with the batch size, and
        # adaptive batching would start with batches of 1.
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._share
