"""`imgindex build --dba_n N --dba_alpha A`: the index searches the DBA of the run's vectors,
recomputed over every row of each (incremental) build, while id queries, get_vector and the
tables keep the originals; the flags are checked before any work."""

import os

import numpy as np
import pytest

from imgindex import cli
from pipelines import build
from retrieval import index, runs, tables
from retrieval.errors import ConfigError
from serving import Searcher
from tests.helpers import runs_fixture as rf
from tests.test_build import _argv
from tests.test_rerank import numpy_dba, unit


def _write_photos(folder, n):
    """n PNGs img-000.png ... of distinct colours and textures (`images.write_folder`'s photos
    embed within cosine 1e-5 of each other with the tiny model: float32 rounding would pick
    among near-tied neighbours)."""
    os.makedirs(folder, exist_ok=True)
    for name, data in rf.colour_images(n, seed=5).items():
        with open(os.path.join(folder, f"{name}.png"), "wb") as f:
            f.write(data)
    return str(folder)


def _index_and_table(result):
    entry = result.manifest.embedders["tiny"]
    loaded = index.load_index(os.path.join(result.run_dir, entry.index))
    data = tables.read_embeddings(os.path.join(result.run_dir, runs.EMBEDDINGS_DIR, "tiny"))
    order = {item: row for row, item in enumerate(np.asarray(data.ids, dtype=object).tolist())}
    vectors = np.asarray(data.vectors)[[order[i] for i in loaded.ids]]  # in the index's row order
    return entry, loaded, vectors


@pytest.mark.slow
def test_dba_build_indexes_the_augmented_vectors_and_serves_the_originals(tmp_path, tiny_savedmodel, capsys):
    root = str(tmp_path / "root")
    folder = _write_photos(tmp_path / "in", 16)
    first = build.run(_argv(tiny_savedmodel, [folder], root, "--dba_n=2", "--dba_alpha=3"))
    entry, loaded, originals = _index_and_table(first)
    assert entry.dba["n"] == 2 and entry.dba["alpha"] == 3.0 and entry.dba["neighbours"] == "exact"
    assert loaded.dba == entry.dba
    indexed = np.stack([loaded.indexed_vectors()[r] for r in range(loaded.n)])
    np.testing.assert_allclose(indexed, numpy_dba(originals, 2, 3.0), atol=2e-6)
    np.testing.assert_allclose(
        np.stack([loaded.stored_vectors()[r] for r in range(loaded.n)]), unit(originals), atol=2e-6
    )
    assert "dba(n=2, alpha=3.0)" in build.summary(first)

    searcher = Searcher.open(root)
    row = list(loaded.ids).index("img-004.png")
    np.testing.assert_allclose(searcher.get_vector("img-004.png"), unit(originals[row]), atol=2e-6)
    hits = searcher.search_id("img-004.png", k=3)
    want = np.argsort(-(numpy_dba(originals, 2, 3.0) @ unit(originals[row])), kind="stable")[:3]
    assert [h.id for h in hits] == [loaded.ids[r] for r in want]
    assert searcher.info()["embedders"]["tiny"]["dba"]["n"] == 2

    assert cli.main(["inspect", root]) == 0
    shown = capsys.readouterr().out
    assert "dba(n=2, alpha=3.0)" in shown and "resize=crop pad=grey filter=bilinear" in shown
    assert cli.main(["inspect", os.path.join(first.run_dir, entry.index)]) == 0
    assert "dba(n=2, alpha=3.0)" in capsys.readouterr().out

    # The next night reuses the vectors of the 16 and embeds 6 new ones; DBA is recomputed
    # over all 22 rows.
    _write_photos(tmp_path / "in", 22)
    second = build.run(_argv(tiny_savedmodel, [folder], root, "--dba_n=2", "--dba_alpha=3"))
    assert second.manifest.counts["embedders"]["tiny"]["reused"] == 16
    _, loaded, originals = _index_and_table(second)
    assert loaded.n == 22
    indexed = np.stack([loaded.indexed_vectors()[r] for r in range(loaded.n)])
    np.testing.assert_allclose(indexed, numpy_dba(originals, 2, 3.0), atol=2e-6)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--dba_n=-1"], "--dba_n must be from 0"),
        (["--dba_n=101"], "--dba_n\\) must be an integer from 1 to 100"),
        (["--dba_n=3", "--dba_alpha=nan"], "--dba_alpha\\) must be a finite number"),
        (["--dba_n=3", "--dba_alpha=-1"], "--dba_alpha\\) must be a finite number"),
        (["--dba_n=3", "--distance=squared_l2"], "DBA averages vectors .* got squared_l2"),
        (["--dba_n=3", "--index_shards=2"], "--dba_n cannot be combined with a sharded build"),
        (["--dba_n=3", "--max_shard_vectors=100"], "--dba_n cannot be combined with a sharded build"),
    ],
)
def test_bad_dba_options_fail_before_work(tmp_path, tiny_savedmodel, extra, words):
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match=words):
        build.run(_argv(tiny_savedmodel, [str(tmp_path)], str(root), *extra))
    assert not root.exists()
