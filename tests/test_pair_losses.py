"""DPOP, SimPO and the NLL term against float64 closed forms, their derived optima, and extreme inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_align.losses import (
    PairInputs,
    add_nll_term,
    chosen_nll,
    dpo_loss,
    dpop_loss,
    ipo_loss,
    simpo_loss,
    spo_f,
    spo_loss,
    with_nll_term,
)

torch.set_num_threads(1)


def log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u)) if u >= 0 else u - math.log1p(math.exp(u))


def sigmoid(u: float) -> float:
    return math.exp(log_sigmoid(u))


def leaves(*values: float) -> list[torch.Tensor]:
    return [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in values]


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[float]:
    return [g.item() for g in torch.autograd.grad(loss.sum(), inputs)]


# (policy chosen, policy rejected, ref chosen, ref rejected): chosen above its reference, chosen below it
# (the case DPOP penalises), and a wrong-ranked pair with the chosen answer below its reference.
POINTS = [(-12.0, -20.0, -14.0, -16.5), (-15.0, -25.0, -12.0, -16.0), (-30.0, -11.0, -25.0, -13.0)]


# ---------------------------------------------------------------------------------------------- DPOP


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


# ---------------------------------------------------------------------------------------------- SimPO


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


# ---------------------------------------------------------------------------------------------- NLL term


def test_nll_term_is_the_chosen_answers_per_token_nll_times_its_weight():
    pc, pr, rc, rr = leaves(-12.0, -20.0, -14.0, -16.5)
    tokens = torch.tensor([4])
    base = dpo_loss(pc, pr, rc, rr, beta=0.1)
    out = add_nll_term(base, chosen_nll(pc, tokens), 0.5)
    assert chosen_nll(pc, tokens).item() == pytest.approx(3.0)
    assert out.terms["nll_term"].item() == pytest.approx(0.5 * 3.0)
    assert out.losses.item() == pytest.approx(base.losses.item() + 1.5, rel=1e-12)
    assert out.chosen_rewards is base.chosen_rewards and not out.terms["nll_term"].requires_grad
    # Its gradient: -w / |y_w| on the chosen log-prob, nothing on the others.
    nll_only = grads(out.losses, [pc, pr, rc, rr])
    dpo_only = grads(dpo_loss(pc, pr, rc, rr, beta=0.1).losses, [pc, pr, rc, rr])
    assert [a - b for a, b in zip(nll_only, dpo_only)] == pytest.approx([-0.5 / 4, 0.0, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: spo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=0.2, alpha=1.0),
        lambda x: dpo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=0.1, label_smoothing=0.1),
        lambda x: ipo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), tau=0.1),
        lambda x: dpop_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=0.1, lambda_=50.0),
        lambda x: simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens, beta=2.0, gamma=1.0),
    ],
    ids=["spo", "dpo", "ipo", "dpop", "simpo"],
)
def test_with_nll_term_adds_the_same_term_to_every_pair_loss(fn):
    g = torch.Generator().manual_seed(1)
    inputs = PairInputs(
        policy_chosen=-torch.rand(6, generator=g, dtype=torch.float64) * 30,
        policy_rejected=-torch.rand(6, generator=g, dtype=torch.float64) * 30,
        chosen_tokens=torch.randint(1, 12, (6,), generator=g),
        rejected_tokens=torch.randint(1, 12, (6,), generator=g),
        ref_chosen=-torch.rand(6, generator=g, dtype=torch.float64) * 30,
        ref_rejected=-torch.rand(6, generator=g, dtype=torch.float64) * 30,
    )
    plain, with_nll = fn(inputs), with_nll_term(fn, 0.7)(inputs)
    expected = 0.7 * -inputs.policy_chosen / inputs.chosen_tokens
    torch.testing.assert_close(with_nll.losses - plain.losses, expected)
    torch.testing.assert_close(with_nll.terms["nll_term"], expected)
    assert set(with_nll.terms) == set(plain.terms) | {"nll_term"}


def brentq(fn, lo: float, hi: float) -> float:
    """The root of `fn` in [lo, hi] (signs differ at the ends), by bisection to float64 precision."""
    assert fn(lo) * fn(hi) < 0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(lo) * fn(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def test_nll_term_moves_spo_s_optimum_where_the_derivation_puts_it():
    """docs/losses.md: with the NLL term (weight w, n chosen tokens) SPO's stationary point has
    f'(beta*margin) = w/(n beta) and f'(-alpha r) = -w/(n alpha)."""
    beta, alpha, w, n = 0.5, 1.0, 0.05, 4
    fp = lambda z: (z - 1.0) * math.exp(-z)  # noqa: E731
    z1 = brentq(lambda z: fp(z) - w / (n * beta), 1.0, 2.0)
    z2 = brentq(lambda z: fp(z) + w / (n * alpha), -1.0, 1.0)
    rejected = -z2 / alpha
    chosen = z1 / beta + rejected
    ref_c, ref_r = -10.0, -12.0
    inputs = leaves(ref_c + chosen, ref_r + rejected, ref_c, ref_r)
    record = PairInputs(inputs[0], inputs[1], torch.tensor([n]), torch.tensor([n]), inputs[2], inputs[3])
    base = lambda x: spo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=beta, alpha=alpha, z_floor=None)  # noqa: E731
    out = with_nll_term(base, w)(record)
    g = grads(out.losses, inputs)
    assert g[0] == pytest.approx(0.0, abs=1e-10) and g[1] == pytest.approx(0.0, abs=1e-10)
    assert 1.0 < z1 < 1.0 + math.e * w / (n * beta) * 1.1  # first order: 1 + e w/(n beta)
    assert rejected > -1.0 / alpha  # the rejected answer is pushed down less than without the term


def test_pair_inputs_without_reference_fail_loudly_for_a_loss_that_needs_one():
    x = PairInputs(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        x.reference()


# ------------------------------------------------------------------------------- extreme inputs


LOW_PRECISION = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
LOGP = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.tuples(LOGP, LOGP, LOGP, LOGP, st.integers(0, 4096), st.integers(0, 4096)), min_size=1, max_size=6),
    dtype=LOW_PRECISION,
    beta=st.floats(0.01, 20.0),
    lam=st.floats(0.0, 1000.0),
    gamma=st.floats(0.0, 20.0),
    weight=st.floats(0.0, 10.0),
)
def test_new_losses_and_their_gradients_are_finite_for_log_probs_down_to_minus_1e4(values, dtype, beta, lam, gamma, weight):
    columns = [list(col) for col in zip(*values)]
    pc, pr, rc, rr = (torch.tensor(c, dtype=torch.float32).to(dtype).requires_grad_(True) for c in columns[:4])
    nc, nr = (torch.tensor(c) for c in columns[4:])
    x = PairInputs(pc, pr, nc, nr, rc, rr)
    fns = [
        lambda x: dpop_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=beta, lambda_=lam),
        lambda x: simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens, beta=beta, gamma=gamma),
    ]
    for fn in fns:
        for loss in (fn, with_nll_term(fn, weight)):
            out = loss(x)
            assert out.losses.dtype == torch.float32 and torch.isfinite(out.losses).all()
            assert all(torch.isfinite(t).all() for t in out.terms.values())
            for g in torch.autograd.grad(out.losses.sum(), [pc, pr, rc, rr], allow_unused=True):
                assert g is None or torch.isfinite(g).all()


def test_spo_f_is_unchanged_by_the_move_to_pair_losses():
    """`spo_align.losses` re-exports the pair losses: the names used before the split are the same objects."""
    import spo_align.losses as losses
    import spo_align.pair_losses as pair_losses

    for name in ("spo_f", "spo_loss", "dpo_loss", "ipo_loss", "ipo_tau_matching_spo", "PairLoss", "DEFAULT_Z_FLOOR"):
        assert getattr(losses, name) is getattr(pair_losses, name)
    assert spo_f is pair_losses.spo_f
