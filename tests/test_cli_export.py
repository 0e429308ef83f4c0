"""`ghnq-deploy export`: run folders, manifests read back from the files, atomicity, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ghnq_deploy.export.onnx as onnx_export
import ghnq_deploy.export.tflite as tflite_export
from ghnq_deploy.calibration import load_calibration, load_eval_set
from ghnq_deploy.export.manifest import read_manifest, sha256_file
from ghnq_deploy.export.pipeline import FILE_NAMES, export
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.predict import predict, save_predicted
from ghnq_deploy.runtime import litert_runner, onnxruntime_runner

from export_helpers import EXAMPLES_DIR, edge_spec

EVAL_COUNT = 200


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "from ghnq_deploy.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace whose current run is resnet20 predicted by the shipped GHN, plus a 100-image calibration file."""
    root = tmp_path_factory.mktemp("export-cli")
    spec_file = EXAMPLES_DIR / "resnet20.json"
    if spec_file.is_file():
        from ghnq_deploy.arch.spec import load_spec

        spec = load_spec(spec_file)
    else:
        spec = edge_spec()
    try:
        ghn, info = load_ghn_checkpoint("default")
    except Exception:  # noqa: BLE001 - no shipped checkpoint yet: a random GHN still predicts valid nets
        from ghnq_deploy.ghn.model import GHNQ

        ghn, info = GHNQ(), {"sha256": None, "path": None}
    predicted = predict(ghn, [spec], ghn_info=info)[0]
    run = root / "ws" / spec.name
    save_predicted(run / "model.pt", predicted)
    (root / "ws" / "CURRENT").write_text(spec.name + "\n")
    cal = load_calibration()
    np.savez(root / "cal100.npz", x=cal.images[:100], y=cal.labels[:100])
    return root, run, predicted, info


def test_export_onnx_of_the_current_run_writes_file_and_manifest(workspace):
    root, run, predicted, info = workspace
    result = _cli("export", "--target", "onnx", "--workspace", "ws", "--calibration", "cal100.npz",
                  "--eval-count", str(EVAL_COUNT), cwd=root)
    assert result.returncode == 0, result.stderr
    out = run / "export" / "onnx"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.float32.onnx"]
    assert "BatchNorm folding" in result.stdout and "top-1" in result.stdout and "model.float32.onnx" in result.stdout
    m = read_manifest(out)
    model_file = out / "model.float32.onnx"
    assert m["target"] == "onnx" and m["file"]["sha256"] == sha256_file(model_file)
    assert m["arch"]["sha256"] == predicted.spec.sha256()
    assert m["ghn_checkpoint"]["sha256"] == info["sha256"]
    assert m["calibration"]["sha256"] == sha256_file(root / "cal100.npz") and m["calibration"]["count"] == 100
    assert m["batchnorm"]["calibrated"] and m["folding"]["folded"] == sum(n.op == "bn" for n in predicted.spec.nodes)
    assert m["folding"]["max_abs_logit_diff_folded_vs_unfolded"] < 1e-3
    assert m["io"]["input"]["shape"][0] == "batch" and m["io"]["input"]["scale"] is None
    assert m["tools"]["onnxruntime"] and m["tools"]["torch"]
    ev = m["evaluation"]
    assert ev["count"] == EVAL_COUNT and "CIFAR-10 test (JPEG copy)" in ev["dataset"]
    assert ev["max_abs_logit_diff_vs_torch"] <= 1e-4 and ev["top1"] == ev["torch_float_top1"]
    # the recorded accuracy is what the file really scores with its runtime
    evals = load_eval_set().subset(EVAL_COUNT)
    assert onnxruntime_runner.accuracy(model_file, evals.images, evals.labels) == pytest.approx(ev["top1"])


def test_export_tflite_int8_json_reads_quantization_back_from_the_file(workspace):
    root, run, _, _ = workspace
    result = _cli("export", "--model", str(run), "--target", "tflite-int8", "--calibration", "cal100.npz",
                  "--eval-count", str(EVAL_COUNT), "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    model_file = Path(data["model_file"])
    assert model_file.name == "model.full-int8.tflite" and model_file.parent == run / "export" / "tflite-int8"
    m = data["manifest"]
    interpreter = litert_runner.make_interpreter(model_file)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert m["io"]["input"]["dtype"] == "int8" and m["io"]["output"]["dtype"] == "int8"
    assert (m["io"]["input"]["scale"], m["io"]["input"]["zero_point"]) == pytest.approx(inp["quantization"])
    assert (m["io"]["output"]["scale"], m["io"]["output"]["zero_point"]) == pytest.approx(out["quantization"])
    w = m["weights"]
    assert w["all_zero_points_zero"] and w["weight_dtypes"] == ["int8"] and w["bias_dtypes"] == ["int32"]
    assert w["per_channel"] == w["weighted_ops"] and w["weight_int_range"][0] >= -127
    ev = m["evaluation"]
    assert ev["runtime"].startswith("ai-edge-litert") and ev["top1_agreement_with_torch"] > 0.5
    evals = load_eval_set().subset(EVAL_COUNT)
    assert litert_runner.accuracy(model_file, evals.images, evals.labels) == pytest.approx(ev["top1"])
    assert m["calibration"]["used_for"] == ["batchnorm", "activation ranges"]


@pytest.mark.parametrize("args, message", [
    (["--target", "tflite-fp16"], "not one of onnx, onnx-int8, tflite, tflite-int8"),
    (["--target", "onnx", "--workspace", "nowhere"], "no current run"),
    (["--target", "onnx", "--model", "missing.pt"], "no such model"),
    (["--target", "onnx-int8", "--calibration-method", "kl"], "unknown calibration method"),
    (["--target", "onnx", "--calibration", "normalised.npz"], "look already normalised"),
    (["--target", "onnx", "--calibration", "nchw.npz"], "is NCHW"),
    (["--target", "onnx", "--calibration", "missing.npz"], "no such calibration file"),
    (["--target", "onnx", "--calibration", "tiny.npz"], "at least 32"),
    (["--target", "onnx", "--eval-count", "0"], "--eval-count"),
    (["--target", "tflite", "--resolver", "gpu"], "--resolver"),
    (["--target", "tflite-int8", "--calibration-method", "entropy"], "applies to onnx-int8 only"),
    (["--target", "onnx", "--eval-count", "50", "--parity-tolerance", "0"], "disagrees with torch"),
])
def test_bad_input_is_one_line_with_exit_code_2(workspace, args, message, monkeypatch, capsys):
    """In-process through ghnq_deploy.cli.main (the same code path as the console script, minus start-up)."""
    from ghnq_deploy.cli import main

    root, _, _, _ = workspace
    from ghnq_deploy.data import normalize

    cal = load_calibration().images[:40]
    if not (root / "normalised.npz").exists():
        np.savez(root / "normalised.npz", x=normalize(cal).permute(0, 2, 3, 1).numpy())
        np.savez(root / "nchw.npz", x=cal.transpose(0, 3, 1, 2))
        np.savez(root / "tiny.npz", x=cal[:8])
    if "--workspace" not in args and "--model" not in args:
        args = [*args, "--workspace", "ws"]
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["ghnq-deploy", "export", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _export_dir_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_interrupted_export_leaves_no_partial_file_and_keeps_the_previous_export(workspace, monkeypatch):
    root, run, _, _ = workspace
    out = root / "atomic-onnx"
    first = export(run / "model.pt", "onnx", calibration=root / "cal100.npz", out_dir=out, evaluate_file=False)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    assert set(before) == {"manifest.json", "model.float32.onnx"}

    def interrupted(path):  # the file is fully written in the temporary folder by now
        assert Path(path).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(run / "model.pt", "onnx", calibration=root / "cal100.npz", out_dir=out, evaluate_file=False)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before  # no temp folder, old files intact
    assert read_manifest(out)["file"]["sha256"] == before[first.model_file.name]

    def crash(*args, **kwargs):
        raise RuntimeError("converter crashed midway")

    monkeypatch.setattr(tflite_export, "convert_full_int8", crash)
    fresh = root / "atomic-tflite"
    with pytest.raises(RuntimeError):
        export(run / "model.pt", "tflite-int8", calibration=root / "cal100.npz", out_dir=fresh, evaluate_file=False)
    assert _export_dir_files(fresh) == []


def test_killed_export_leaves_only_a_hidden_folder_that_the_next_export_removes(workspace):
    root, run, _, _ = workspace
    out = root / "killed"
    code = ("import sys; from ghnq_deploy.export.pipeline import export; "
            "export(sys.argv[1], 'tflite', calibration=sys.argv[2], out_dir=sys.argv[3], evaluate_file=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / "model.pt"), str(root / "cal100.npz"), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until conversion has started
        if out.exists() and list(out.glob(".export-*.partial")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / FILE_NAMES["tflite"]).exists() and not (out / "manifest.json").exists()
    partial = list(out.glob(".export-*.partial"))
    assert len(partial) == 1 and partial[0].name.startswith(f".export-{proc.pid}-")
    result = export(run / "model.pt", "onnx", calibration=root / "cal100.npz", out_dir=out, evaluate_file=False)
    assert _export_dir_files(out) == ["manifest.json", "model.float32.onnx"] and result.manifest["evaluation"] is None


def test_a_float_file_that_breaks_parity_is_not_written(workspace):
    from ghnq_deploy.export.pipeline import ExportError

    root, run, _, _ = workspace
    out = root / "parity"
    with pytest.raises(ExportError, match="disagrees with torch"):  # any nonzero difference exceeds 0
        export(run / "model.pt", "onnx", calibration=root / "cal100.npz", out_dir=out, eval_count=50,
               parity_tolerance=0.0)
    assert _export_dir_files(out) == []
    ok = export(run / "model.pt", "onnx", calibration=root / "cal100.npz", out_dir=out, eval_count=50)
    assert ok.manifest["evaluation"]["max_abs_logit_diff_vs_torch"] <= 1e-4
