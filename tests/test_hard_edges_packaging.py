"""The Docker build context holds what the image needs and nothing of a user's local state."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over a whole path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _regex((raw[1:] if negate else raw).rstrip("/"))
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def _patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = _patterns()
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"COPY\s+(.+)\s+\S+$", line.strip())
        if match:
            copied += match.group(1).split()
    assert copied, "the Dockerfile copies nothing?"
    for source in copied:
        assert not _excluded(source, patterns), source
        for file in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else [ROOT / source]:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel and not rel.endswith(".partial"):
                assert not _excluded(rel, patterns), rel


def test_dockerignore_drops_local_state():
    patterns = _patterns()
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "ghnq-runs/resnet20/model.pt",
                 "ghnq-train/last.pt", ".git/HEAD", "tests/test_cli_export.py", "results/evaluation.json",
                 "ghnq_deploy/__pycache__/x.pyc", "ghnq_deploy/checkpoints/.ghnq-cifar10.pt.123.a.partial"):
        assert _excluded(path, patterns), path
