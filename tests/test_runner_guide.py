"""The files docs/runners.md ships and tells users to run, checked where they can be here.

- deploy/Dockerfile (never built here: no docker): its base image and every pinned package
  are what setup.py allows, and the extras it installs exist.
- The guide's `imgindex build` / `imgindex embed` command lines: every flag passes imgindex's
  flag check (so exists in Beam 2.77 or imgindex), as the CLI would check it.
- `--setup_file ./setup.py`: Beam's own stager builds the package from setup.py, and a
  worker's `pip install` of it holds every module of the product.
"""

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pipelines.build_options import BuildOptions
from pipelines.options import EmbedOptions, check_flags

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "pipelines", "serving", "imgindex")


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup() in setup.py (install_requires, extras, ...)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    )
    out = {}
    for keyword in call.keywords:
        try:
            out[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:  # computed values (version, long_description, packages)
            pass
    return out


def _dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, comments dropped and continuation lines joined."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_dockerfile_installs_what_setup_py_requires():
    setup = _setup_kwargs()
    required = {Requirement(r).name.lower(): Requirement(r) for r in setup["install_requires"]}
    lines = _dockerfile_lines()

    base = next(line for line in lines if line.startswith("FROM "))
    found = re.fullmatch(r"FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)", base)
    assert found, f"not Beam's Python SDK image: {base}"
    python, beam = found.groups()
    assert SpecifierSet(setup["python_requires"]).contains(f"{python}.0"), python
    assert required["apache-beam"].specifier.contains(beam), (beam, str(required["apache-beam"]))

    pins = {}
    for line in lines:
        if line.startswith("RUN pip install"):
            for word in shlex.split(line):
                if "==" in word:
                    pin = Requirement(word)
                    pins[pin.name.lower()] = next(iter(pin.specifier)).version
    # The heavy runtime the image pre-installs; each pin must be a version setup.py allows.
    assert {"tensorflow", "scann", "tensorflow-hub", "tf-keras"} <= set(pins), pins
    for name, version in pins.items():
        assert name in required, f"{name} is pinned in the Dockerfile but not required by setup.py"
        assert required[name].specifier.contains(version), f"{name}=={version} vs setup.py {required[name]}"
    assert pins["tensorflow"].startswith("2.20.") and pins["scann"] == "1.4.2"

    # The product with extras that exist; the builtin model exported into the image.
    install = next(line for line in lines if "/opt/imgindex/src[" in line)
    extras = re.search(r"/opt/imgindex/src\[([^\]]+)\]", install).group(1).split(",")
    assert set(extras) <= set(setup["extras_require"]), extras
    assert any(line.startswith("RUN imgindex models --export efficientnet-lite0") for line in lines)
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    assert set(PACKAGES) <= copied, copied


def _guide_commands() -> list[list[str]]:
    """Every `imgindex build|embed ...` command in docs/runners.md's sh blocks, as argv."""
    text = (REPO / "docs" / "runners.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["imgindex"]:
                commands.append(words[1:])
    return commands


def test_every_flag_in_the_runner_guide_passes_the_flag_check():
    commands = _guide_commands()
    assert sum(c[0] == "build" for c in commands) >= 5 and any(c[0] == "embed" for c in commands)
    for command in commands:
        options = {"build": BuildOptions, "embed": EmbedOptions}[command[0]]
        check_flags(command[1:], options)  # raises ConfigError naming an unknown flag


@pytest.mark.slow
def test_setup_file_stages_a_package_that_installs_the_whole_product(tmp_path):
    """What `--setup_file ./setup.py` does: Beam's stager builds the package (the
    workflow tarball), a worker pip-installs it.  Dependencies are left out here (the
    worker gets them from PyPI); the product's modules and its script must all be there."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.portability.api import beam_runner_api_pb2
    from apache_beam.runners.portability.stager import Stager

    staged = tmp_path / "staged"
    staged.mkdir()
    options = PipelineOptions(flags=[f"--setup_file={REPO / 'setup.py'}"])
    artifacts = {}
    for resource in Stager.create_job_resources(options, str(staged)):
        role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(resource.role_payload)
        artifacts[role.staged_name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(
            resource.type_payload
        ).path
    assert "workflow.tar.gz" in artifacts, artifacts

    target = tmp_path / "worker"
    subprocess.run(
        [
            sys.executable,
            *("-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
            *("--no-deps", "--no-index", "--no-build-isolation", "--target", str(target)),
            artifacts["workflow.tar.gz"],
        ],
        check=True,
        cwd=tmp_path,
    )
    expected = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    installed = {str(p.relative_to(target)) for package in PACKAGES for p in (target / package).rglob("*.py")}
    assert expected - installed == set(), f"missing on the worker: {sorted(expected - installed)[:5]}"
    assert (target / "bin" / "imgindex").is_file()
