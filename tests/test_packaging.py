"""Packaging: pyproject pins, Dockerfile, .ci/run and README agree with each other and the tree."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

from ghnq_deploy.arch.spec import OP_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
TEST_COMMAND = "python -m pytest -q"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def readme_blocks() -> list[str]:
    """The bash blocks of the README's Quick start section (other sections show more examples)."""
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", quick, flags=re.S)


def test_pyproject_pins_torch_and_has_the_test_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    names = {re.split(r"[<>=!~ ]", d)[0] for d in deps}
    assert {"numpy", "onnx", "onnxruntime", "tensorflow", "ai-edge-litert", "typer", "rich"} <= names
    test_extra = {re.split(r"[<>=!~ ]", d)[0] for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "hypothesis"} <= test_extra
    assert project["scripts"]["ghnq-deploy"] == "ghnq_deploy.cli:main"
    assert (ROOT / project["readme"]).is_file()


def test_dockerfile_copies_only_existing_paths_and_runs_the_cli():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    copies = [args for word, args in instructions if word == "COPY"]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources, destination = parts[:-1], parts[-1]
        assert sources and destination
        for source in sources:
            assert list(ROOT.glob(source)), f"Dockerfile copies {source!r}, which does not exist"
    entrypoints = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1 and json.loads(entrypoints[0]) == ["ghnq-deploy"]
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "torch==2.14.1" in runs and "torchvision==0.29.1" in runs
    assert re.search(r"pip install (-e )?\.(\s|$)", runs)


def test_ci_run_is_executable_and_runs_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "GHNQ_CI_DRY_RUN": "1"}
    env.pop("GHNQ_CI_VENV", None)
    result = subprocess.run([str(script)], capture_output=True, text=True, env=env, cwd="/", timeout=60, check=True)
    commands = [line[2:] for line in result.stderr.splitlines() if line.startswith("+ ")]
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    installs = [c for c in commands if " pip install " in f" {c} "]
    assert installs == ["python -m pip install torch==2.14.1 torchvision==0.29.1", "python -m pip install -e .[test]"]
    assert commands[-1] == TEST_COMMAND
    venvs = [c.split()[-1] for c in commands if " -m venv " in c]
    if venvs:  # absent when the cached venv already exists
        assert venvs[0].endswith(f"/ghnq-ci/{key}")
        assert not Path(venvs[0]).resolve().is_relative_to(ROOT)
    inside = {**env, "GHNQ_CI_VENV": str(ROOT / ".venv-ci")}
    refused = subprocess.run([str(script)], capture_output=True, text=True, env=inside, timeout=60)
    assert refused.returncode == 2 and "outside the clone" in refused.stderr


def test_readme_has_the_two_commands():
    blocks = [b.strip() for b in readme_blocks()]
    assert len(blocks) == 2
    install, tests = blocks
    assert "\n" not in install and "\n" not in tests  # one copy-paste line each
    assert "pip install" in install and install.endswith("ghnq-deploy predict examples/resnet20.json && ghnq-deploy export --target tflite-int8 "
                                                   "&& ghnq-deploy verify --device rpi4")
    assert tests.endswith(TEST_COMMAND) and '".[test]"' in tests
    assert (ROOT / "examples" / "resnet20.json").is_file()
    if ".venv" in install:
        assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def test_arch_spec_doc_covers_every_op_and_attribute():
    doc = (ROOT / "docs" / "arch-spec.md").read_text()
    for op, attributes in OP_ATTRIBUTES.items():
        assert f"`{op}`" in doc, op
        for name in attributes:
            assert f"`{name}`" in doc, (op, name)
    assert (ROOT / "docs" / "architecture-space.md").is_file()
    assert (ROOT / "targets" / "README.md").is_file()
