"""`ghnq-deploy finetune` end to end: exact resume after kill -9, export picks it up, bad data is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_helpers import QUICK, cli, cli_args, copy_workspace, env, predicted_workspace, run_main
from ghnq_deploy.data import load_cifar10


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The tiny net predicted once for the module; each test works on its own copy."""
    tmp = tmp_path_factory.mktemp("template")
    predicted_workspace(tmp)
    return tmp


def _train_records(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "train"]


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_after_kill_9_continues_exactly_and_the_log_has_no_gap(template, tmp_path):
    run = copy_workspace(template, tmp_path)
    args = ["finetune", "--workspace", "ws", "--steps", "30", "--checkpoint-every", "5", "--log-every", "1",
            "--val-every", "10", *QUICK]
    whole = cli(*args, "-o", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    log = tmp_path / "killed" / "finetune_log.jsonl"
    proc = subprocess.Popen(cli_args(*args, "-o", "killed"), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(r["step"] >= 8 for r in _train_records(log)):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "model.pt").exists()
    before = [r["step"] for r in _train_records(log)]
    assert before[-1] < 30
    resumed = cli(*args, "-o", "killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "whole" / "model.pt"), _weights(tmp_path / "killed" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, want = _train_records(log), _train_records(tmp_path / "whole" / "finetune_log.jsonl")
    assert [r["step"] for r in got] == list(range(1, 31))  # every step once: no gap, no repeat
    assert [r["loss"] for r in got] == [r["loss"] for r in want] and [r["lr"] for r in got] == [r["lr"] for r in want]
    vals = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "val"]
    assert vals == [0, 10, 20, 30]
    assert not list((tmp_path / "killed").glob(".*.partial"))
    # a resume with other settings is refused in one line
    other = cli(*args[:-len(QUICK)], *QUICK[:-2], "--lr", "0.01", "-o", "killed", "--resume", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "lr 0.05 -> 0.01" in other.stderr
    assert run.is_dir()


def test_the_finetuned_model_is_what_export_picks_up_with_its_ancestry(template, tmp_path):
    run = copy_workspace(template, tmp_path)
    done = cli("finetune", "--workspace", "ws", "--steps", "8", "--val-every", "4", "--json", *QUICK, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    tuned = run / "finetune" / "model.pt"
    assert summary["model_file"] == str(Path("ws/tiny/finetune/model.pt")) and summary["run_model"] is True
    assert (run / "MODEL").read_text().strip() == "finetune/model.pt" and (run / "model.pt").is_file()
    exported = cli("export", "--target", "onnx", "--workspace", "ws", "--no-eval", "--json", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)["manifest"]
    assert Path(manifest["predicted_model"]["file"]) == Path("ws/tiny/finetune/model.pt")
    assert (run / "finetune" / "export" / "onnx" / "manifest.json").is_file()
    prediction = torch.load(run / "model.pt", weights_only=True)["meta"]
    anc = manifest["ancestry"]
    assert anc["ghn_checkpoint"]["sha256"] == prediction["ghn"]["sha256"] == manifest["ghn_checkpoint"]["sha256"]
    assert anc["prediction"]["seed"] == prediction["seed"] and anc["prediction"]["file"].endswith("tiny/model.pt")
    assert anc["finetune"]["init"] == "ghn" and anc["finetune"]["steps"] == 8 and anc["finetune"]["bits"] == "w8a8"
    assert anc["finetune"]["config"]["scheme"] == "tflite-int8"
    # --model picks the prediction; its export records no fine-tune
    plain = cli("export", "--target", "onnx", "--workspace", "ws", "--model", str(run / "model.pt"), "--no-eval",
                "--json", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["manifest"]["ancestry"]["finetune"] is None
    assert (run / "export" / "onnx" / "manifest.json").is_file()
    # random init: no GHN in the ancestry
    rnd = cli("finetune", "--workspace", "ws", "--model", str(run / "model.pt"), "--init", "random", "--steps", "2",
              "-o", str(run / "ft-random"), "--json", *QUICK, cwd=tmp_path)
    assert rnd.returncode == 0, rnd.stderr
    meta = torch.load(run / "ft-random" / "model.pt", weights_only=True)["meta"]
    assert meta["ancestry"]["ghn_checkpoint"] is None and meta["ancestry"]["prediction"]["used_as_start"] is False
    assert (run / "MODEL").read_text().strip() == "ft-random/model.pt"
    assert tuned.is_file()
    # predicting again makes the new prediction the run's model
    again = cli("predict", "tiny.json", "--workspace", "ws", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (run / "MODEL").exists()


def _png_folder(root: Path, classes: int, per_class: int, size: int = 32) -> Path:
    from PIL import Image

    images = load_cifar10("val")
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        rows = np.flatnonzero(images.labels == c)[:per_class]
        for i, r in enumerate(rows):
            img = Image.fromarray(images.images[r])
            (img if size == 32 else img.resize((size, size))).save(folder / f"{i}.png")
    return root


def test_an_image_folder_trains_and_validates_on_held_out_images(template, tmp_path, capsys, monkeypatch):
    copy_workspace(template, tmp_path)
    data = _png_folder(tmp_path / "imgs", 10, 12)
    code, out, err = run_main(["finetune", "--workspace", "ws", "--data", str(data), "--steps", "4", "--val-fraction",
                               "0.25", "--batch-size", "16", "--threads", "1", "--json"], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["validation"].endswith("held-out 0.25") and summary["train_images"] == 90


@pytest.mark.parametrize("case, message", [
    ("size", "image is 24x24, the net takes 32x32"),
    ("classes", "3 class folders, the net has 10 classes"),
    ("empty", "empty folder"),
    ("empty-class", "empty class folder"),
    ("not-images", "not an image"),
])
def test_bad_data_is_one_clear_line(template, tmp_path, case, message, capsys, monkeypatch):
    copy_workspace(template, tmp_path)
    data = tmp_path / "data"
    if case == "size":
        _png_folder(data, 10, 2, size=24)
    elif case == "classes":
        _png_folder(data, 3, 2)
    elif case == "empty":
        data.mkdir()
    elif case == "empty-class":
        _png_folder(data, 10, 2)
        for f in (data / "class4").iterdir():
            f.unlink()
    else:
        _png_folder(data, 10, 2)
        (data / "class2" / "0.png").write_text("these are not pixels\n")
    code, out, err = run_main(["finetune", "--workspace", "ws", "--data", str(data), "--steps", "2"], tmp_path, capsys,
                              monkeypatch)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "ws" / "tiny" / "MODEL").exists()
