"""SPO against its closed form, its analytic gradient, its optima, its floor and the paper's f."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_align.losses.pair import PairInputs
from spo_align.losses.registry import build_pair_loss, loss_optimum, reward_scale
from spo_align.losses.spo import DEFAULT_Z_FLOOR, SPOLoss, spo_f, spo_loss
from tests.losses.closed_form import f, f_prime, grads, leaves

torch.set_num_threads(1)


# Points (policy chosen, policy rejected, ref chosen, ref rejected): right-ranked, wrong-ranked, tied.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-30.0, -11.0, -25.0, -13.0), (-5.0, -7.0, -5.0, -7.0)]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("beta,alpha", [(0.1, 1.0), (0.5, 0.25), (2.0, 2.0)])
def test_spo_value_and_gradient_match_closed_form(point, beta, alpha):
    pc, pr, rc, rr = point
    z1, z2 = beta * ((pc - rc) - (pr - rr)), alpha * (rr - pr)
    inputs = leaves(*point)
    out = spo_loss(*inputs, beta=beta, alpha=alpha, z_floor=None)
    assert out.losses.item() == pytest.approx(f(z1) + f(z2), rel=1e-12)
    assert out.terms["spo_margin_term"].item() == pytest.approx(f(z1), rel=1e-12)
    assert out.terms["spo_rejected_term"].item() == pytest.approx(f(z2), rel=1e-12)
    d1, d2 = beta * f_prime(z1), alpha * f_prime(z2)
    expected = [d1, -d1 - d2, -d1, d1 + d2]
    assert grads(out.losses, inputs) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert torch.autograd.gradcheck(lambda *x: spo_loss(*x, beta=beta, alpha=alpha).losses, inputs)


def test_spo_gradient_vanishes_at_both_term_optima():
    beta, alpha = 0.2, 0.5
    ref_c, ref_r = -10.0, -12.0
    pr = ref_r - 1.0 / alpha  # alpha * (ref_l - pi_l) = 1
    pc = ref_c + 1.0 / beta + (pr - ref_r)  # beta * delta = 1, so chosen log-ratio = 1/beta - 1/alpha
    inputs = leaves(pc, pr, ref_c, ref_r)
    out = spo_loss(*inputs, beta=beta, alpha=alpha)
    assert grads(out.losses, inputs) == pytest.approx([0.0] * 4, abs=1e-12)
    assert out.losses.item() == pytest.approx(-2.0 / math.e, rel=1e-12)
    assert (out.chosen_rewards.item() / beta) == pytest.approx(1 / beta - 1 / alpha)
    # A minimum, not a saddle: moving either policy log-prob raises the loss.
    for i, step in [(0, 0.3), (0, -0.3), (1, 0.3), (1, -0.3)]:
        moved = [t.detach().clone() for t in inputs]
        moved[i] += step
        assert spo_loss(*moved, beta=beta, alpha=alpha).losses.item() > out.losses.item()


def test_spo_floor_is_c1_and_bounds_the_gradient():
    z0 = DEFAULT_Z_FLOOR
    z = torch.tensor([z0 - 1e4, z0 - 3.0, z0 - 1e-6, z0, z0 + 1e-6, 0.0, 1.0, 50.0], dtype=torch.float64)
    z.requires_grad_(True)
    value = spo_f(z)
    (grad,) = torch.autograd.grad(value.sum(), z)
    for zi, vi, gi in zip(z.tolist(), value.tolist(), grad.tolist()):
        if zi >= z0:
            assert vi == pytest.approx(f(zi), rel=1e-12) and gi == pytest.approx(f_prime(zi), rel=1e-9)
        else:  # the tangent at z0
            assert vi == pytest.approx(f(z0) + f_prime(z0) * (zi - z0), rel=1e-12)
            assert gi == pytest.approx(f_prime(z0), rel=1e-12)
    assert grad.abs().max().item() == pytest.approx(abs(f_prime(z0)))
    # Convex on (-inf, 2): slopes never decrease along increasing z.
    fine = torch.linspace(-20.0, 2.0, 2001, dtype=torch.float64, requires_grad=True)
    (slopes,) = torch.autograd.grad(spo_f(fine).sum(), fine)
    assert (slopes.diff() >= -1e-12).all()


def test_spo_without_floor_is_the_paper_loss_and_overflows_where_the_paper_does():
    z = torch.tensor([-80.0, -20.0, -5.5], requires_grad=True)
    paper = spo_f(z, z_floor=None)
    torch.testing.assert_close(paper.double(), -z.double() * torch.exp(-z.double()), rtol=1e-6, atol=0)
    assert torch.isinf(spo_f(torch.tensor([-100.0]), z_floor=None)).all()
    assert torch.isfinite(spo_f(torch.tensor([-100.0]))).all()


def test_spo_rejects_a_floor_above_the_minimum():
    with pytest.raises(ValueError, match="z_floor"):
        spo_f(torch.zeros(1), z_floor=1.0)


def test_spo_rewards_are_beta_log_ratios_and_detached():
    pc, pr, rc, rr = leaves(-3.0, -9.0, -4.0, -6.0)
    out = spo_loss(pc, pr, rc, rr, beta=0.3, alpha=1.0)
    assert out.chosen_rewards.item() == pytest.approx(0.3 * 1.0)
    assert out.rejected_rewards.item() == pytest.approx(0.3 * -3.0)
    assert not out.chosen_rewards.requires_grad and not out.terms["spo_margin_term"].requires_grad
    torch.testing.assert_close(
        out.terms["spo_margin_term"] + out.terms["spo_rejected_term"], out.losses.detach()
    )


LOW_PRECISION = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@settings(max_examples=150, deadline=None)
@given(z=st.lists(st.floats(min_value=-20.0, max_value=1e4), min_size=1, max_size=8), dtype=LOW_PRECISION)
def test_spo_f_without_floor_equals_the_paper_to_1e_6(z, dtype):
    z_in = torch.tensor(z, dtype=torch.float32).to(dtype)
    exact = -z_in.double() * torch.exp(-z_in.double())
    torch.testing.assert_close(spo_f(z_in, z_floor=None).double(), exact, rtol=1e-6, atol=1e-30)


@settings(max_examples=100, deadline=None)
@given(
    logps=st.lists(st.integers(-10_000, 0), min_size=4, max_size=4),
    log2_beta=st.integers(-4, 2),
    log2_alpha=st.integers(-4, 2),
)
def test_spo_loss_without_floor_equals_the_paper_when_z_is_at_least_minus_20(logps, log2_beta, log2_alpha):
    # Integer log-probs and power-of-two beta, alpha make z exact in fp32, so only f's rounding is left.
    beta, alpha = 2.0**log2_beta, 2.0**log2_alpha
    pc, pr, rc, rr = (float(v) for v in logps)
    z1, z2 = beta * ((pc - rc) - (pr - rr)), alpha * (rr - pr)
    if min(z1, z2) < -20:
        return
    out = spo_loss(*(torch.tensor([v]) for v in (pc, pr, rc, rr)), beta=beta, alpha=alpha, z_floor=None)
    assert out.losses.dtype == torch.float32
    assert out.terms["spo_margin_term"].item() == pytest.approx(f(z1), rel=1e-6, abs=1e-30)
    assert out.terms["spo_rejected_term"].item() == pytest.approx(f(z2), rel=1e-6, abs=1e-30)


def test_the_recipe_section_builds_spo_loss(x_seed: int = 0):
    g = torch.Generator().manual_seed(x_seed)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 9, (5,), generator=g) for _ in range(2))
    got = build_pair_loss(SPOLoss(type="spo", beta=0.2, alpha=0.5, z_floor=None))(PairInputs(pc, pr, nc, nr, rc, rr))
    want = spo_loss(pc, pr, rc, rr, beta=0.2, alpha=0.5, z_floor=None)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
    assert set(got.terms) == set(want.terms)


def test_entry_states_the_optimum_and_the_reward_scale():
    loss = SPOLoss(type="spo", beta=0.2, alpha=0.5)
    assert loss_optimum(loss) == pytest.approx({"margin": 5.0, "rejected_log_ratio": -2.0, "chosen_log_ratio": 3.0})
    assert reward_scale(loss) == 0.2
    assert SPOLoss(type="spo").z_floor == DEFAULT_Z_FLOOR
