"""The run report: counts from Beam metrics and from the written tables, reconciled.

The tables are the source of truth (they are what the next stage reads); Beam metrics add
the number of records read and the failure reasons.  For every embedder the report checks
   records read = embedded + failed before embedding + failed embedding with that embedder
and inputs = records read + records that failed to be read.  Files the input globs matched
but that are no inputs (dot-names, non-image files) and tar members that are no records
(links, directories, dot-names) are not records: they are counted apart, `skipped_files` and
`skipped_members`.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.runners.runner import PipelineResult

from pipelines.content import CHANGED, DUPLICATE_ID
from pipelines.decode import NAMESPACE
from retrieval import storage
from retrieval.version import __version__

if TYPE_CHECKING:  # for annotations only
    from pipelines.plan import Plan

REPORT_NAME = "run_report.json"


def _table_files(directory: str) -> list[str]:
    matched = FileSystems.match([f"{directory}/*.parquet"])[0].metadata_list
    return sorted(m.path for m in matched)


def count_rows(directory: str) -> int:
    total = 0
    for path in _table_files(directory):
        with FileSystems.open(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def failure_counts(directory: str) -> collections.Counter:
    """(stage, embedder or None, error_type) -> rows in the failures table."""
    counts = collections.Counter()
    for path in _table_files(directory):
        with FileSystems.open(path) as f:
            table = pq.read_table(f, columns=["stage", "embedder", "error_type"])
        counts.update(zip(*(table.column(c).to_pylist() for c in ("stage", "embedder", "error_type"))))
    return counts


def _counters(result: PipelineResult) -> dict[str, int]:
    try:
        metrics = result.metrics().query(MetricsFilter())
    except Exception:  # a runner without metrics support: the tables still reconcile
        return {}
    values = collections.Counter()
    for counter in metrics["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[f"{counter.key.metric.namespace}/{counter.key.metric.name}"] += value or 0
    return dict(values)


def make(
    plan: Plan,
    result: PipelineResult,
    *,
    started: float,
    runner: str | None,
    direct_options: DirectOptions,
    verification: dict | None = None,
    error: BaseException | None = None,
) -> dict:
    """The run report.  verification: what `pipelines.reuse.check_verification` found;
    error: why the run fails although its tables are written (a failed verification)."""
    counters = _counters(result)

    def counter(name: str) -> int | None:
        """A Beam counter; 0 when it never counted, None when the runner reports no metrics."""
        return counters.get(f"{NAMESPACE}/{name}", 0) if counters else None

    failures = failure_counts(f"{plan.output}/failures")
    # Records read but dropped before any model: duplicate ids, records that changed during
    # the run, undecodable images.  A `read` failure of another type is a record never read.
    after_read = {DUPLICATE_ID, CHANGED}
    before_embed = sum(
        n for (stage, _, kind), n in failures.items() if stage not in ("embed", "read") or kind in after_read
    )
    read_failed = sum(
        n for (stage, _, kind), n in failures.items() if stage == "read" and kind not in after_read
    )
    read_ok = counter("read")
    by_embedder = {}
    for spec in plan.specs:
        rows = count_rows(f"{plan.output}/embeddings/{spec.name}")
        embed_failed = sum(
            n for (stage, emb, _), n in failures.items() if stage == "embed" and emb == spec.name
        )
        reused = counter(f"reused.{spec.name}")
        embedded = counter(f"embedded.{spec.name}")
        by_embedder[spec.name] = {
            "handle": spec.handle,
            "fingerprint": spec.fingerprint,
            "dim": spec.dim,
            "rows": rows,
            "reused": reused,
            "embedded": embedded,
            "model_inputs": counter(f"embedded_content.{spec.name}"),
            "deleted": counter(f"deleted.{spec.name}") if spec.name in plan.reuse.tables else None,
            "failed_embed": embed_failed,
            "table": f"{plan.output}/embeddings/{spec.name}",
            "reconciled": None
            if read_ok is None or reused is None or embedded is None
            else read_ok == rows + before_embed + embed_failed and rows == reused + embedded,
        }
    reasons = collections.Counter()
    for (stage, emb, error_type), n in failures.items():
        reasons[f"{stage}/{error_type}" + (f" [{emb}]" if emb else "")] += n
    member_prefix = f"{NAMESPACE}/skipped_members."
    skipped_members = {
        name[len(member_prefix) :]: n
        for name, n in sorted(counters.items())
        if name.startswith(member_prefix) and n
    }
    seconds = time.time() - started
    reconciled = all(e["reconciled"] is not False for e in by_embedder.values())
    return {
        "imgindex_version": __version__,
        "status": "failed" if error is not None else "ok" if reconciled else "unreconciled",
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "output": plan.output,
        "inputs": {
            "globs": list(plan.options.input),
            "files": len(plan.shards),
            "formats": dict(collections.Counter(s.format for s in plan.shards)),
            # The first few of each reason, to find them without listing the inputs again.
            "skipped_examples": {reason: paths[:5] for reason, paths in sorted(plan.skipped.items())},
        },
        "runner": runner,
        "direct_running_mode": getattr(direct_options, "direct_running_mode", None),
        "counts": {
            "records": None if read_ok is None else read_ok + read_failed,
            "read": read_ok,
            "failed_read": read_failed,
            "duplicate_ids": sum(n for (_, _, kind), n in failures.items() if kind == DUPLICATE_ID),
            "duplicate_content": counter("duplicate_content"),
            "decoded": counter("decoded"),
            "failed_before_embed": before_embed,
            "failed_total": sum(failures.values()),
            "skipped_files": {reason: len(paths) for reason, paths in sorted(plan.skipped.items())},
            "skipped_members": None if not counters else skipped_members,
        },
        "embedders": by_embedder,
        "reuse": {**plan.reuse.to_report(), "verification": verification},
        "failures_by_reason": dict(sorted(reasons.items())),
        "failures_table": f"{plan.output}/failures",
        "seconds": round(seconds, 2),
        "images_per_second": None if read_ok is None else round(read_ok / seconds, 1),
    }


def write(output: str, report: dict) -> str:
    """Writes run_report.json (temporary name, then rename; on an object store, which has
    no rename, one single-object put, which is atomic there)."""
    path = f"{output}/{REPORT_NAME}"
    if storage.is_remote(output):
        storage.put_bytes(path, json.dumps(report, indent=2, sort_keys=True).encode())
        return path
    tmp = f"{output}/.{REPORT_NAME}.tmp-{os.getpid()}"
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(report, indent=2, sort_keys=True).encode())
    FileSystems.rename([tmp], [path])
    return path


_SKIP_WORDS = {"hidden": "dot-named", "non_image": "not images by extension"}


def skipped_line(counts: dict) -> str | None:
    """ "skipped 3 input files (2 dot-named, 1 not images by extension) and 2 tar members
    (2 symlink)", or None when nothing was skipped."""
    parts = []
    files = counts.get("skipped_files") or {}
    if files:
        reasons = ", ".join(f"{n} {_SKIP_WORDS.get(reason, reason)}" for reason, n in files.items())
        parts.append(f"{sum(files.values())} input files ({reasons})")
    members = counts.get("skipped_members") or {}
    if members:
        kinds = ", ".join(f"{n} {kind}" for kind, n in members.items())
        parts.append(f"{sum(members.values())} tar members ({kinds})")
    return f"skipped {' and '.join(parts)}: not records, not failures" if parts else None


def summary(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"imgindex embed: {report['status']} in {report['seconds']:.1f}s "
        f"({report['images_per_second']} images/s) on {report['runner']}",
        f"  records {c['records']}: read {c['read']}, failed to read {c['failed_read']}, "
        f"failed to decode/preprocess {c['failed_before_embed']}",
    ]
    skipped = skipped_line(c)
    if skipped:
        lines.append(f"  {skipped}")
    if c.get("duplicate_ids") or c.get("duplicate_content"):
        lines.append(
            f"  duplicates: {c.get('duplicate_ids')} ids (failed, first kept), "
            f"{c.get('duplicate_content')} records with content seen earlier in the run (embedded once)"
        )
    for name, e in report["embedders"].items():
        deleted = "" if e.get("deleted") is None else f", deleted since the previous run {e['deleted']}"
        lines.append(
            f"  {name}: rows {e.get('rows')} (reused {e.get('reused')}, embedded {e['embedded']}){deleted}, "
            f"failed {e['failed_embed']} -> {e['table']}"
            + ("" if e["reconciled"] is not False else "  (COUNTS DO NOT RECONCILE)")
        )
    reuse = report.get("reuse") or {}
    for name, entry in (reuse.get("embedders") or {}).items():
        if entry["status"] != "reused":
            lines.append(f"  {name}: reuse {entry['status']}")
    for name, check in (reuse.get("verification") or {}).items():
        lines.append(
            f"  {name}: verified {check['checked']} reused vectors, worst cosine {check['worst_cosine']}"
        )
    if report.get("error"):
        lines.append(f"  FAILED: {report['error']}")
    for reason, n in report["failures_by_reason"].items():
        lines.append(f"  failed {n:6d}  {reason}")
    lines.append(f"  failures: {report['failures_table']}  report: {report['output']}/{REPORT_NAME}")
    return "\n".join(lines)
