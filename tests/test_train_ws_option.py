"""`train --weight-standardization`: on for a fresh GHN by default, refused where it could not act."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ghnq_deploy.ghn.train import TrainConfig, make_ghn


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ghnq_deploy", "train", *args], capture_output=True, text=True,
                          timeout=300)


def test_a_fresh_ghn_standardises_by_default_and_the_option_turns_it_off(tmp_path):
    assert make_ghn(TrainConfig(out_dir=str(tmp_path))).config.weight_standardization is True
    off = make_ghn(TrainConfig(out_dir=str(tmp_path), ghn={"weight_standardization": False}))
    assert off.config.weight_standardization is False


@pytest.mark.parametrize("extra", [["--resume"], ["--init-from", "default"]])
def test_the_option_is_refused_where_the_ghn_keeps_its_own_setting(tmp_path, extra):
    done = _cli("-o", str(tmp_path / "run"), "--steps", "1", "--no-weight-standardization", *extra)
    assert done.returncode == 2 and "applies to a fresh GHN" in done.stderr and "Traceback" not in done.stderr


def test_a_resumed_run_keeps_its_own_ghn_config(tmp_path):
    """A run started without weight standardisation resumes without it, though fresh GHNs now have it."""
    import torch

    from ghnq_deploy.ghn.train import train

    base = dict(out_dir=str(tmp_path / "run"), steps=2, batch_size=8, meta_batch=1, train_images=64,
                checkpoint_every=1, log_every=1, seed=3, precision="fp32")
    train(TrainConfig(**base, ghn={"weight_standardization": False}), stop_after=1)
    train(TrainConfig(**base), resume=True)
    final = torch.load(tmp_path / "run" / "ghn.pt", weights_only=True)
    assert final["config"]["weight_standardization"] is False
