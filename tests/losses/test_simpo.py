"""SimPO against its float64 closed form and gradient, per-token means and empty answers."""

from __future__ import annotations

import math

import pytest
import torch

from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import CATALOGUE, build_pair_loss, loss_optimum, reward_scale
from spo_align.losses.simpo import SimPOLoss, simpo_loss
from tests.losses.closed_form import grads, leaves, log_sigmoid, sigmoid

torch.set_num_threads(1)


@pytest.mark.parametrize("point", [(-12.0, -20.0, 4, 5), (-30.0, -11.0, 10, 3), (-0.5, -0.5, 1, 1)])
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.0), (10.0, 3.0)])
def test_simpo_value_and_gradient_match_the_closed_form(point, beta, gamma):
    pc, pr, nc, nr = point
    u = beta * (pc / nc - pr / nr) - gamma
    logps = leaves(pc, pr)
    tokens = torch.tensor([nc]), torch.tensor([nr])
    out = simpo_loss(*logps, *tokens, beta=beta, gamma=gamma)
    assert out.losses.item() == pytest.approx(-log_sigmoid(u), rel=1e-12)
    g = -sigmoid(-u) * beta
    assert grads(out.losses, logps) == pytest.approx([g / nc, -g / nr], rel=1e-10)
    # Reference-free rewards: beta x per-token mean log-prob.
    assert out.chosen_rewards.item() == pytest.approx(beta * pc / nc)
    assert out.rejected_rewards.item() == pytest.approx(beta * pr / nr)
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, *tokens, beta=beta, gamma=gamma).losses, logps)


def test_simpo_loss_is_log_2_where_the_per_token_margin_is_gamma_over_beta():
    beta, gamma = 2.5, 1.25
    margin = gamma / beta
    out = simpo_loss(torch.tensor([-3.0 + 4 * margin]), torch.tensor([-6.0]), torch.tensor([4]), torch.tensor([8]),
                     beta=beta, gamma=gamma)
    # chosen per token = -0.75 + margin, rejected per token = -0.75: the loss is log 2 and still falling.
    assert out.losses.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_simpo_depends_on_length_only_through_per_token_means():
    a = simpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]), beta=2.0, gamma=0.5)
    b = simpo_loss(torch.tensor([-40.0]), torch.tensor([-60.0]), torch.tensor([20]), torch.tensor([30]), beta=2.0, gamma=0.5)
    torch.testing.assert_close(a.losses, b.losses)


def test_simpo_counts_an_empty_answer_as_one_token_and_checks_shapes():
    out = simpo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0]), torch.tensor([1]), beta=1.0, gamma=0.0)
    assert torch.isfinite(out.losses).all() and out.losses.item() == pytest.approx(-log_sigmoid(2.0))
    with pytest.raises(ValueError, match="chosen_tokens has shape"):
        simpo_loss(torch.zeros(3), torch.zeros(3), torch.ones(2), torch.ones(3), beta=1.0, gamma=0.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        simpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), beta=1.0, gamma=-0.1)


def test_the_recipe_section_builds_simpo_loss(x_seed: int = 0):
    g = torch.Generator().manual_seed(x_seed)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 9, (5,), generator=g) for _ in range(2))
    got = build_pair_loss(SimPOLoss(type="simpo", beta=2.5, gamma=1.5))(PairInputs(pc, pr, nc, nr, rc, rr))
    want = simpo_loss(pc, pr, nc, nr, beta=2.5, gamma=1.5)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
    assert set(got.terms) == set(want.terms)


def test_entry_is_reference_free_with_rewards_that_are_no_log_ratio():
    loss = SimPOLoss(type="simpo", beta=2.0, gamma=1.0)
    assert not CATALOGUE["simpo"].needs_reference
    assert loss_optimum(loss) == {"per_token_margin": None, "gamma_over_beta": 0.5}
    assert reward_scale(loss) is None
