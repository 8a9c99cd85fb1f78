"""NCA against its float64 closed form and analytic gradient, the chosen optimum at ln 2 / beta, and the
rejected answer's missing one."""

from __future__ import annotations

import math

import pytest
import torch

from spo_align.losses.nca import NCALoss, nca_loss
from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss, loss_optimum, reward_scale
from tests.losses.closed_form import grads, leaves, log_sigmoid, sigmoid

torch.set_num_threads(1)

# (policy chosen, policy rejected, ref chosen, ref rejected): chosen above its reference, chosen below it,
# a wrong-ranked pair, and a tie at the reference.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-15.0, -25.0, -12.0, -16.0), (-30.0, -11.0, -25.0, -13.0), (-5.0, -7.0, -5.0, -7.0)]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_nca_value_and_gradient_match_the_closed_form(point, beta):
    pc, pr, rc, rr = point
    u, v = beta * (pc - rc), beta * (pr - rr)
    inputs = leaves(*point)
    out = nca_loss(*inputs, beta=beta)
    assert out.losses.item() == pytest.approx(-log_sigmoid(u) - 0.5 * log_sigmoid(-u) - 0.5 * log_sigmoid(-v), rel=1e-12)
    dc = beta * (1.5 * sigmoid(u) - 1.0)  # d/dc of -log s(beta c) - 1/2 log s(-beta c)
    dr = beta * 0.5 * sigmoid(v)  # d/dr of -1/2 log s(-beta r)
    assert grads(out.losses, inputs) == pytest.approx([dc, dr, -dc, -dr], rel=1e-10, abs=1e-14)
    assert out.chosen_rewards.item() == pytest.approx(u) and out.rejected_rewards.item() == pytest.approx(v)
    assert not out.chosen_rewards.requires_grad and out.terms == {}
    assert torch.autograd.gradcheck(lambda *x: nca_loss(*x, beta=beta).losses, inputs)


@pytest.mark.parametrize("beta", [0.05, 0.2, 1.0])
def test_the_chosen_log_ratio_settles_at_ln2_over_beta(beta):
    """d/dc vanishes where s(beta c) = 2/3, and it is a minimum: the loss is convex in c."""
    c_star = math.log(2.0) / beta
    inputs = leaves(-10.0 + c_star, -12.0, -10.0, -12.0)
    assert grads(nca_loss(*inputs, beta=beta).losses, inputs)[0] == pytest.approx(0.0, abs=1e-12)
    c = torch.linspace(-4.0 / beta, 6.0 / beta, 20001, dtype=torch.float64)
    zero = torch.zeros_like(c)
    losses = nca_loss(c, zero, zero, zero, beta=beta).losses
    assert c[losses.argmin()].item() == pytest.approx(c_star, abs=10.0 / beta / 20000)
    assert (losses.diff().diff() >= -1e-12).all()  # convex along c
    assert loss_optimum(NCALoss(type="nca", beta=beta))["chosen_log_ratio"] == pytest.approx(c_star)


def test_the_rejected_answer_has_no_finite_optimum_and_its_push_fades():
    beta = 0.5
    r = torch.tensor([-40.0, -20.0, -5.0, 0.0, 5.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(5, dtype=torch.float64)
    out = nca_loss(zero, r, zero, zero, beta=beta)
    (grad,) = torch.autograd.grad(out.losses.sum(), r)
    assert (grad > 0).all() and (out.losses.diff() > 0).all()  # lower is always better, however low
    assert grad.tolist() == pytest.approx([0.5 * beta * sigmoid(beta * v) for v in r.tolist()], rel=1e-12)
    assert grad[0].item() < 1e-9  # ... and at 40 nats below the reference the push has all but stopped
    assert loss_optimum(NCALoss(type="nca", beta=beta)) == pytest.approx(
        {"chosen_log_ratio": math.log(2.0) / beta, "rejected_log_ratio": None, "margin": None}
    )


def test_nca_keeps_a_falling_chosen_answer_from_paying_for_the_margin():
    """DPO sees only the margin; NCA also scores the chosen answer alone, so lowering both answers by the same
    amount (the margin unchanged) raises NCA's loss where DPO's does not move."""
    from spo_align.losses.dpo import dpo_loss

    before = [torch.tensor([v], dtype=torch.float64) for v in (-10.0, -14.0, -10.0, -12.0)]
    after = [before[0] - 3.0, before[1] - 3.0, before[2], before[3]]
    assert nca_loss(*after, beta=0.5).losses.item() > nca_loss(*before, beta=0.5).losses.item()
    assert dpo_loss(*after, beta=0.5).losses.item() == pytest.approx(dpo_loss(*before, beta=0.5).losses.item())


def test_the_recipe_section_builds_nca_loss():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    n = torch.randint(1, 9, (5,), generator=g)
    got = build_pair_loss(NCALoss(type="nca", beta=0.3))(PairInputs(pc, pr, n, n, rc, rr))
    want = nca_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
    assert reward_scale(NCALoss(type="nca", beta=0.3)) == 0.3
    with pytest.raises(ValueError, match="beta must be > 0"):
        nca_loss(*(torch.zeros(1) for _ in range(4)), beta=0.0)
