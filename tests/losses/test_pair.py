"""What every pairwise loss shares: the NLL term, `PairInputs`, fp32 unreduced results and finite values and
gradients under extreme inputs. The contract tests run over every pairwise loss in the registry, each with
the loss section of its tiny recipe, so a new loss is held to them without being listed here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_align.losses.dpo import dpo_loss
from spo_align.losses.dpop import dpop_loss
from spo_align.losses.ipo import ipo_loss
from spo_align.losses.pair import PairInputs, add_nll_term, chosen_nll, with_nll_term
from spo_align.losses.registry import CATALOGUE, build_pair_loss
from spo_align.losses.simpo import simpo_loss
from spo_align.losses.spo import spo_loss
from tests.losses.closed_form import brentq, grads, leaves, tiny_recipe_loss

torch.set_num_threads(1)

PAIR_TYPES = [t for t, entry in CATALOGUE.items() if entry.stage == "pair"]


def _inputs(n: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 30.0) -> PairInputs:
    g = torch.Generator().manual_seed(seed)
    logps = [(-torch.rand(n, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(4)]
    tokens = [torch.randint(1, 12, (n,), generator=g) for _ in range(2)]
    return PairInputs(logps[0], logps[1], tokens[0], tokens[1], logps[2], logps[3])


def test_pair_inputs_without_reference_fail_loudly_for_a_loss_that_needs_one():
    x = PairInputs(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        x.reference()


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


@pytest.mark.parametrize("loss_type", PAIR_TYPES)
def test_with_nll_term_adds_the_same_term_to_every_pair_loss(loss_type):
    fn = build_pair_loss(tiny_recipe_loss(loss_type))
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


# ------------------------------------------------------------------------------------ shared contract


@pytest.mark.parametrize("loss_type", PAIR_TYPES)
def test_pair_losses_are_unreduced_fp32_with_detached_rewards_for_half_inputs(loss_type):
    x = _inputs(5, seed=2, dtype=torch.bfloat16)
    out = build_pair_loss(tiny_recipe_loss(loss_type))(x)
    assert out.losses.shape == (5,) and out.losses.dtype == torch.float32
    assert out.chosen_rewards.shape == (5,) and out.rejected_rewards.shape == (5,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert all(not term.requires_grad and term.shape == (5,) for term in out.terms.values())
    assert {term.name for term in CATALOGUE[loss_type].terms} <= set(out.terms)


@pytest.mark.parametrize("loss_type", PAIR_TYPES)
def test_pair_losses_use_the_reference_exactly_when_their_entry_says_so(loss_type):
    x = _inputs(3, seed=3)
    no_reference = PairInputs(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens)
    fn = build_pair_loss(tiny_recipe_loss(loss_type))
    if CATALOGUE[loss_type].needs_reference:
        with pytest.raises(ValueError, match="needs reference log-probs"):
            fn(no_reference)
    else:
        torch.testing.assert_close(fn(no_reference).losses, fn(x).losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", PAIR_TYPES)
def test_pair_losses_and_gradients_are_finite_at_extreme_log_probs(loss_type, dtype):
    """Log-probs from 0 down to -1e4 (a long, very unlikely answer) and answers of 0 to 4096 tokens."""
    values = torch.tensor([[0.0, -1e4, -1e4, 0.0], [-1e4, 0.0, 0.0, -1e4], [-1e4, -1e4, -1e4, -1e4], [-3.0, -5.0, -7.0, -2.0]])
    pc, pr, rc, rr = (values[:, i].to(dtype).requires_grad_(True) for i in range(4))
    x = PairInputs(pc, pr, torch.tensor([0, 4096, 1, 7]), torch.tensor([4096, 0, 1, 3]), rc, rr)
    section = tiny_recipe_loss(loss_type)
    for loss in (build_pair_loss(section), build_pair_loss(section.model_copy(update={"nll_weight": 1.0}))):
        out = loss(x)
        assert torch.isfinite(out.losses).all() and all(torch.isfinite(t).all() for t in out.terms.values())
        for g in torch.autograd.grad(out.losses.sum(), [pc, pr, rc, rr], allow_unused=True):
            assert g is None or torch.isfinite(g.float()).all()


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
NEGATIVE_LOGP = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False, allow_infinity=False)


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
    # SPO (floored) and DPO gradients even fit the half-precision leaves themselves.
    inputs = _low_precision_leaves(columns, dtype)
    spo = spo_loss(*inputs, beta=beta, alpha=alpha).losses
    dpo = dpo_loss(*inputs, beta=beta, label_smoothing=eps).losses
    for g in torch.autograd.grad((spo + dpo).sum(), inputs):
        assert g.dtype == dtype and torch.isfinite(g).all()


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.tuples(NEGATIVE_LOGP, NEGATIVE_LOGP, NEGATIVE_LOGP, NEGATIVE_LOGP, st.integers(0, 4096), st.integers(0, 4096)), min_size=1, max_size=6),
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
