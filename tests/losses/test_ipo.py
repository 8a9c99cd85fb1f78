"""IPO against its closed form and gradient, and matched to SPO's margin optimum."""

from __future__ import annotations

import pytest
import torch

from spo_align.losses.ipo import IPOLoss, ipo_loss, tau_matching_spo
from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss, loss_optimum, reward_scale
from spo_align.losses.spo import spo_f
from tests.losses.closed_form import grads, leaves

torch.set_num_threads(1)


# Points (policy chosen, policy rejected, ref chosen, ref rejected): right-ranked, wrong-ranked, tied.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-30.0, -11.0, -25.0, -13.0), (-5.0, -7.0, -5.0, -7.0)]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0])
def test_ipo_value_and_gradient_match_closed_form(point, tau):
    pc, pr, rc, rr = point
    delta = (pc - rc) - (pr - rr)
    inputs = leaves(*point)
    out = ipo_loss(*inputs, tau=tau)
    assert out.losses.item() == pytest.approx((delta - 1 / (2 * tau)) ** 2, rel=1e-12)
    d = 2 * (delta - 1 / (2 * tau))
    assert grads(out.losses, inputs) == pytest.approx([d, -d, -d, d], rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(2 * tau * (pc - rc))
    assert torch.autograd.gradcheck(lambda *x: ipo_loss(*x, tau=tau).losses, inputs)


@pytest.mark.parametrize("beta", [0.05, 0.2, 1.0, 4.0])
def test_ipo_matched_to_spo_shares_the_margin_optimum(beta):
    tau = tau_matching_spo(beta)
    assert tau == beta / 2
    # Both derivatives in delta vanish at delta = 1/beta ...
    inputs = leaves(-8.0 + 1.0 / beta, -8.0, -8.0, -8.0)
    ipo_grad = grads(ipo_loss(*inputs, tau=tau).losses, inputs)
    spo_margin = spo_f(beta * ((inputs[0] - inputs[2]) - (inputs[1] - inputs[3])))
    spo_grad = grads(spo_margin, inputs)
    assert ipo_grad == pytest.approx([0.0] * 4, abs=1e-12)
    assert spo_grad == pytest.approx([0.0] * 4, abs=1e-12)
    # ... and over a grid of margins both are smallest at the same point.
    delta = torch.linspace(-2.0 / beta, 4.0 / beta, 6001, dtype=torch.float64)
    zero = torch.zeros_like(delta)
    ipo_argmin = delta[ipo_loss(delta, zero, zero, zero, tau=tau).losses.argmin()]
    spo_argmin = delta[spo_f(beta * delta).argmin()]
    assert ipo_argmin.item() == pytest.approx(1.0 / beta) and spo_argmin.item() == pytest.approx(1.0 / beta)


def test_match_spo_beta_resolves_through_the_same_formula():
    assert IPOLoss(type="ipo", match_spo_beta=0.3).resolved_tau == tau_matching_spo(0.3) == 0.15
    assert IPOLoss(type="ipo", tau=0.07).resolved_tau == 0.07
    with pytest.raises(ValueError, match="exactly one of 'tau' or 'match_spo_beta'"):
        IPOLoss(type="ipo", tau=0.1, match_spo_beta=0.2)


def test_the_recipe_section_builds_ipo_loss(x_seed: int = 0):
    g = torch.Generator().manual_seed(x_seed)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 9, (5,), generator=g) for _ in range(2))
    got = build_pair_loss(IPOLoss(type="ipo", match_spo_beta=0.4))(PairInputs(pc, pr, nc, nr, rc, rr))
    want = ipo_loss(pc, pr, rc, rr, tau=0.2)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
    assert set(got.terms) == set(want.terms)


def test_entry_states_the_optimum_and_a_reward_scale_of_two_tau():
    assert loss_optimum(IPOLoss(type="ipo", tau=0.1)) == pytest.approx({"margin": 5.0})
    assert reward_scale(IPOLoss(type="ipo", tau=0.1)) == pytest.approx(0.2)
