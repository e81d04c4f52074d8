import os

from PIL import Image

from imgindex import cli
from retrieval import index, tables


def test_demo_job_embeds_indexes_queries_and_draws(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out), "--variants", "2", "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "hit rate:" in printed and "contact sheet:" in printed

    data = tables.read_embeddings(str(out / "embeddings"))
    assert len(data.ids) == 14 * 3 and data.vectors.shape == (42, 1280)
    assert data.spec.handle == "builtin:efficientnet-lite0" and data.spec.fingerprint.startswith("sha256:")
    loaded = index.load_index(str(out / "index"))
    assert loaded.manifest.embedder["fingerprint"] == data.spec.fingerprint
    # Each original photo finds its own two variants first: the builtin model is real.
    hits, _ = loaded.search_batch(data.vectors[[data.ids.index(f"{p}/original") for p in ("coffee", "chelsea")]], k=3)
    for row, photo in zip(hits, ("coffee", "chelsea")):
        assert sorted(row) == sorted(f"{photo}/{v}" for v in ("original", "v0", "v1"))
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] > 14 * 90

    # Rerunning into the same output is safe.
    assert cli.main(["demo", "--output", str(out), "--variants", "2", "--k", "3"]) == 0
    assert os.path.isdir(out / "index")
