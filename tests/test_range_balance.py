"""The range-balance penalty: what it measures on hand-made weights, and that its gradient balances them."""

from __future__ import annotations

import pytest
import torch

from ghnq_deploy.quant.range_balance import channel_noise_ratio, range_balance_penalty
from ghnq_deploy.quant.scheme import get_scheme, fake_quant_weight


def test_noise_ratio_on_known_values():
    # range [-1, 2] on 4 bits: step 3 / 15 = 0.2, noise power 0.04 / 12; channel powers 2.5 and 0.01
    w = torch.tensor([[-1.0, 2.0], [0.1, -0.1]])
    nsr = channel_noise_ratio(w, bits=4)
    assert nsr.tolist() == pytest.approx([0.04 / 12 / 2.5, 0.04 / 12 / 0.01])
    # an all-positive tensor's grid still holds zero: range [0, 3]
    assert channel_noise_ratio(torch.tensor([[1.0, 3.0]]), 4).item() == pytest.approx((3 / 15) ** 2 / 12 / 5.0)


def test_penalty_is_scale_invariant_and_bounded():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    p = range_balance_penalty([w]).item()
    assert range_balance_penalty([w * 1000.0]).item() == pytest.approx(p, rel=1e-5)
    dead = w.clone()
    dead[0] *= 1e-9  # a dead channel counts at most 1 / 8
    assert range_balance_penalty([dead]).item() <= p + 1 / 8 + 1e-6
    assert range_balance_penalty([]) is None


def test_one_large_channel_is_penalised_and_its_gradient_balances_the_layer():
    """A layer whose per-tensor range one channel sets loses the others at 4 bits; descent fixes that."""
    torch.manual_seed(0)
    base = torch.randn(6, 16)
    scale = torch.ones(6, 1)
    scale[0] = 20.0
    balanced = range_balance_penalty([base]).item()
    skewed = range_balance_penalty([base * scale]).item()
    assert skewed > 3 * balanced

    def quant_error(w):
        wq, _ = fake_quant_weight(w, get_scheme("paper", "w4a8"))
        per_channel = ((wq - w) ** 2).mean(1) / (w ** 2).mean(1)
        return per_channel[1:].mean().item()  # the small channels' relative error

    log_scale = torch.zeros(6, 1, requires_grad=True)
    opt = torch.optim.SGD([log_scale], lr=0.5)
    before = quant_error(base * scale)
    for _ in range(100):
        opt.zero_grad()
        range_balance_penalty([base * scale * log_scale.exp()]).backward()
        opt.step()
    after = quant_error((base * scale * log_scale.exp()).detach())
    assert range_balance_penalty([base * scale * log_scale.exp()]).item() < 0.5 * skewed
    assert after < 0.5 * before
