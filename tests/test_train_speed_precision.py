"""``train --precision``: bf16 autocast really runs where chosen, learns like fp32, is recorded,
and resumed runs keep their precision (runs from before the option: fp32)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ghnq_deploy.ghn.precision import PrecisionError, native_bf16, resolve_precision
from ghnq_deploy.ghn.train import TrainConfig, train
from hard_edges_helpers import assert_one_error_line, invoke

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.skipif(
    not any(p and os.path.isdir(p) for p in (os.environ.get("GHNQ_CIFAR10"), "/work/shared/data/cifar10")),
    reason="needs the CIFAR-10 copy",
)]
CAMPAIGN = Path(__file__).resolve().parent.parent / "training" / "ghnq-v3"


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), steps=24, batch_size=16, meta_batch=2, train_images=512, lr=2e-3,
                checkpoint_every=24, log_every=1, seed=4, space=1)
    base.update(kw)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_auto_is_bf16_exactly_where_the_hardware_has_it_and_names_are_checked():
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(PrecisionError, match="unknown precision 'fp16'"):
        resolve_precision("fp16")


def test_bf16_gives_the_same_loss_trend_as_fp32_and_is_not_a_silent_no_op(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        # whole-tensor normalisation: its loss falls fast from a high start, so 24 steps show a trend
        # (a weight-standardised GHN starts at the uniform loss; see test_ghn_train)
        train(_cfg(out, precision=precision, ghn={"weight_standardization": False}))
        log = _log(out)
        assert {r["precision"] for r in log} == {precision}
        assert json.loads((out / "train_config.json").read_text())["precision_ran"] == precision
        runs[precision] = np.array([r["raw_loss"] for r in log])
    fp32, bf16 = runs["fp32"], runs["bf16"]
    # autocast did something: the first step (same GHN, same nets and images) already differs,
    # by bf16's rounding and not more
    assert bf16[0] != fp32[0] and abs(bf16[0] - fp32[0]) < 0.02 * fp32[0]
    # the same trend: both fall, the first and last quarters' means agree within 10 %
    q = len(fp32) // 4
    for a, b in ((fp32[:q].mean(), bf16[:q].mean()), (fp32[-q:].mean(), bf16[-q:].mean())):
        assert abs(a - b) < 0.1 * a, (a, b)
    assert fp32[-q:].mean() < 0.9 * fp32[:q].mean() and bf16[-q:].mean() < 0.9 * bf16[:q].mean()


def test_a_new_run_defaults_to_auto_and_records_what_ran(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, steps=1))
    config = json.loads((out / "train_config.json").read_text())
    ran = "bf16" if native_bf16() else "fp32"
    assert (config["precision"], config["precision_ran"]) == ("auto", ran)
    assert _log(out)[0]["precision"] == ran


def _strip_precision(run: Path) -> None:
    """Make a run look as if it was started before --precision existed (as training/ghnq-v2)."""
    state = torch.load(run / "last.pt", weights_only=True)
    del state["train_config"]["precision"]
    torch.save(state, run / "last.pt")


@pytest.mark.parametrize(("given", "runs"), [(None, "fp32"), ("bf16", "bf16"), ("auto", None)])
def test_resuming_a_run_from_before_the_option(tmp_path, given, runs):
    """Its default is fp32, what it ran; an explicit --precision on resume is taken."""
    out = tmp_path / "run"
    train(_cfg(out, steps=3, checkpoint_every=1, precision="fp32"), stop_after=1)
    _strip_precision(out)
    train(_cfg(out, steps=3, checkpoint_every=1, precision=given), resume=True)
    want = runs or ("bf16" if native_bf16() else "fp32")
    assert [r["precision"] for r in _log(out)] == ["fp32", want, want]
    assert json.loads((out / "train_config.json").read_text())["precision_ran"] == want


def test_resuming_keeps_the_precision_the_run_recorded(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, steps=2, checkpoint_every=1, precision="bf16"), stop_after=1)
    train(_cfg(out, steps=2, checkpoint_every=1), resume=True)
    assert [r["precision"] for r in _log(out)] == ["bf16", "bf16"]


def test_the_campaign_checkpoint_resumes_with_its_own_precision_and_ghn(tmp_path):
    """training/ghnq-v3 continues from its committed last.pt: next step, the precision it recorded
    (auto: bf16 exactly where the CPU has it), and its own GHN config (weight standardisation on)."""
    run = tmp_path / "campaign"
    run.mkdir()
    for name in ("last.pt", "train_log.jsonl", "train_config.json"):
        shutil.copy2(CAMPAIGN / name, run / name)  # copied file by file: the live run replaces last.pt atomically
    before = torch.load(run / "last.pt", weights_only=True)
    saved = before["train_config"]
    cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in asdict(TrainConfig()) and k != "precision"},
                         "out_dir": str(run)})
    cfg.betas = tuple(cfg.betas)
    train(cfg, resume=True, stop_after=1)
    after = torch.load(run / "last.pt", weights_only=True)
    assert after["step"] == before["step"] + 1
    assert after["train_config"]["precision"] == saved["precision"] == "auto"
    assert after["ghn"]["config"]["weight_standardization"] is True
    last = _log(run)[-1]
    assert (last["step"], last["precision"]) == (before["step"] + 1, "bf16" if native_bf16() else "fp32")


def test_cli_refuses_an_unknown_precision(tmp_path):
    line = assert_one_error_line(invoke("train", "--precision", "fp16", "-o", str(tmp_path / "run"), "--steps", "1"))
    assert "--precision 'fp16' is not one of auto, bf16, fp32" in line
    assert not (tmp_path / "run").exists()
