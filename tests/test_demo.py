import os

import numpy as np
import pytest
from PIL import Image

from imgindex import cli, demo
from pipelines import build
from retrieval import runs, tables
from tests.helpers import images


@pytest.mark.slow  # the demo embeds 42 photos with the builtin model
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


BLUE = (0, 0, 255)  # the test's photos: solid blue, so that every other colour is drawn by the sheet
COLOURS = {"black": (0, 0, 0), "green": (0, 128, 0), "red": (255, 0, 0)}


def _sheet(tmp_path, name: str, labels: list[tuple[int, float, str]]) -> np.ndarray:
    blue = images.encode(Image.new("RGB", (40, 40), BLUE), "PNG")
    rows = [
        (
            f"photo{r}",
            blue,
            [demo.SheetHit(blue, i != 1, rank, score, id) for i, (rank, score, id) in enumerate(labels)],
        )
        for r in range(2)
    ]
    demo.contact_sheet(rows, str(tmp_path / name), thumb=64)
    return np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-d mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_contact_sheet_labels_every_hit_and_has_a_legend(tmp_path):
    labels = [(1, 0.9876, "photo0/v00"), (2, 0.5, "photo1/v01"), (3, -0.25, "photo0/v02")]
    sheet = _sheet(tmp_path, "a.png", labels)
    blue = (sheet == BLUE).all(-1)
    rows = _spans(blue.any(1))  # the thumbnails' rows, top to bottom
    cols = _spans(blue[rows[0][0]])  # the query's then each hit's columns
    assert len(rows) == 2 and len(cols) == 1 + len(labels)

    # The legend, above the first row: a swatch of each border colour, and its text.
    header = sheet[: rows[0][0] - 4]
    not_white = ~(header == 255).all(-1)
    swatches = {name: int((header == rgb).all(-1).sum()) for name, rgb in COLOURS.items()}
    assert all(count >= 25 for count in swatches.values()), swatches
    assert not_white.sum() > sum(swatches.values()) + 300  # text, not only the swatches

    # Each thumbnail's border says hit (green) or miss (red); under it, its label is drawn.
    border_row = rows[0][0] - 2
    assert tuple(sheet[border_row, cols[0][0]]) == COLOURS["black"]
    hit_or_miss = [tuple(sheet[border_row, start]) for start, _ in cols[1:]]
    assert hit_or_miss == [COLOURS["green"], COLOURS["red"], COLOURS["green"]]
    caption = sheet[rows[0][1] + 4 : rows[1][0] - 4]
    for start, end in cols:
        assert (~(caption[:, start:end] == 255).all(-1)).sum() > 40

    # The labels come from the hits: other ranks, scores and ids change every hit's caption,
    # and nothing else.
    other = _sheet(tmp_path, "b.png", [(4, 0.125, "photo1/v03"), (5, 0.0, "photo0/v04"), (6, 0.75, "x")])
    assert (other[: rows[0][1] + 4] == sheet[: rows[0][1] + 4]).all()
    caption_b = other[rows[0][1] + 4 : rows[1][0] - 4]
    assert (caption_b[:, cols[0][0] : cols[0][1]] == caption[:, cols[0][0] : cols[0][1]]).all()
    for start, end in cols[1:]:
        assert (caption_b[:, start:end] != caption[:, start:end]).any()
