"""DPO and cDPO against the DPO paper's eq. 12, its analytic gradient and the smoothed optimum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spo_align.losses.dpo import DPOLoss, dpo_loss
from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss, loss_optimum, reward_scale
from tests.losses.closed_form import grads, leaves, log_sigmoid, sigmoid

torch.set_num_threads(1)


# Points (policy chosen, policy rejected, ref chosen, ref rejected): right-ranked, wrong-ranked, tied.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-30.0, -11.0, -25.0, -13.0), (-5.0, -7.0, -5.0, -7.0)]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.1, 0.1), (1.5, 0.3)])
def test_dpo_value_and_gradient_match_eq_12(point, beta, eps):
    pc, pr, rc, rr = point
    u = beta * ((pc - rc) - (pr - rr))
    inputs = leaves(*point)
    out = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    assert out.losses.item() == pytest.approx(-(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u), rel=1e-12)
    du = beta * (-(1 - eps) * sigmoid(-u) + eps * sigmoid(u))
    assert grads(out.losses, inputs) == pytest.approx([du, -du, -du, du], rel=1e-10, abs=1e-14)
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=beta, label_smoothing=eps).losses, inputs)


def test_dpo_without_smoothing_is_minus_log_sigmoid():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g) * 20 for _ in range(4))
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.0)
    assert torch.equal(out.losses, -F.logsigmoid(beta * ((pc - rc) - (pr - rr))))


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_cdpo_optimum_is_at_log_odds_of_the_smoothing(eps):
    beta = 0.25
    delta = math.log((1 - eps) / eps) / beta
    inputs = leaves(-10.0 + delta, -10.0, -10.0, -10.0)
    out = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    assert grads(out.losses, inputs) == pytest.approx([0.0] * 4, abs=1e-12)
    if eps == 0.1:
        assert beta * delta == pytest.approx(math.log(9))


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_dpo_rejects_smoothing_outside_half_open_unit_half(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*leaves(0.0, 0.0, 0.0, 0.0), beta=0.1, label_smoothing=eps)


def test_the_recipe_section_builds_dpo_loss(x_seed: int = 0):
    g = torch.Generator().manual_seed(x_seed)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 9, (5,), generator=g) for _ in range(2))
    got = build_pair_loss(DPOLoss(type="dpo", beta=0.3, label_smoothing=0.2))(PairInputs(pc, pr, nc, nr, rc, rr))
    want = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
    assert set(got.terms) == set(want.terms)


def test_entry_states_the_smoothed_optimum_and_none_without_smoothing():
    assert loss_optimum(DPOLoss(type="dpo", beta=0.1, label_smoothing=0.1))["margin"] == pytest.approx(10 * math.log(9))
    assert loss_optimum(DPOLoss(type="dpo", beta=0.1, label_smoothing=0.0)) == {"margin": None}
    assert reward_scale(DPOLoss(type="dpo", beta=0.3)) == 0.3
