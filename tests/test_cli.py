import subprocess
import sys

import pytest

from imgindex import cli


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, heavy", [
    (["--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
    (["index", "--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
    (["models", "--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
    (["demo", "--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
    # embed's options are Beam PipelineOptions, so Beam is imported, but not TensorFlow.
    (["embed", "--help"], ("tensorflow", "tensorflow_hub", "scann")),
])
def test_help_does_not_import_tensorflow(argv, heavy):
    result = _python(
        "import sys\n"
        "from imgindex.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"heavy = [m for m in {heavy!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr
    assert "usage: imgindex" in result.stdout


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "embed", "index", "models"):
        assert command in out


def test_models_lists_builtins(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "builtin:efficientnet-lite0" in out and "224" in out and "1280" in out


def test_user_errors_are_one_line_not_a_traceback(capsys, tmp_path):
    assert cli.main(["models", "--export", "efficientnet-b7", "--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgindex models: error:") and "efficientnet-lite0" in err
    assert "Traceback" not in err


def test_embed_runs_the_pipeline_and_prints_a_summary(tmp_path, capsys):
    from tests import images

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(images.jpeg())
    (tmp_path / "in" / "b.jpg").write_bytes(b"not an image")
    code = cli.main(["embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--direct_running_mode=in_memory"])
    out = capsys.readouterr().out
    assert code == 0
    assert "lite: embedded 1, failed 0" in out and "decode/ImageDecodeError" in out
    assert (tmp_path / "out" / "run_report.json").is_file()


def test_index_with_tuning_queries_records_held_out_recall(tmp_path, capsys):
    import numpy as np

    from retrieval import tables
    from retrieval.embedders import EmbedderSpec
    from retrieval.index import load_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 4)).astype(np.float32)
    spec = EmbedderSpec(name="t", handle="t", fingerprint="f", dim=4)
    tables.write_embeddings(str(tmp_path / "e.parquet"), spec, [f"v{i}" for i in range(50)], vectors,
                            ["0" * 64] * 50, ["s"] * 50, [1] * 50, [1] * 50)
    np.save(tmp_path / "q.npy", rng.standard_normal((6, 4)).astype(np.float32))
    assert cli.main(["index", "--embeddings", str(tmp_path / "e.parquet"), "--output", str(tmp_path / "ix"),
                     "--tuning_queries", str(tmp_path / "q.npy"), "--distance", "dot_product"]) == 0
    recall = load_index(tmp_path / "ix").manifest.recall
    assert recall["method"].startswith("held-out: 6 query vectors") and recall["value"] == 1.0
    assert cli.main(["index", "--embeddings", str(tmp_path / "e.parquet"), "--output", str(tmp_path / "iy"),
                     "--tuning_queries", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
