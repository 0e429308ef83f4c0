"""training/gpu_resume.py, run on the CPU: it continues a run's last.pt exactly as train would,
consumes ``ratio`` campaign steps per update, and leaves a state the CPU campaign resumes from."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.train import TrainConfig, train

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.skipif(
    not any(p and os.path.isdir(p) for p in (os.environ.get("GHNQ_CIFAR10"), "/work/shared/data/cifar10")),
    reason="needs the CIFAR-10 copy",
)]
SCRIPT = Path(__file__).resolve().parent.parent / "training" / "gpu_resume.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), steps=8, batch_size=8, meta_batch=2, train_images=128, checkpoint_every=1,
                log_every=1, seed=6, space=1, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    run = tmp_path / "run"
    train(_cfg(run), stop_after=2)
    return run


def test_one_step_per_update_equals_trains_own_next_step(stopped_run, tmp_path):
    cpu = tmp_path / "cpu"
    shutil.copytree(stopped_run, cpu)
    train(_cfg(cpu), resume=True, stop_after=1)
    _script().gpu_resume(stopped_run, tmp_path / "gpu", minutes=5, ratio=1, device="cpu", precision="fp32",
                         max_updates=1)
    a = torch.load(cpu / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "gpu" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for k, v in a["ghn"]["state_dict"].items():
        torch.testing.assert_close(b["ghn"]["state_dict"][k], v, rtol=1e-5, atol=1e-7, msg=k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_a_window_consumes_ratio_steps_per_update_and_the_cpu_run_resumes_from_it(stopped_run, tmp_path):
    out = tmp_path / "gpu"
    summary = _script().gpu_resume(stopped_run, out, minutes=5, ratio=2, device="cpu", max_updates=2)
    assert (summary["from_step"], summary["to_step"], summary["updates"], summary["meta_batch"]) == (2, 6, 2, 4)
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 4, 6]  # the campaign's own lines, then one per update
    assert all(r["device"] == "cpu" and r["meta_batch"] == 4 for r in log[2:])
    assert json.loads((out / "gpu_window.json").read_text())["to_step"] == 6
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["train_config"]["meta_batch"] == 2  # the campaign's settings
    # merged back: the CPU campaign resumes from it with its own command and finishes
    final = train(_cfg(out), resume=True)
    ghn, info = load_ghn_checkpoint(final)
    assert info["meta"]["steps"] == 8
    assert [r["step"] for r in _log(out)] == [1, 2, 4, 6, 7, 8]


def test_the_budget_stops_the_window_after_the_update_that_reaches_it(stopped_run, tmp_path):
    summary = _script().gpu_resume(stopped_run, tmp_path / "gpu", minutes=1e-4, ratio=1, device="cpu")
    assert summary["updates"] == 1 and summary["to_step"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_one_error_line(stopped_run, tmp_path, capsys):
    assert _script().main([str(stopped_run), "-o", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: no CUDA device is available to torch on this machine"]
    assert not (tmp_path / "gpu").exists()
