import subprocess
import sys

import pytest

from imgindex import cli


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["index", "--help"], ["models", "--help"], ["demo", "--help"]])
def test_help_does_not_import_tensorflow(argv):
    result = _python(
        "import sys\n"
        "from imgindex.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('tensorflow', 'tensorflow_hub', 'scann', 'apache_beam') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr
    assert "usage: imgindex" in result.stdout


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "index", "models"):
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
