"""A tree-AH ScaNN searcher built into ScaNN's own on-disk asset format, chunk by chunk.

Why: ScaNN's in-memory builder (`scann.builder(x, ...).build()`) copies the whole matrix
into its own dataset, computes the AH residual of every row, and `serialize()` makes one
more copy while writing `dataset.npy`, so the index stage peaks at several times the float32
matrix (BENCHMARKS.md).  Here no process step holds more than one copy:

1. `write_dataset`: the vectors are cast to float32, checked, L2-normalised for cosine and
   written to `dataset.npy` in row chunks (the input may itself be a memory map).
2. `train`: the partitioner and AH codebooks are trained by ScaNN's builder on a row
   sample only (the builder samples the same number of rows from the full matrix anyway).
3. `hash_rows`: every row is tokenized and AH-encoded by ScaNN itself: a searcher without
   reordering (it keeps codes, not float rows) is loaded from the trained assets, the rows
   are upserted into it chunk by chunk, and its serialisation gives `datapoint_to_token.npy`
   and `hashed_dataset.npy`.  A row's token and code depend only on that row and the
   trained assets, so they are byte-identical to ScaNN's own build
   (tests/test_scann_assets.py checks this); the training sample's rows, which step 2's
   build has encoded already, are taken from it rather than encoded twice.
4. `finish`: the asset list and the final config (trained config + exact reordering) are
   written; `load_searcher(directory)` then loads it like any serialized searcher.

`build_tree_ah` runs these steps for an `IndexConfig` in a build's `AssetsDirectory`.
The asset names and types are the ones ScaNN 1.4's `serialize()` writes and
`load_searcher()` reads (scann_assets.pbtxt).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.exact import check_finite, normalize_rows
from retrieval.npy_stream import CHUNK_ROWS, NpyWriter, chunk_bounds, open_read, release_pages
from retrieval.scann_import import ScannSearcher, import_scann_pybind

if TYPE_CHECKING:
    from scann.proto.scann_pb2 import ScannConfig

    from retrieval.index.config import IndexConfig

Probe = TypeVar("Probe")
# A ScaNN pybind builder (`scann_ops_pybind.builder(...)`), which ships without type information.
Builder = Any

ASSETS_FILE = "scann_assets.pbtxt"
CONFIG_FILE = "scann_config.pb"
DATASET = ("DATASET_NPY", "dataset.npy")
PARTITIONER = ("PARTITIONER", "serialized_partitioner.pb")
AH_CENTERS = ("AH_CENTERS", "ah_codebook.pb")
TOKENIZATION = ("TOKENIZATION_NPY", "datapoint_to_token.npy")
AH_DATASET = ("AH_DATASET_NPY", "hashed_dataset.npy")
# The training sample's tokens and codes, kept by `train` for `hash_rows`.
SAMPLE_HASHES = {TOKENIZATION[1]: "sample-datapoint_to_token.npy", AH_DATASET[1]: "sample-hashed_dataset.npy"}


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed arenas otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_dataset(
    vectors: np.ndarray,
    path: str | os.PathLike[str],
    *,
    normalize: bool,
    what: str = "vectors",
    chunk_rows: int = CHUNK_ROWS,
) -> np.ndarray:
    """Write `vectors` (n, d) as a float32 .npy at `path`, checked and optionally L2-normalised
    chunk by chunk; returns the file as a read-only memory map.

    Raises ConfigError naming the first row holding NaN/inf (or, with normalize, a zero row).
    """
    n, d = vectors.shape
    with NpyWriter(path, (n, d), np.float32) as out:
        for start, stop in chunk_bounds(n, chunk_rows):
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, reported just below
                chunk = np.array(vectors[start:stop], dtype=np.float32, order="C")
            release_pages(vectors)
            check_finite(chunk, what, row_offset=start)
            if normalize:
                chunk = normalize_rows(chunk, what=what, in_place=True, row_offset=start)
            out.append(chunk)
    return open_read(path)


def sample_indices(n: int, size: int, *, seed: int) -> np.ndarray:
    """`size` distinct row numbers of range(n) chosen with `seed`, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def sample_rows(x: np.ndarray, rows: np.ndarray, *, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """The rows of `x` numbered by the sorted array `rows`, gathered chunk by chunk."""
    out = np.empty((len(rows), x.shape[1]), np.float32)
    for start, stop in chunk_bounds(x.shape[0], chunk_rows):
        lo, hi = np.searchsorted(rows, [start, stop])
        out[lo:hi] = x[rows[lo:hi]]
        release_pages(x)
    return out


def train(
    sample: np.ndarray,
    directory: str | os.PathLike[str],
    *,
    scann_distance: str,
    k: int,
    configure: Callable[[Builder], Builder],
) -> ScannConfig:
    """Train partitioner and AH codebooks on `sample`; write them and the trained config.

    configure(builder) adds the tree and score_ah stanzas (no reordering) to a ScaNN builder.
    The sample's own tokens and codes are kept too (SAMPLE_HASHES), so that `hash_rows` need
    not encode those rows again.  Returns the trained ScannConfig message.
    """
    scann = import_scann_pybind()
    directory = Path(directory)
    trained = directory / ".trained"
    trained.mkdir()
    searcher = configure(scann.builder(sample, k, scann_distance)).build()
    searcher.serialize(str(trained), relative_path=True)
    del searcher
    trim_heap()
    for _, name in (PARTITIONER, AH_CENTERS):
        os.replace(trained / name, directory / name)
    for name, kept in SAMPLE_HASHES.items():
        os.replace(trained / name, directory / kept)
    config = read_config(trained / CONFIG_FILE)
    shutil.rmtree(trained)
    return config


def hash_rows(
    trained_config: ScannConfig,
    directory: str | os.PathLike[str],
    *,
    sample: np.ndarray | None = None,
    chunk_rows: int = CHUNK_ROWS,
    threads: int | None = None,
) -> None:
    """Tokenize and AH-encode every row of directory/dataset.npy with the trained assets in
    `directory`, writing datapoint_to_token.npy and hashed_dataset.npy there.

    A searcher without reordering (so it keeps no float rows) is loaded from the trained
    assets and the first row to encode, the other rows are upserted chunk by chunk on
    `threads` threads (default: the available cores), and serialising it writes their tokens
    and codes.  `sample`, the sorted row numbers `train` was given, takes those rows' tokens
    and codes from the files `train` kept instead: ScaNN's build already encoded them, the
    same way (tests/test_scann_assets.py checks the bytes).  Serialising briefly holds a
    buffer per leaf.
    """
    directory = Path(directory)
    x = open_read(directory / DATASET[1])
    n = x.shape[0]
    sample = np.empty(0, np.int64) if sample is None else np.asarray(sample, np.int64)
    rest = np.ones(n, bool)
    rest[sample] = False
    encoded = directory / ".hash-out"
    try:
        encoded.mkdir()
        if rest.any():
            _encode_rows(x, rest, trained_config, directory, encoded, chunk_rows=chunk_rows, threads=threads)
        for name, kept in SAMPLE_HASHES.items():
            if len(sample) == 0:
                os.replace(encoded / name, directory / name)
            elif not rest.any():
                os.replace(directory / kept, directory / name)
            else:
                _interleave(encoded / name, directory / kept, rest, directory / name, chunk_rows=chunk_rows)
        for _, name in (TOKENIZATION, AH_DATASET):
            rows = np.load(directory / name, mmap_mode="r").shape[0]
            if rows != n:
                raise RuntimeError(f"ScaNN wrote {rows} rows of {name} for {n} vectors")
    finally:
        shutil.rmtree(encoded, ignore_errors=True)
        for kept in SAMPLE_HASHES.values():
            (directory / kept).unlink(missing_ok=True)


def _encode_rows(
    x: np.ndarray,
    selected: np.ndarray,
    trained_config: ScannConfig,
    directory: Path,
    out: Path,
    *,
    chunk_rows: int,
    threads: int | None,
) -> None:
    """Tokens and codes of the rows of `x` where `selected` is true, in row order, written to
    `out` by serialising a ScaNN searcher seeded with the first of them."""
    scann = import_scann_pybind()
    first = int(np.argmax(selected))
    seed = directory / ".hash-seed"
    try:
        seed.mkdir()
        for _, name in (PARTITIONER, AH_CENTERS):
            os.link(directory / name, seed / name)
        np.save(seed / DATASET[1], np.asarray(x[first : first + 1]))
        write_assets(seed, trained_config, [AH_CENTERS, PARTITIONER, DATASET])
        searcher = scann.load_searcher(str(seed), assets_backcompat_shim=False).searcher
        searcher.set_num_threads(threads or _available_cores())
        for start, stop in chunk_bounds(x.shape[0] - first - 1, chunk_rows):
            start, stop = start + first + 1, stop + first + 1
            chunk = x[start:stop][selected[start:stop]]  # boolean indexing copies the rows
            release_pages(x)
            if len(chunk):
                searcher.upsert([None] * len(chunk), list(chunk), _UPSERT_BATCH)
        expected = int(np.count_nonzero(selected))
        if searcher.size() != expected:
            raise RuntimeError(f"ScaNN holds {searcher.size()} rows after upserting {expected}")
        searcher.serialize(str(out), True)
        del searcher
        trim_heap()  # the serialisation's per-leaf buffers
    finally:
        shutil.rmtree(seed, ignore_errors=True)


def _interleave(
    encoded_path: Path, sample_path: Path, rest: np.ndarray, path: Path, *, chunk_rows: int
) -> None:
    """Write `path` with the rows of encoded_path where `rest` is true and those of
    sample_path elsewhere, both in row order."""
    encoded, sampled = open_read(encoded_path), open_read(sample_path)
    n = len(rest)
    if encoded.shape[0] + sampled.shape[0] != n or encoded.dtype != sampled.dtype:
        raise RuntimeError(
            f"{path.name}: {encoded.shape[0]} encoded rows and {sampled.shape[0]} sample rows "
            f"do not make up {n}"
        )
    taken = 0
    with NpyWriter(path, (n,) + encoded.shape[1:], encoded.dtype) as out:
        for start, stop in chunk_bounds(n, chunk_rows):
            mask = rest[start:stop]
            count = int(np.count_nonzero(mask))
            chunk = np.empty((stop - start,) + encoded.shape[1:], encoded.dtype)
            chunk[mask] = encoded[taken : taken + count]
            chunk[~mask] = sampled[start - taken : stop - taken - count]
            taken += count
            out.append(chunk)
            release_pages(encoded)
            release_pages(sampled)


_UPSERT_BATCH = 256


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def finish(
    trained_config: ScannConfig, reorder_config: ScannConfig | None, directory: str | os.PathLike[str]
) -> None:
    """Write the final config (trained + exact reordering) and the full asset list."""
    config = type(trained_config)()
    config.CopyFrom(trained_config)
    if reorder_config is not None:
        config.exact_reordering.CopyFrom(reorder_config.exact_reordering)
    write_assets(directory, config, [AH_CENTERS, PARTITIONER, TOKENIZATION, AH_DATASET, DATASET])


def reorder_stanza(builder_config_text: str) -> ScannConfig:
    """The ScannConfig parsed from a builder's create_config() text (for its exact_reordering)."""
    from google.protobuf import text_format
    from scann.proto import scann_pb2

    return text_format.Parse(builder_config_text, scann_pb2.ScannConfig())


def write_assets(
    directory: str | os.PathLike[str], config: ScannConfig, assets: Sequence[tuple[str, str]]
) -> list[str]:
    """Write `config` and the asset list naming `assets` ((type, file name) pairs, each
    present in `directory`); returns the file names listed."""
    directory = Path(directory)
    (directory / CONFIG_FILE).write_bytes(config.SerializeToString())
    entries = [CONFIG_FILE]
    with open(directory / ASSETS_FILE, "w") as f:
        for kind, name in assets:
            if not (directory / name).is_file():
                raise RuntimeError(f"ScaNN asset {name} missing from {directory}")
            f.write(f'assets {{\n  asset_type: {kind}\n  asset_path: "{name}"\n}}\n')
            entries.append(name)
    return entries


def read_config(path: str | os.PathLike[str]) -> ScannConfig:
    """The ScannConfig message serialised at `path` (scann_config.pb)."""
    from scann.proto import scann_pb2

    config = scann_pb2.ScannConfig()
    config.ParseFromString(Path(path).read_bytes())
    return config


def load_searcher(scann_dir: str | os.PathLike[str]) -> ScannSearcher:
    """The ScaNN searcher serialised in `scann_dir`; IndexFormatError when ScaNN cannot load it."""
    scann = import_scann_pybind()
    try:
        # Without the shim, ScaNN never writes into the index directory.
        searcher: ScannSearcher = scann.load_searcher(str(scann_dir), assets_backcompat_shim=False)
    except (RuntimeError, ValueError) as e:
        raise IndexFormatError(f"ScaNN could not load {scann_dir}: {e}. Rebuild the index.") from e
    return searcher


def build_tree_ah(
    vectors: np.ndarray,
    directory: Path,
    *,
    config: IndexConfig,
    scann_distance: str,
    normalize: bool,
    k: int,
    seed: int,
    make_probe: Callable[[np.ndarray], Probe],
    trained: tuple[Path, ScannConfig] | None = None,
) -> tuple[ScannSearcher, Probe]:
    """A tree-AH searcher for `config` made through its assets in `directory`, and
    `make_probe(x)` of the rows as written to dataset.npy (x memory-maps them).

    The probe's exact search streams over the dataset file before the searcher loads it,
    so the two never hold the matrix at the same time.  `seed` picks the training sample.
    trained: (a previous index's scann/ directory, its config without exact reordering):
    its partitioner and AH codebooks are used as they are, and every row is only encoded
    (`retrieval.index.training`); `config` must be the one they were trained with.
    """
    scann = import_scann_pybind()
    x = write_dataset(vectors, directory / DATASET[1], normalize=normalize)
    d = x.shape[1]

    def configure(builder: Builder) -> Builder:
        threshold = config.anisotropic_quantization_threshold
        return builder.tree(
            num_leaves=config.num_leaves,
            num_leaves_to_search=config.leaves_to_search,
            training_sample_size=config.training_sample_size,
            random_init=not config.deterministic_training,
        ).score_ah(
            config.dims_per_block,
            anisotropic_quantization_threshold=float("nan") if threshold is None else threshold,
            training_sample_size=config.training_sample_size,
        )

    if trained is None:
        # The rows ScaNN's own builder would sample for training; seeded so builds repeat.
        assert config.training_sample_size is not None  # a validated tree-AH config has one
        rows = sample_indices(x.shape[0], config.training_sample_size, seed=seed)
        sample = sample_rows(x, rows)
        trained_config = train(sample, directory, scann_distance=scann_distance, k=k, configure=configure)
        del sample
        hash_rows(trained_config, directory, sample=rows)
    else:
        previous, trained_config = trained
        for _, name in (PARTITIONER, AH_CENTERS):
            link_or_copy(previous / name, directory / name)
        hash_rows(trained_config, directory)
    reorder = configure(scann.builder(np.zeros((1, d), np.float32), k, scann_distance))
    reorder = reorder.reorder(config.pre_reorder_num_neighbors).create_config()
    finish(trained_config, reorder_stanza(reorder), directory)
    probe = make_probe(x)
    release_pages(x)
    del x
    trim_heap()  # the freed training and probe buffers
    return load_searcher(directory), probe


class AssetsDirectory:
    """A build's ScaNN assets: a temporary directory removed when its Index goes away."""

    def __init__(self, work_dir: str | os.PathLike[str] | None) -> None:
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=work_dir, prefix=".imgindex-build-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def remove(self) -> None:
        self._finalizer()

    def copy_to(self, directory: Path) -> None:
        """Hard-link (or, across filesystems, copy) the assets into `directory`."""
        for path in sorted(self.path.iterdir()):
            if not path.name.startswith("."):
                link_or_copy(path, directory / path.name)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` as `target`, or copy it where hard links are impossible."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or no hard links there
        shutil.copyfile(source, target)
