"""`ghnq-deploy predict` with the shipped checkpoint: run folders, determinism, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    first = _cli("predict", str(specs), "--workspace", "ws", "--json", cwd=tmp_path)
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
        again = _cli("predict", str(specs / "resnet20.json"), "--output", name, cwd=tmp_path)
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


# ----------------------------------------------------------------------------- --threads, --qat-scheme


def _app():
    from ghnq_deploy.cli import _load_commands, app

    _load_commands()
    return app


def test_predict_threads_option_sets_torch_threads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ghnq_deploy.ghn.predict as predict_lib

    seen = []
    real = predict_lib.predict

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_lib, "predict", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        result = CliRunner().invoke(_app(), ["predict", str(EXAMPLES / "resnet20.json"), "--output",
                                             str(tmp_path / "m.pt"), "--threads", "1", "--json"])
        assert result.exit_code == 0, result.output
        assert seen == [1] and (tmp_path / "m.pt").is_file()
    finally:
        torch.set_num_threads(before)


def test_train_threads_and_qat_scheme_reach_the_trainer(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ghnq_deploy.ghn.train as train_lib

    seen = {}

    def fake_train(cfg, resume=False, on_step=None):
        seen.update(threads=torch.get_num_threads(), cfg=cfg)
        return tmp_path / "run" / "ghn.pt"

    monkeypatch.setattr(train_lib, "train", fake_train)
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        result = CliRunner().invoke(_app(), ["train", "--out-dir", str(tmp_path / "run"), "--qat", "--qat-scheme",
                                             "tflite-int8", "--qat-bits", "w8a8,w4a8", "--threads", "1"])
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    assert seen["threads"] == 1
    assert seen["cfg"].qat_scheme == "tflite-int8" and seen["cfg"].qat_bits == ("w8a8", "w4a8")


@pytest.mark.parametrize("args,needle", [
    (["train", "--qat", "--qat-scheme", "tflite"], "--qat-scheme 'tflite' is not one of paper, tflite-int8"),
    (["train", "--threads", "0"], "Invalid value for '--threads': Input should be greater than or equal to 1"),
    (["predict", str(EXAMPLES / "resnet20.json"), "--threads", "0"], "Invalid value for '--threads': Input should be greater than or equal to 1"),
])
def test_bad_qat_scheme_and_threads_are_one_line_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    """In-process through the console entry point's error handling (one red line, exit 2)."""
    from ghnq_deploy.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ghnq-deploy", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no workspace
