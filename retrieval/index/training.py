"""Reusing a previous index's training: the nightly build's index without k-means every night.

Training the tree-AH partitioner and AH codebooks is most of an index build, and on a night
where almost every row is the same as last night's it learns almost the same thing.  A build
may therefore take the previous index's trained partitioner and codebooks and only encode
today's rows with them (`retrieval.scann_assets.build_tree_ah(trained=...)`), and measure the
previous search knobs at each k of the ladder instead of tuning (a k the previous index was
not tuned at is tuned).  The recall is measured on today's index as always; when the previous
knobs miss the target there (the data drifted from what the training saw), the index is
built again with training and tuning.

A previous index's training is reused only when it can serve today's rows as well as a fresh
one: the same method (tree-AH), distance, dimension and database-side augmentation
(`retrieval.dba`: the same n and alpha, recomputed over all of today's rows; the training
learned augmented rows, or plain ones); today's row count within
N_RATIO_RANGE of the count it was trained on; fewer than MAX_GENERATIONS builds since it was
trained (so the rows it learned from never drift far); and its trained files intact.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from retrieval import atomic_files, scann_assets
from retrieval import manifest as mf
from retrieval.dba import DatabaseAugmentation
from retrieval.errors import ImgIndexError
from retrieval.index.config import SEARCH_KNOBS, IndexConfig
from retrieval.index.files import SCANN_DIR
from retrieval.index.records import RecallAtK, read_per_k

# Retrain at least every this many builds.
MAX_GENERATIONS = 7
# Reuse only while today's rows number within this factor of the rows trained on.
N_RATIO_RANGE = (0.8, 1.25)
_TRAINED_FILES = (scann_assets.PARTITIONER[1], scann_assets.AH_CENTERS[1])


@dataclasses.dataclass(frozen=True)
class PreviousTraining:
    """What a build takes from a previous index to skip training."""

    directory: Path  # the previous index's scann/ directory
    config: IndexConfig  # its index config (the trained num_leaves, dims_per_block, ...)
    scann_config: Any  # its ScannConfig without exact reordering: the trained part
    search_defaults: dict[str, int]  # its tuned knobs at its recall k, tried first by the tuning
    generation: int  # builds since the training, this one included
    trained_n: int  # rows it was trained on
    per_k: tuple[RecallAtK, ...] = ()  # its knobs at each k of its ladder (none before per-k)

    def knobs_by_k(self, k: int) -> dict[int, dict[str, int]]:
        """The knobs to try first at each ladder k, for a build whose recall k is `k`: those it
        was tuned with at that k; at k, its search defaults when it has no entry there (an
        index built before per-k tuning, or with another recall k)."""
        guesses = {entry.k: entry.knobs for entry in self.per_k if entry.knobs}
        guesses.setdefault(k, self.search_defaults)
        return guesses


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """How an index came by its partitioner and codebooks (the manifest's `training`)."""

    reused_from: str | None  # the index directory whose training it reused
    generation: int  # 0: trained by this build
    trained_n: int
    note: str | None = None  # why a given previous training was not reused

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def previous_training(
    index_dir: str | os.PathLike[str],
    *,
    distance: str,
    d: int,
    n: int,
    dba: DatabaseAugmentation | None = None,
) -> tuple[PreviousTraining | None, str]:
    """The training of the index at `index_dir` when a build of n rows of dimension d for
    `distance` (with `dba`, or none) may reuse it; otherwise None and the reason."""
    index_dir = Path(index_dir)
    try:
        manifest = mf.read_manifest(index_dir)
    except ImgIndexError as exc:
        return None, f"not reused: the previous index is unreadable ({exc})"
    config = manifest.index_config
    if config.get("method") != "tree_ah":
        return None, "not reused: the previous index was not tree-AH"
    if (manifest.distance, manifest.d) != (distance, d):
        return (
            None,
            f"not reused: the previous index is {manifest.distance}, d={manifest.d}; this one {distance}, d={d}",
        )
    try:
        previous_dba = DatabaseAugmentation.from_record(manifest.dba)
    except ImgIndexError as exc:
        return None, f"not reused: {exc}"
    if previous_dba != dba:
        return None, f"retrained: the previous index had DBA {_dba(previous_dba)}, this one {_dba(dba)}"
    training = manifest.training or {}
    generation = int(training.get("generation", 0)) + 1
    trained_n = int(training.get("trained_n", manifest.n))
    if generation >= MAX_GENERATIONS:
        return (
            None,
            f"retrained: the previous training was {generation - 1} builds old (retrained every {MAX_GENERATIONS})",
        )
    low, high = N_RATIO_RANGE
    if not low <= n / trained_n <= high:
        return (
            None,
            f"retrained: {n} rows now, {trained_n} when it was trained (reused within {low}x-{high}x)",
        )
    scann_dir = index_dir / SCANN_DIR
    try:
        for name in _TRAINED_FILES:
            expected = manifest.files[f"{SCANN_DIR}/{name}"]["sha256"]
            if atomic_files.sha256_file(scann_dir / name) != expected:
                return None, f"not reused: the previous index's {name} does not match its manifest"
        trained = scann_assets.read_config(scann_dir / scann_assets.CONFIG_FILE)
    except (OSError, KeyError, ValueError) as exc:
        return None, f"not reused: the previous index's trained files cannot be read ({exc})"
    trained.ClearField("exact_reordering")
    fields = {f.name for f in dataclasses.fields(IndexConfig)}
    index_config = IndexConfig(**{key: value for key, value in config.items() if key in fields})
    knobs = {
        name: manifest.search_defaults[name] for name in SEARCH_KNOBS if name in manifest.search_defaults
    }
    try:
        per_k = read_per_k(manifest.recall) or ()
    except ImgIndexError as exc:
        return None, f"not reused: the previous index's recall record is damaged ({exc})"
    return PreviousTraining(scann_dir, index_config, trained, knobs, generation, trained_n, per_k), ""


def _dba(dba: DatabaseAugmentation | None) -> str:
    return "off" if dba is None else f"n={dba.n} alpha={dba.alpha:g}"
