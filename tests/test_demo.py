import os

import pytest
from PIL import Image

from imgindex import cli
from pipelines import build
from retrieval import runs, tables

pytestmark = pytest.mark.slow  # the demo embeds 42 photos with the builtin model


def test_demo_job_builds_publishes_and_queries_through_the_searcher(tmp_path, capsys, tiny_savedmodel):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out), "--variants", "3", "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "published" in printed and "hit rate:" in printed and "contact sheet:" in printed
    hit_rate = float(printed.split("hit rate: ")[1].split()[0])
    # The originals are not indexed; their augmented variants must be found by the real model.
    assert hit_rate >= 0.8, printed

    run_dir = runs.read_latest(str(out))
    manifest = runs.read_run_manifest(run_dir)
    assert manifest.status == "published" and manifest.counts["records"] == 14 * 3
    data = tables.read_embeddings(os.path.join(run_dir, "embeddings", "demo"), with_columns=True)
    assert data.vectors.shape == (42, 1280) and data.spec.handle == "builtin:efficientnet-lite0"
    assert set(data.columns.column("json").to_pylist()) >= {'{"photo": "coffee"}'}
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] > 14 * 90

    # A second run into the demo's output root (its own shards, the tiny model: cheaper than a
    # second demo) publishes a new run; the demo's run stays on disk, whole.
    second = build.run(
        [f"--input={out}/shards/*.tar", f"--output={out}", f"--embedder=tiny={tiny_savedmodel},size=32"]
    )
    assert runs.read_latest(str(out)) == second.run_dir != run_dir
    assert runs.read_run_manifest(run_dir).to_dict() == manifest.to_dict()
    again = tables.read_embeddings(os.path.join(run_dir, "embeddings", "demo"))
    assert again.ids == data.ids and (again.vectors == data.vectors).all()
