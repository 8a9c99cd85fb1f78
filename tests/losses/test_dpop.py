"""DPOP against its float64 closed form and gradient, and what its penalty does to the chosen answer."""

from __future__ import annotations

import pytest
import torch

from spo_align.losses.dpo import dpo_loss
from spo_align.losses.dpop import DPOPLoss, dpop_loss
from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss, loss_optimum, reward_scale
from tests.losses.closed_form import grads, leaves, log_sigmoid, sigmoid

torch.set_num_threads(1)


# (policy chosen, policy rejected, ref chosen, ref rejected): chosen above its reference, chosen below it
# (the case DPOP penalises), and a wrong-ranked pair with the chosen answer below its reference.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-15.0, -25.0, -12.0, -16.0), (-30.0, -11.0, -25.0, -13.0)]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("beta,lam", [(0.1, 50.0), (0.5, 5.0), (2.0, 0.0)])
def test_dpop_value_and_gradient_match_the_closed_form(point, beta, lam):
    pc, pr, rc, rr = point
    c, r = pc - rc, pr - rr
    penalty = lam * max(0.0, -c)
    u = beta * (c - r - penalty)
    inputs = leaves(*point)
    out = dpop_loss(*inputs, beta=beta, lambda_=lam)
    assert out.losses.item() == pytest.approx(-log_sigmoid(u), rel=1e-12)
    assert out.terms["dpop_penalty"].item() == pytest.approx(penalty, abs=1e-12)
    # du/dc = beta * (1 + lam) below the reference, beta above it; du/dr = -beta.
    dc = beta * ((1.0 + lam) if c < 0 else 1.0)
    g = -sigmoid(-u)
    assert grads(out.losses, inputs) == pytest.approx([g * dc, -g * beta, -g * dc, g * beta], rel=1e-10)
    assert out.chosen_rewards.item() == pytest.approx(beta * c) and not out.chosen_rewards.requires_grad
    assert torch.autograd.gradcheck(lambda *x: dpop_loss(*x, beta=beta, lambda_=lam).losses, inputs)


def test_dpop_with_lambda_zero_or_chosen_above_reference_is_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    assert torch.equal(dpop_loss(pc, pr, rc, rr, beta=0.3, lambda_=0.0).losses, dpo_loss(pc, pr, rc, rr, beta=0.3).losses)
    above = rc + (pc - rc).abs()  # chosen log-ratio >= 0: no penalty whatever lambda
    torch.testing.assert_close(
        dpop_loss(above, pr, rc, rr, beta=0.3, lambda_=50.0).losses, dpo_loss(above, pr, rc, rr, beta=0.3).losses
    )


def test_dpop_makes_trading_the_chosen_answer_for_margin_a_loss():
    """docs/losses.md: below the reference, a step that lowers the chosen log-prob by 1 and the rejected
    one by k improves DPO whenever k > 1 but DPOP only when k > 1 + lambda."""
    beta, lam = 0.1, 5.0
    start = [-10.5, -12.0, -10.0, -12.0]  # chosen log-ratio -0.5

    def both(k: float) -> tuple[float, float]:
        moved = [start[0] - 1.0, start[1] - k, start[2], start[3]]
        before = [t.item() for t in (dpo_loss(*leaves(*start), beta=beta).losses, dpop_loss(*leaves(*start), beta=beta, lambda_=lam).losses)]
        after = [t.item() for t in (dpo_loss(*leaves(*moved), beta=beta).losses, dpop_loss(*leaves(*moved), beta=beta, lambda_=lam).losses)]
        return after[0] - before[0], after[1] - before[1]

    dpo_change, dpop_change = both(3.0)
    assert dpo_change < 0 < dpop_change
    dpo_change, dpop_change = both(1.0 + lam + 0.5)
    assert dpo_change < 0 and dpop_change < 0


def test_dpop_rejects_a_negative_lambda():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        dpop_loss(*leaves(0.0, 0.0, 0.0, 0.0), beta=0.1, lambda_=-1.0)


def test_the_recipe_section_builds_dpop_loss(x_seed: int = 0):
    g = torch.Generator().manual_seed(x_seed)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 9, (5,), generator=g) for _ in range(2))
    got = build_pair_loss(DPOPLoss.model_validate({"type": "dpop", "beta": 0.1, "lambda": 7}))(PairInputs(pc, pr, nc, nr, rc, rr))
    want = dpop_loss(pc, pr, rc, rr, beta=0.1, lambda_=7.0)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
    assert set(got.terms) == set(want.terms)


def test_entry_states_no_optimum_and_beta_as_the_reward_scale():
    assert loss_optimum(DPOPLoss.model_validate({"type": "dpop", "beta": 0.1, "lambda": 50})) == {"margin": None}
    assert reward_scale(DPOPLoss.model_validate({"type": "dpop", "beta": 0.3})) == 0.3


def test_resolved_dpop_recipe_writes_lambda_and_loads_again(tmp_path):
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve

    path = tmp_path / "dpop.yaml"
    path.write_text(
        "stage: preference\nmodel: {name_or_path: outputs/sft}\ndata: {train: [{path: pairs.jsonl, format: pairs}]}\n"
        "loss: {type: dpop, lambda: 5}\ntraining: {learning_rate: 1.0e-6}\noutput: {dir: outputs/dpop}\n",
        encoding="utf-8",
    )
    plan = resolve(load_recipe(path), path)
    assert plan.recipe_dict()["loss"] == {"type": "dpop", "beta": 0.1, "lambda": 5.0, "nll_weight": 0.0}
    again = tmp_path / "resolved.yaml"
    again.write_text(plan.to_yaml(), encoding="utf-8")
    loss = load_recipe(again).loss
    assert isinstance(loss, DPOPLoss) and loss.lambda_ == 5.0
    assert "optimum" in plan.to_yaml() and "no finite optimum" in plan.to_yaml()
