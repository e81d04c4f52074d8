import os

from PIL import Image

from imgindex import cli
from retrieval import runs, tables


def test_demo_job_builds_publishes_and_queries_through_the_searcher(tmp_path, capsys):
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

    # Rerunning publishes a second run; the first stays on disk.
    assert cli.main(["demo", "--output", str(out), "--variants", "3", "--k", "3"]) == 0
    assert runs.read_latest(str(out)) != run_dir and os.path.isdir(run_dir)
