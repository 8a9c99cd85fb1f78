"""The preference losses against closed forms, analytic derivatives, optimum locations and extreme inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_align.losses import (
    DEFAULT_Z_FLOOR,
    dpo_loss,
    ipo_loss,
    ipo_tau_matching_spo,
    kto_loss,
    spo_f,
    spo_loss,
)

torch.set_num_threads(1)


def f(z: float) -> float:
    return -z * math.exp(-z)


def f_prime(z: float) -> float:
    return (z - 1.0) * math.exp(-z)


def log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u)) if u >= 0 else u - math.log1p(math.exp(u))


def sigmoid(u: float) -> float:
    return math.exp(log_sigmoid(u))


def leaves(*values: float, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """One single-element tensor per value, each requiring grad."""
    return [torch.tensor([v], dtype=dtype, requires_grad=True) for v in values]


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[float]:
    return [g.item() for g in torch.autograd.grad(loss.sum(), inputs)]


# Points (policy chosen, policy rejected, ref chosen, ref rejected): right-ranked, wrong-ranked, tied.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-30.0, -11.0, -25.0, -13.0), (-5.0, -7.0, -5.0, -7.0)]


# ---------------------------------------------------------------------------------------------- SPO


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


# ---------------------------------------------------------------------------------------------- DPO


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


# ---------------------------------------------------------------------------------------------- IPO


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
    tau = ipo_tau_matching_spo(beta)
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


# ---------------------------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("kl", [0.0, 0.7])
@pytest.mark.parametrize("beta,w_d,w_u", [(0.1, 1.0, 1.0), (2.0, 1.5, 0.5)])
def test_kto_value_and_gradient_match_the_value_function(kl, beta, w_d, w_u):
    policy = torch.tensor([-3.0, -9.0, -5.0, -6.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -8.0, -5.5, -9.0], dtype=torch.float64, requires_grad=True)
    desirable = torch.tensor([True, True, False, False])
    out = kto_loss(
        policy,
        ref,
        desirable,
        torch.tensor(kl, dtype=torch.float64),
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    expected, expected_grad = [], []
    for p, r, d in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
        x = beta * ((p - r) - kl)
        if d:
            expected.append(w_d * (1 - sigmoid(x)))
            expected_grad.append(-w_d * beta * sigmoid(x) * sigmoid(-x))
        else:
            expected.append(w_u * (1 - sigmoid(-x)))
            expected_grad.append(w_u * beta * sigmoid(x) * sigmoid(-x))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    grad_policy, grad_ref = torch.autograd.grad(out.losses.sum(), [policy, ref])
    assert grad_policy.tolist() == pytest.approx(expected_grad, rel=1e-10)
    assert grad_ref.tolist() == pytest.approx([-g for g in expected_grad], rel=1e-10)
    torch.testing.assert_close(out.chosen_rewards, beta * torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, beta * torch.tensor([0.5, 3.0], dtype=torch.float64))


def test_kto_reference_point_is_detached_and_clamped_at_zero():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    ref = torch.tensor([-3.5, -3.0])
    kl = torch.tensor(-0.4, requires_grad=True)
    out = kto_loss(policy, ref, torch.tensor([True, False]), kl, beta=0.5)
    assert out.kl.item() == 0.0 and not out.kl.requires_grad
    same = kto_loss(policy, ref, torch.tensor([True, False]), 0.0, beta=0.5)
    torch.testing.assert_close(out.losses, same.losses)
    assert not torch.autograd.grad(out.losses.sum(), [policy, kl], allow_unused=True)[1:][0]


def test_kto_single_sided_batches_give_empty_rewards():
    out = kto_loss(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), 0.0, beta=0.1)
    assert out.rejected_rewards.shape == (0,) and out.chosen_rewards.shape == (3,)
    assert out.losses.tolist() == pytest.approx([0.5] * 3)


def test_kto_requires_a_bool_mask_of_matching_shape():
    with pytest.raises(TypeError, match="bool"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(torch.zeros(2), torch.zeros(3), torch.tensor([True, False]), 0.0, beta=0.1)


# ------------------------------------------------------------------------------------ shared contract


@pytest.mark.parametrize(
    "loss",
    [
        lambda *x: spo_loss(*x, beta=0.1, alpha=1.0),
        lambda *x: dpo_loss(*x, beta=0.1, label_smoothing=0.1),
        lambda *x: ipo_loss(*x, tau=0.05),
    ],
)
def test_pair_losses_are_unreduced_fp32_for_half_inputs(loss):
    inputs = [torch.randn(5).mul(10).to(torch.bfloat16) for _ in range(4)]
    out = loss(*inputs)
    assert out.losses.shape == (5,) and out.losses.dtype == torch.float32
    assert out.chosen_rewards.shape == (5,) and not out.chosen_rewards.requires_grad


def test_pair_losses_reject_mismatched_shapes_and_bad_hyperparameters():
    a, b = torch.zeros(3), torch.zeros(4)
    with pytest.raises(ValueError, match="ref_chosen_logps has shape"):
        dpo_loss(a, a, b, a, beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        spo_loss(a, a, a, a, beta=0.0, alpha=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        ipo_loss(a, a, a, a, tau=-1.0)


# ------------------------------------------------------------------------------- extreme inputs


LOW_PRECISION = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
LOGP = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


def _low_precision_leaves(values: list[float], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float32).to(dtype).requires_grad_(True) for v in values]


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.lists(LOGP, min_size=4, max_size=4), min_size=1, max_size=6),
    dtype=LOW_PRECISION,
    beta=st.floats(0.01, 10.0),
    alpha=st.floats(0.01, 10.0),
    eps=st.floats(0.0, 0.49),
)
def test_every_loss_and_gradient_is_finite_for_log_probs_up_to_1e4(values, dtype, beta, alpha, eps):
    columns = [list(col) for col in zip(*values)]
    for loss in (
        lambda *x: spo_loss(*x, beta=beta, alpha=alpha).losses,
        lambda *x: dpo_loss(*x, beta=beta, label_smoothing=eps).losses,
        lambda *x: ipo_loss(*x, tau=beta).losses,
    ):
        inputs = _low_precision_leaves(columns, dtype)
        out = loss(*inputs)
        assert torch.isfinite(out).all()
        # Gradient of the loss's fp32 arithmetic (IPO's 2*(delta - 1/(2 tau)) legitimately exceeds fp16's
        # 65504 for |delta| > 32k, so the check is on the computation, not on an fp16 leaf's storage).
        upcast = [x.detach().float().requires_grad_(True) for x in inputs]
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss(*upcast).sum(), upcast))
    # SPO (floored), DPO and KTO gradients even fit the half-precision leaves themselves.
    inputs = _low_precision_leaves(columns, dtype)
    spo = spo_loss(*inputs, beta=beta, alpha=alpha).losses
    dpo = dpo_loss(*inputs, beta=beta, label_smoothing=eps).losses
    kto = kto_loss(
        inputs[0], inputs[2], torch.arange(len(values)) % 2 == 0, inputs[1].detach().abs(), beta=beta
    )
    for g in torch.autograd.grad((spo + dpo + kto.losses).sum(), inputs):
        assert g.dtype == dtype and torch.isfinite(g).all()
    assert torch.isfinite(kto.losses).all()


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
