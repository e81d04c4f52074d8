"""Run directories under an output root, written directly (manifests dated T0 + hours), for
the listing and retention tests: published, failed and rejected runs, runs killed before their
manifest (incomplete) and runs with an unreadable manifest (damaged)."""

import datetime
import os
from pathlib import Path

from retrieval import output_root, run_status, runs

T0 = datetime.datetime(2026, 11, 22, 12, tzinfo=datetime.timezone.utc)
HOUR = datetime.timedelta(hours=1)


def entry(name, n):
    """A run manifest's record of an embedder's index of n rows (no index is written)."""
    return runs.EmbedderEntry(
        spec=None,
        table=f"{runs.EMBEDDINGS_DIR}/{name}",
        index=f"{runs.INDEX_DIR}/{name}",
        index_manifest_sha256="0" * 64,
        n=n,
        d=8,
        distance="cosine",
        method="brute_force",
        search_defaults={"k": 10},
        recall={},
        build_seconds=0.0,
    )


def make_run(root, hours, status="published", publish=False, error=None, embedders=None) -> str:
    """A run directory whose manifest was written at T0 + hours (no index: retention needs none)."""
    when = T0 + hours * HOUR
    run_id = runs.new_run_id(when)
    directory = runs.run_dir(str(root), run_id)
    os.makedirs(f"{directory}/{runs.EMBEDDINGS_DIR}/clip")
    Path(f"{directory}/{runs.EMBEDDINGS_DIR}/clip/part-0.parquet").write_bytes(b"x" * 100)
    manifest = runs.RunManifest(
        run_id=run_id,
        status=status,
        inputs={"globs": ["test"]},
        counts={"records": 100, "failed_total": 2},
        embedders=embedders
        if embedders is not None
        else {"clip": entry("clip", 98), "dino": entry("dino", 97)},
        gates={"passed": status == "published", "reasons": []},
        timings={},
        created_at=when.isoformat(timespec="seconds"),
        error=error,
    )
    runs.write_run_manifest(directory, manifest)
    if publish:
        run_status.publish(str(root), run_id)
    return run_id


def set_mtime(path, when) -> None:
    """Sets the mtime of `path` and everything under it."""
    stamp = when.timestamp()
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(parent, name), (stamp, stamp))
    os.utime(path, (stamp, stamp))


def make_incomplete(root, hours) -> str:
    """A run killed (or still running) before its manifest: files, no run_manifest.json."""
    run_id = runs.new_run_id(T0 + hours * HOUR)
    directory = runs.run_dir(str(root), run_id)
    os.makedirs(f"{directory}/embeddings/clip")
    Path(f"{directory}/embeddings/clip/part-0.parquet").write_bytes(b"partial")
    set_mtime(directory, T0 + hours * HOUR)
    return run_id


def make_damaged(root, hours, text="{not json") -> str:
    run_id = runs.new_run_id(T0 + hours * HOUR)
    directory = runs.run_dir(str(root), run_id)
    os.makedirs(directory)
    Path(directory, runs.RUN_MANIFEST).write_text(text)
    set_mtime(directory, T0 + hours * HOUR)
    return run_id


def count_files(directory) -> int:
    return sum(len(names) for _, _, names in os.walk(directory))


def run_ids(root) -> list[str]:
    return [r.run_id for r in output_root.list_runs(root)]


def trash_dirs(root) -> list[Path]:
    return sorted((Path(root) / runs.RUNS_DIR).glob(".trash-*"))
