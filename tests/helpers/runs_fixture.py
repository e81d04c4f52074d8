"""Writes published-run layouts directly (what `imgindex build` produces), for serving tests.

root/LATEST -> runs/<run_id>
root/runs/<run_id>/run_manifest.json
root/runs/<run_id>/index/<embedder>/{scann/, ids.parquet, metadata.parquet, manifest.json}
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa

from retrieval import run_status, runs
from retrieval.index import METADATA_FILE, IndexConfig, build_index

PREPROCESSING = "float32 RGB in [0, 1], shape [batch, height, width, 3] (TF Hub image convention)"


@dataclasses.dataclass
class EmbedderData:
    vectors: np.ndarray
    ids: list[str]
    spec: dict
    distance: str = "cosine"
    config: IndexConfig | None = None
    metadata: pa.Table | None = None  # default: made by `default_metadata`; False: none
    # The fixtures' indexes serve up to the HTTP maximum, as the serving tests ask large k.
    serve_max_k: int = 1000
    dba: object = None  # a retrieval.dba.DatabaseAugmentation, or None


def clustered(n, d, seed=0, n_clusters=20):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    return (centres[labels] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def default_metadata(ids, seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "sha256": pa.array([hashlib.sha256(i.encode()).hexdigest() for i in ids], pa.string()),
            "source": pa.array([f"file:///shards/part-0.tfrecord#{r}" for r in range(n)], pa.string()),
            "width": pa.array(rng.integers(32, 4000, n), pa.int32()),
            "height": pa.array(rng.integers(32, 4000, n), pa.int32()),
            "label": pa.array(rng.integers(0, 10, n), pa.int64()),
            "caption": pa.array([f"caption of {i}" for i in ids], pa.string()),
        }
    )


def fake_spec(name, d, handle="/nonexistent/savedmodel", fingerprint=None):
    return {
        "name": name,
        "handle": handle,
        "fingerprint": fingerprint or "sha256-tree:" + hashlib.sha256(name.encode()).hexdigest(),
        "dim": d,
        "input_size": 32,
        "resize": "pad",
        "normalisation": "l2",
        "preprocessing": PREPROCESSING,
    }


def vector_embedder(name, n, d, seed=0, distance="cosine", config=None):
    ids = [f"{name}-{i:05d}" for i in range(n)]
    return EmbedderData(clustered(n, d, seed), ids, fake_spec(name, d), distance, config)


def write_run(root, embedders: dict[str, EmbedderData], run_id=None, status="published", publish=True) -> str:
    """Builds every index, writes the run manifest and (when published) points LATEST at it."""
    run_id = run_id or runs.new_run_id()
    directory = runs.run_dir(str(root), run_id)
    entries = {}
    for name, data in embedders.items():
        index = build_index(
            data.vectors,
            data.ids,
            distance=data.distance,
            config=data.config,
            embedder=data.spec,
            num_queries=min(100, len(data.ids)),
            serve_max_k=data.serve_max_k,
            dba=data.dba,
        )
        if data.metadata is False:
            tables = {}
        else:
            metadata = data.metadata if data.metadata is not None else default_metadata(data.ids)
            tables = {METADATA_FILE: metadata}
        index.save(runs.index_dir(directory, name), tables=tables)
        entries[name] = runs.embedder_entry(directory, name, index, data.spec)
    manifest = runs.RunManifest(
        run_id=run_id,
        status=status,
        inputs={"globs": ["test"]},
        counts={name: len(data.ids) for name, data in embedders.items()},
        embedders=entries,
        gates={"passed": status == "published", "reasons": []},
        timings={},
    )
    runs.write_run_manifest(directory, manifest)
    if publish and status == "published":
        run_status.publish(str(root), run_id)
    return directory


def colour_images(n, seed=0, size=(40, 30)):
    """n distinct PNG images (random colour and texture), as {id: encoded bytes}."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        base = rng.uniform(0, 255, 3)
        noise = rng.uniform(2, 60, 3)
        pixels = np.clip(base + rng.standard_normal((size[1], size[0], 3)) * noise, 0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
        out[f"img-{i:03d}"] = buf.getvalue()
    return out


def image_embedder(savedmodel, images, name="tiny", size=32, options=""):
    """EmbedderData with real embeddings of `images` ({id: bytes}) by a SavedModel handle,
    made the way the pipeline does (decode, resize, embed_batch); `options` are more
    `--embedder` options (",resize=pad").  Imports TensorFlow."""
    from retrieval import embedders, imaging

    model, spec = embedders.complete_spec(
        embedders.parse_embedder_arg(f"{name}={savedmodel},size={size}{options}")
    )
    spec = dataclasses.replace(spec, decode_size=size, pixels=imaging.pixels_rule(spec.resizing()))
    ids = list(images)
    decoded = [imaging.decode(images[i], min_size=spec.input_size) for i in ids]
    pixels = np.stack([imaging.resize(d.image, spec.input_size, spec.resizing()) for d in decoded])
    vectors = embedders.embed_batch(model, spec, pixels)
    metadata = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "sha256": pa.array([imaging.sha256_hex(images[i]) for i in ids], pa.string()),
            "source": pa.array([f"file:///images/{i}.png" for i in ids], pa.string()),
            "width": pa.array([d.width for d in decoded], pa.int32()),
            "height": pa.array([d.height for d in decoded], pa.int32()),
        }
    )
    return EmbedderData(vectors, ids, spec.to_dict(), "cosine", None, metadata)
