import argparse
import subprocess
import sys

import pytest

from imgindex import cli


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv, heavy",
    [
        (["--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
        (["index", "--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
        (["models", "--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
        (["demo", "--help"], ("tensorflow", "tensorflow_hub", "scann", "apache_beam")),
        # embed's options are Beam PipelineOptions, so Beam is imported, but not TensorFlow.
        (["embed", "--help"], ("tensorflow", "tensorflow_hub", "scann")),
    ],
)
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


@pytest.mark.slow
def test_embed_runs_the_pipeline_and_prints_a_summary(tmp_path, capsys):
    from tests.helpers import images

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(images.jpeg())
    (tmp_path / "in" / "b.jpg").write_bytes(b"not an image")
    code = cli.main(
        [
            "embed",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--direct_running_mode=in_memory",
            "--experiments=foo",
            "--direct_num_workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "lite: rows 1 (reused 0, embedded 1), failed 0" in out and "decode/ImageDecodeError" in out
    assert (tmp_path / "out" / "run_report.json").is_file()


def test_index_with_tuning_queries_records_held_out_recall(tmp_path, capsys):
    import numpy as np

    from retrieval import tables
    from retrieval.embedders import EmbedderSpec
    from retrieval.index import load_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 4)).astype(np.float32)
    spec = EmbedderSpec(name="t", handle="t", fingerprint="f", dim=4)
    tables.write_embeddings(
        str(tmp_path / "e.parquet"),
        spec,
        [f"v{i}" for i in range(50)],
        vectors,
        sha256s=["0" * 64] * 50,
        sources=["s"] * 50,
        widths=[1] * 50,
        heights=[1] * 50,
    )
    np.save(tmp_path / "q.npy", rng.standard_normal((6, 4)).astype(np.float32))
    assert (
        cli.main(
            [
                "index",
                "--embeddings",
                str(tmp_path / "e.parquet"),
                "--output",
                str(tmp_path / "ix"),
                "--tuning_queries",
                str(tmp_path / "q.npy"),
                "--distance",
                "dot_product",
            ]
        )
        == 0
    )
    recall = load_index(tmp_path / "ix").manifest.recall
    assert recall["method"].startswith("held-out: 6 query vectors") and recall["value"] == 1.0
    assert (
        cli.main(
            [
                "index",
                "--embeddings",
                str(tmp_path / "e.parquet"),
                "--output",
                str(tmp_path / "iy"),
                "--tuning_queries",
                str(tmp_path / "missing.npy"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_index_with_tuning_queries_does_not_import_beam(tmp_path):
    import numpy as np

    from retrieval import tables
    from retrieval.embedders import EmbedderSpec

    rng = np.random.default_rng(0)
    spec = EmbedderSpec(name="t", handle="t", fingerprint="f", dim=4)
    tables.write_embeddings(
        str(tmp_path / "e.parquet"),
        spec,
        [f"v{i}" for i in range(20)],
        rng.standard_normal((20, 4)).astype(np.float32),
        sha256s=["0" * 64] * 20,
        sources=["s"] * 20,
        widths=[1] * 20,
        heights=[1] * 20,
    )
    np.save(tmp_path / "q.npy", rng.standard_normal((3, 4)).astype(np.float32))
    argv = ["index", "--embeddings", str(tmp_path / "e.parquet"), "--output", str(tmp_path / "ix")]
    argv += ["--tuning_queries", str(tmp_path / "q.npy")]
    result = _python(
        "import sys\n"
        "from imgindex.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        "heavy = [m for m in ('apache_beam', 'tensorflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- pass-through flags


def test_misspelt_build_flags_fail_before_any_work_with_a_suggestion(tmp_path, capsys):
    root = tmp_path / "root"
    code = cli.main(
        [
            "build",
            "--input",
            str(tmp_path / "*.jpg"),
            f"--output={root}",
            "--min_recal=0.99",
            "--max_shard_vector",
            "5",
            "--runner",
            "DirectRunner",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("imgindex build: error:") and len(err.strip().splitlines()) == 1
    assert "--min_recal (did you mean --min_recall?)" in err
    assert "--max_shard_vector (did you mean --max_shard_vectors?)" in err
    assert "'5'" not in err and "--runner" not in err  # a flag's value, a known Beam flag
    assert not root.exists()


def test_embed_refuses_unknown_flags_including_builds(tmp_path, capsys):
    assert (
        cli.main(
            [
                "embed",
                f"--input={tmp_path}/*.jpg",
                f"--output={tmp_path}/out",
                "--batchsize=8",
                "--min_recall=0.9",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("imgindex embed: error:") and "did you mean --batch_size?" in err
    assert "--min_recall" in err and not (tmp_path / "out").exists()
    assert cli.main(["embed", "--batch_size=eight"]) == 2
    assert "invalid int value: 'eight'" in capsys.readouterr().err


def test_flags_beam_knows_pass_through(capsys):
    from pipelines.build_options import BuildOptions
    from pipelines.options import EmbedOptions, check_flags

    beam = [
        "--direct_num_workers=2",
        "--direct_num_workers",
        "2",
        "--experiments=foo",
        "--experiments",
        "bar,baz",
        "--runner",
        "DirectRunner",
        "--direct_running_mode=multi_threading",
        "--project",
        "p",
        "--region=europe-west1",
        "--temp_location",
        "gs://b/tmp",
        "--share_model_across_processes",
        "--batch_size",
        "8",
    ]
    assert check_flags(beam, EmbedOptions) == beam
    assert check_flags(beam + ["--min_recall", "0.99"], BuildOptions)
    # Past the flag check, build's own validation speaks: the Beam flags were accepted.
    assert cli.main(["build", "--direct_num_workers=2", "--experiments=foo"]) == 2
    assert "--output is required" in capsys.readouterr().err


def test_pipeline_run_functions_check_flags_too(tmp_path):
    from pipelines import build, embed
    from retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--embeder \(did you mean --embedder\?\)"):
        embed.run(
            [
                f"--input={tmp_path}/*.jpg",
                f"--output={tmp_path}/out",
                "--embeder=x=builtin:efficientnet-lite0",
            ]
        )
    with pytest.raises(ConfigError, match=r"--min_recal \(did you mean --min_recall\?\)"):
        build.run([f"--input={tmp_path}/*.jpg", f"--output={tmp_path}/root", "--min_recal=0.99"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "root").exists()


# --------------------------------------------------------------------------- query


def test_query_npy_of_shape_1_d_is_one_query(vector_run, tmp_path, capsys):
    import numpy as np

    vector = np.random.default_rng(1).standard_normal(8).astype(np.float32)
    np.save(tmp_path / "flat.npy", vector)
    np.save(tmp_path / "row.npy", vector[None])  # what embed_batch returns for one image
    assert cli.main(["query", str(vector_run), "--vector", str(tmp_path / "flat.npy"), "--k", "3"]) == 0
    flat = capsys.readouterr().out
    assert cli.main(["query", str(vector_run), "--vector", str(tmp_path / "row.npy"), "--k", "3"]) == 0
    assert capsys.readouterr().out == flat
    assert flat.splitlines()[0].split()[:2] == ["rank", "score"] and len(flat.splitlines()) == 4


def test_query_npy_of_several_rows_prints_each_querys_hits(vector_run, tmp_path, capsys):
    import json

    import numpy as np

    np.save(tmp_path / "q.npy", np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32))
    assert cli.main(["query", str(vector_run), "--vector", str(tmp_path / "q.npy"), "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["query", "rank"]
    assert [(line.split()[0], line.split()[1]) for line in lines[1:]] == [
        (str(q), str(r)) for q in range(3) for r in (1, 2)
    ]
    assert (
        cli.main(["query", str(vector_run), "--vector", str(tmp_path / "q.npy"), "--k", "2", "--json"]) == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all([h["rank"] for h in row] == [1, 2] for row in hits)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 8), np.float32))
    assert cli.main(["query", str(vector_run), "--vector", str(tmp_path / "cube.npy")]) == 2
    assert "shape (2, 2, 8)" in capsys.readouterr().err


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["query", "runs", "inspect", "index", "models", "demo"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shown = 0
    for action in sub.choices[command]._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, (action.dest, text)
            shown += 1
    assert shown or command in ("runs", "inspect", "models")
    expected = {
        "query": "--k K hits per query (default: 10)",
        "index": "(default: cosine)",
        "demo": "(default: runs/demo)",
        "models": "(default: $IMGINDEX_CACHE_DIR, else ~/.cache/imgindex)",
    }
    assert expected.get(command, "") in text
    assert "(default: None)" not in text and "(default: False)" not in text
