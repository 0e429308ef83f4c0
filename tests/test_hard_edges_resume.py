"""``train --resume`` refuses what it cannot continue: no last.pt, a broken one, changed settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ghnq_deploy.ghn.train import TrainConfig, train
from hard_edges_helpers import assert_one_error_line, invoke

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.skipif(
    not any(p and os.path.isdir(p) for p in (os.environ.get("GHNQ_CIFAR10"), "/work/shared/data/cifar10")),
    reason="needs the CIFAR-10 copy",
)]
BASE = ["--steps", "3", "--batch-size", "8", "--meta-batch", "2", "--train-images", "64", "--seed", "5",
        "--checkpoint-every", "1"]


def test_resume_without_last_pt_is_refused(tmp_path):
    line = assert_one_error_line(invoke("train", "--resume", "--output", str(tmp_path / "run"), *BASE))
    assert "no training state to resume from" in line
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    cfg = TrainConfig(out_dir=str(out), steps=3, batch_size=8, meta_batch=2, train_images=64, seed=5,
                      checkpoint_every=1, log_every=1)
    train(cfg, stop_after=1)
    assert (out / "last.pt").exists()
    return out


@pytest.mark.parametrize(("change", "needle"), [
    (["--batch-size", "16"], "batch_size 8 -> 16"),
    (["--meta-batch", "3"], "meta_batch 2 -> 3"),
    (["--seed", "6"], "seed 5 -> 6"),
    (["--lr", "0.01"], "lr 0.001 -> 0.01"),
])
def test_resume_with_changed_settings_is_refused(stopped_run: Path, change, needle):
    before = (stopped_run / "last.pt").read_bytes()
    args = list(BASE)
    flag = change[0]
    if flag in args:
        i = args.index(flag)
        args[i + 1] = change[1]
    else:
        args += change
    line = assert_one_error_line(invoke("train", "--resume", "--output", str(stopped_run), *args))
    assert needle in line and "--resume with changed settings" in line
    assert (stopped_run / "last.pt").read_bytes() == before  # nothing touched


def test_resume_with_the_same_settings_continues(stopped_run: Path):
    result = invoke("train", "--resume", "--output", str(stopped_run), *BASE)
    assert result.code == 0, result.stderr[-2000:]
    assert (stopped_run / "ghn.pt").exists()
