"""Which previous tables a run reuses vectors from, decided on the driver before any work.

`--reuse_from` names them: `latest` (the run the output root's LATEST names; `imgindex
build`'s default), `none`, or a path on any Beam filesystem: a run directory, its
`embeddings/` directory, or one embedder's table directory.  Each of today's embedders
reuses the previous table whose embedder spec has the same `reuse_identity()` (weights and
every preprocessing choice; a table of the same name is preferred), so a changed model or
preprocessing re-embeds that embedder only.

Damaged previous tables: a table whose files cannot be listed, whose Parquet footers cannot
be read, or whose files disagree on the embedder is not reused: that embedder is embedded in
full, and the report says why (`reuse.embedders.<name>.status`).  A data page found damaged
later, while the vectors are copied, fails the run instead (`pipelines.fetch.ReuseError`):
it cannot be told from the footers.

Verification: a random sample of the reused contents (`--verify_reuse_fraction`, at least
MIN_VERIFY_ROWS per embedder) is embedded again; a cosine below 1 - VERIFY_TOLERANCE between
the reused and today's vector fails the run (`check_verification`): the runtime changed in a
way the fingerprint does not cover (another TensorFlow, another CPU code path).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.fetch import CHECKS_SCHEMA, ReuseError

__all__ = ["ReuseError", "ReusePlan", "PreviousTable", "plan_reuse", "check_verification"]
from retrieval import runs, storage
from retrieval import schema as S
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError

log = logging.getLogger(__name__)

CHECKS_DIR = "reuse_checks"
# One minus the lowest cosine accepted between a reused vector and today's embedding of the
# same bytes.  Within one runtime they differ by float32 rounding only (batch composition,
# thread count): 1 - cosine <= 3e-13 measured (BENCHMARKS.md); this leaves a wide margin
# and still refuses any change of the model's arithmetic beyond rounding.
VERIFY_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class PreviousTable:
    """One previous embedding table that an embedder of today reuses."""

    directory: str
    files: tuple[str, ...]
    rows: int
    spec: EmbedderSpec  # as the table records it


@dataclasses.dataclass(frozen=True)
class ReusePlan:
    """source: what --reuse_from resolved to (None: no reuse); tables: today's embedder ->
    the previous table it reuses; status: today's embedder -> why it reuses or not."""

    source: str | None
    tables: dict[str, PreviousTable]
    status: dict[str, str]
    verify_fraction: float
    salt: str  # makes each run's verification sample a new random one

    def to_report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "verify_fraction": self.verify_fraction,
            "verify_tolerance": VERIFY_TOLERANCE,
            "embedders": {
                name: {
                    "status": status,
                    "table": self.tables[name].directory if name in self.tables else None,
                    "previous_rows": self.tables[name].rows if name in self.tables else None,
                }
                for name, status in self.status.items()
            },
        }


def plan_reuse(
    reuse_from: str | None,
    specs: list[EmbedderSpec],
    *,
    root: str | None,
    verify_fraction: float,
    salt: str,
) -> ReusePlan:
    """Resolves --reuse_from and matches today's embedders to previous tables.

    ConfigError for a value that cannot be used at all (a path that does not exist or holds
    no embedding tables; `latest` without an output root); damaged tables only lose reuse.
    """
    if not 0 <= verify_fraction <= 1:
        raise ConfigError(f"--verify_reuse_fraction must be in [0, 1], got {verify_fraction}")
    value = reuse_from or "none"
    if value == "none":
        return ReusePlan(None, {}, {s.name: "off (--reuse_from none)" for s in specs}, verify_fraction, salt)
    if value == "latest":
        if root is None:
            raise ConfigError(
                "--reuse_from latest needs an output root with LATEST (imgindex build); "
                "for imgindex embed pass a run directory or embedding tables, or none"
            )
        source = runs.read_latest(root)  # a local or an object-store root (retrieval.runs)
        if source is None:
            status = {s.name: f"off: nothing is published under {root} yet" for s in specs}
            return ReusePlan(None, {}, status, verify_fraction, salt)
    else:
        source = value.rstrip("/")
        # On an object store a directory is a prefix: it exists when objects lie under it.
        if not (storage.exists_any(source) if storage.is_remote(source) else FileSystems.exists(source)):
            raise ConfigError(
                f"--reuse_from {value!r} does not exist; give a run directory, embedding tables, "
                "latest or none"
            )
    candidates = _candidates(source)
    if not candidates:
        raise ConfigError(
            f"--reuse_from {value!r} holds no embedding tables (looked for {source}/embeddings/*/*.parquet, "
            f"{source}/*/*.parquet and {source}/*.parquet); give a run directory, embedding tables, "
            "latest or none"
        )
    tables, damaged = {}, {}
    for directory, files in sorted(candidates.items()):
        try:
            tables[directory] = _read_table(directory, files)
        except (OSError, ValueError, pa.ArrowException) as exc:  # ConfigError is a ValueError
            damaged[directory] = f"{type(exc).__name__}: {exc}"
            log.warning("reuse: previous table %s is damaged and is not reused: %s", directory, exc)
    chosen, status = {}, {}
    for spec in specs:
        same = [t for t in tables.values() if t.spec.reuse_identity() == spec.reuse_identity()]
        same.sort(key=lambda t: (t.spec.name != spec.name, t.directory))
        if same:
            chosen[spec.name] = same[0]
            status[spec.name] = "reused"
            continue
        own = [d for d in damaged if posixpath.basename(d) == spec.name]
        other_prep = [t for t in tables.values() if t.spec.fingerprint == spec.fingerprint]
        if own:
            status[spec.name] = (
                f"embedded in full: the previous table {own[0]} is damaged ({damaged[own[0]]})"
            )
        elif other_prep:
            status[spec.name] = (
                f"embedded in full: the previous table {other_prep[0].directory} has the same "
                "weights but other preprocessing, whose vectors must not be mixed with these "
                f"({other_prep[0].spec.preprocessing_summary()}; now {spec.preprocessing_summary()})"
            )
        else:
            status[spec.name] = (
                "embedded in full: no previous table has the same weights and preprocessing "
                f"(found: {', '.join(sorted(t.spec.name for t in tables.values())) or 'none readable'})"
            )
    return ReusePlan(source, chosen, status, verify_fraction, salt)


def _candidates(source: str) -> dict[str, list[str]]:
    """Parquet files of the table directories under `source`, by directory."""
    for pattern in (
        f"{source}/{runs.EMBEDDINGS_DIR}/*/*.parquet",
        f"{source}/*.parquet",
        f"{source}/*/*.parquet",
    ):
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:  # Beam raises its own errors for unreachable stores
            raise ConfigError(f"--reuse_from {source!r} cannot be listed: {exc}") from exc
        by_directory: dict[str, list[str]] = defaultdict(list)
        for metadata in matched:
            by_directory[posixpath.dirname(metadata.path)].append(metadata.path)
        if by_directory:
            return {d: sorted(files) for d, files in by_directory.items()}
    return {}


def _read_table(directory: str, files: list[str]) -> PreviousTable:
    """The table's spec and row count from its footers; ValueError when files disagree."""
    spec, rows = None, 0
    for path in files:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            file_spec = S.embedder_of(parquet.schema_arrow)
            rows += parquet.metadata.num_rows
        if spec is None:
            spec = file_spec
        elif file_spec.reuse_identity() != spec.reuse_identity():
            raise ValueError(f"{path} was made by another embedder than {files[0]}")
    assert spec is not None  # files is never empty
    return PreviousTable(directory, tuple(files), rows, spec)


def check_verification(output: str, plan: ReusePlan) -> dict[str, dict[str, Any]]:
    """Reads the verification rows the run wrote; per embedder: checked, worst cosine.

    Raises ReuseError when a reused vector differs from today's embedding of the same bytes
    by more than VERIFY_TOLERANCE, or when a sampled content could not be embedded."""
    summary = {name: {"checked": 0, "worst_cosine": None} for name in plan.tables}
    matched = FileSystems.match([f"{output}/{CHECKS_DIR}/*.parquet"])[0].metadata_list
    worst: dict[str, tuple[float, str]] = {}
    for metadata in matched:
        with FileSystems.open(metadata.path) as handle:
            table = pq.read_table(handle, schema=CHECKS_SCHEMA)
        for row in table.to_pylist():
            name, cosine = row["embedder"], row["cosine"]
            summary[name]["checked"] += 1
            if cosine is None:
                raise ReuseError(
                    f"embedder {name!r}: the verification sample's content {row[S.SHA256]} could not be "
                    "embedded again, so the reused vectors are unchecked; see the failures table"
                )
            if name not in worst or cosine < worst[name][0]:
                worst[name] = (cosine, row[S.SHA256])
    for name, (cosine, sha) in worst.items():
        summary[name]["worst_cosine"] = cosine
        if cosine < 1 - VERIFY_TOLERANCE:
            raise ReuseError(
                f"embedder {name!r}: a reused vector differs from today's embedding of the same image "
                f"(sha256 {sha}): cosine {cosine:.9f}, below the tolerance 1 - {VERIFY_TOLERANCE:g}. "
                "Today's runtime (TensorFlow, CPU code path) makes other vectors than the run that "
                "wrote the previous table; rebuild with --reuse_from none"
            )
    return summary
