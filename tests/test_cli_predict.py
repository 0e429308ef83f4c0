"""`ghnq-deploy predict` with the shipped checkpoint: run folders, determinism, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ghnq_deploy.ghn.predict import load_predicted

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from ghnq_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_predict_writes_a_current_run_and_is_deterministic(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    for name in ("resnet20", "bnfree_cnn"):
        (specs / f"{name}.json").write_text((EXAMPLES / f"{name}.json").read_text())
    first = _cli("predict", str(specs), "--workspace", "ws", "--seed", "3", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert [r["name"] for r in rows] == ["bnfree_cnn", "resnet20"] and all(len(r["checkpoint_sha256"]) == 64 for r in rows)
    run = tmp_path / "ws" / "resnet20"
    assert (tmp_path / "ws" / "CURRENT").read_text().strip() == "resnet20"
    assert {p.name for p in run.iterdir()} == {"arch.json", "model.pt", "predict.json"}
    raw = torch.load(run / "model.pt", weights_only=True)
    model = load_predicted(run / "model.pt")
    assert model.build(bn_mode="batch")(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    # the same invocation twice: bit-identical; alone vs in a meta-batch: equal up to float summation order
    for name in ("a.pt", "b.pt"):
        again = _cli("predict", str(specs / "resnet20.json"), "--output", name, "--seed", "3", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], raw["state_dict"][k], rtol=1e-4, atol=1e-5)


def test_predict_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "nodes": [')
    spec = json.loads((EXAMPLES / "resnet20.json").read_text())
    spec["num_classes"] = 100
    spec["nodes"][-2]["attributes"]["out_features"] = 100
    hundred = tmp_path / "hundred.json"
    hundred.write_text(json.dumps(spec))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        (("predict", str(bad)), "invalid JSON at line 1"),
        (("predict", str(hundred)), "10-class"),
        (("predict", str(EXAMPLES / "resnet20.json"), "--checkpoint", str(corrupt)), "not a readable checkpoint"),
        (("predict", str(EXAMPLES / "resnet20.json"), "--bits", "w3a3"), "--bits"),
    ]
    for args, message in cases:
        result = _cli(*args, "--workspace", "ws", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "ws").exists()  # nothing half-written
