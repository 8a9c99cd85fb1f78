"""Pairwise preference losses as pure tensor functions, and the record the trainer feeds them.

Every loss takes per-example log-probabilities *summed* over each answer's tokens (see
`spo_align.losses.sequence_logps`) and returns per-example, unreduced losses plus detached rewards for
logging. Losses are computed in at least fp32 whatever the input dtype (fp64 inputs stay fp64, which keeps
``torch.autograd.gradcheck`` usable). The maths, each optimum and two corrections to the SPO paper are
derived in ``docs/losses.md``.

Notation: for a pair (y_w chosen, y_l rejected),
``chosen log-ratio = log pi(y_w) - log pi_ref(y_w)``, ``rejected log-ratio = log pi(y_l) - log pi_ref(y_l)``
and the margin ``delta = chosen log-ratio - rejected log-ratio``.

Each function has the smallest interface its maths needs (SimPO takes no reference, for example). The
trainer instead hands every loss one `PairInputs` record; `spo_align.loss_catalogue` binds a recipe's
loss section to its function over that record (`PairLossFn`), and `with_nll_term` adds the optional NLL
term on the chosen answer to any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_Z_FLOOR",
    "PairInputs",
    "PairLoss",
    "PairLossFn",
    "add_nll_term",
    "chosen_nll",
    "compute_dtype",
    "dpo_loss",
    "dpop_loss",
    "ipo_loss",
    "ipo_tau_matching_spo",
    "simpo_loss",
    "spo_f",
    "spo_loss",
    "with_nll_term",
]

DEFAULT_Z_FLOOR = -5.0
"""Where SPO's f(z) = -z*exp(-z) switches to its tangent line; see :func:`spo_f` for the reasons."""


@dataclass(frozen=True)
class PairLoss:
    """Result of a pairwise loss.

    ``losses`` is [B], unreduced, differentiable. ``chosen_rewards`` / ``rejected_rewards`` are [B],
    detached: the loss's implicit reward of each answer (beta * log-ratio for SPO, DPO and DPOP; 2*tau *
    log-ratio for IPO, so that a reward margin of 1 is IPO's optimum, as it is SPO's; beta * per-token
    mean log-prob for the reference-free SimPO). ``terms`` holds named per-example parts of the loss,
    detached, for logging (SPO: ``spo_margin_term`` and ``spo_rejected_term``; DPOP: ``dpop_penalty``;
    any loss with an NLL term: ``nll_term``).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PairInputs:
    """What a pairwise loss may use, one value per pair ([B] each).

    ``policy_chosen`` / ``policy_rejected``: the policy's summed log-probs of each answer.
    ``chosen_tokens`` / ``rejected_tokens``: how many tokens each sum runs over (for per-token losses and
    the NLL term; `spo_align.losses.token_counts` counts them from the batch labels).
    ``ref_chosen`` / ``ref_rejected``: the reference's summed log-probs, or None for a reference-free loss
    (the trainer computes them only when the loss's catalogue entry needs a reference).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen, ref_rejected); a loss that needs them calls this and fails loudly without them."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs, but the inputs carry none")
        return self.ref_chosen, self.ref_rejected


PairLossFn = Callable[[PairInputs], PairLoss]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: half-precision inputs are upcast, fp64 stays fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _same_shape(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    shape = tensors[names[0]].shape
    for name in names[1:]:
        if tensors[name].shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, {names[0]} has {tuple(shape)}")


def _log_ratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen log-ratio, rejected log-ratio) in the compute dtype, after checking shapes agree."""
    _same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dtype = compute_dtype(*tensors)
    pc, pr, rc, rr = (t.to(dtype) for t in tensors)
    return pc - rc, pr - rr


def _per_token(logps: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Summed log-probs / token count, in `dtype`; a count below 1 (an empty answer) counts as 1."""
    return logps.to(dtype) / tokens.to(dtype).clamp(min=1.0)


def _require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _require_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------- SPO


def spo_f(z: torch.Tensor, *, z_floor: float | None = DEFAULT_Z_FLOOR) -> torch.Tensor:
    """SPO's f(z) = -z * exp(-z), in at least fp32, continued linearly below ``z_floor``.

    f has its minimum -1/e at z = 1 and is convex for z < 2 only. Its slope (z - 1) * exp(-z) grows
    exponentially as z falls: f(-10) = 2.2e5; f overflows fp32 near z = -84 (exp(-z) itself near -88.7)
    and fp16, if anyone casts the result, near z = -9. Below ``z_floor`` we use the tangent at
    ``z_floor``: value and slope match there (C^1), the result stays convex on (-inf, 2) because f lies
    above its tangents there, and loss and gradient are finite for every finite z. The exponential
    branch is evaluated at ``max(z, z_floor)`` so no inf ever enters the graph (a ``torch.where`` over an
    inf branch would give NaN gradients).

    Default ``z_floor = -5`` (value 5e^5 = 742, slope -6e^5 = -890):

    * it leaves the paper's loss untouched wherever training normally lives: z starts at 0, and reaching
      -5 takes a pair mis-ranked by 5/beta summed nats (50 at beta 0.1) or a rejected answer 5/alpha nats
      *more* likely than under the reference;
    * it caps one example's gradient weight at 890 times its weight at initialisation (|f'(0)| = 1);
      at -10 the cap would be 2.4e5, so one badly mis-ranked pair would be the entire clipped update of
      its batch;
    * value and slope at the floor fit fp16 (max 65504) with ~70x headroom for beta or alpha.

    ``z_floor=None`` gives the paper's f exactly (inf below z ~ -84 in fp32). ``z_floor`` must be < 1
    so the continuation slopes downwards and the minimum at z = 1 is kept.
    """
    z = z.to(compute_dtype(z))
    if z_floor is None:
        return -z * torch.exp(-z)
    if not z_floor < 1:
        raise ValueError(f"z_floor must be < 1 (below the minimum of f at z = 1), got {z_floor}")
    slope_at_floor = (z_floor - 1.0) * math.exp(-z_floor)
    z_clamped = z.clamp(min=z_floor)
    # Below the floor the first part is the constant f(z_floor) and the second the tangent's rise.
    # `where` (not a second clamp) so that exactly at the floor only one branch passes the gradient.
    below = torch.where(z < z_floor, z - z_floor, torch.zeros_like(z))
    return -z_clamped * torch.exp(-z_clamped) + slope_at_floor * below


def spo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    z_floor: float | None = DEFAULT_Z_FLOOR,
) -> PairLoss:
    """SPO (paper eq. 6): ``f(beta * delta) + f(alpha * (log pi_ref(y_l) - log pi(y_l)))``.

    Optimum of each term at argument 1: ``beta * delta = 1`` and rejected log-ratio ``= -1/alpha``
    (the paper prints +1/alpha); jointly the chosen log-ratio is ``1/beta - 1/alpha``, >= 0 only when
    alpha >= beta. ``terms`` holds ``spo_margin_term`` and ``spo_rejected_term`` (detached).
    """
    _require_positive("beta", beta)
    _require_positive("alpha", alpha)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    margin_term = spo_f(beta * (chosen - rejected), z_floor=z_floor)
    rejected_term = spo_f(-alpha * rejected, z_floor=z_floor)
    return PairLoss(
        losses=margin_term + rejected_term,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        terms={"spo_margin_term": margin_term.detach(), "spo_rejected_term": rejected_term.detach()},
    )


# ---------------------------------------------------------------------------------------------- DPO family


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO with cDPO label smoothing (paper eq. 12): ``-(1-e) log s(beta*delta) - e log s(-beta*delta)``.

    ``label_smoothing = 0`` is plain DPO (no finite optimum); for 0 < e < 0.5 the optimum is at
    ``beta * delta = ln((1-e)/e)`` (ln 9 at e = 0.1).
    """
    _require_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return PairLoss(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    lambda_: float,
) -> PairLoss:
    """DPO-Positive (Pal et al. 2024): ``-log s(beta * (delta - lambda * max(0, -chosen log-ratio)))``.

    The penalty is zero while the chosen answer is at least as likely as under the reference; below it,
    every nat the chosen answer loses costs ``1 + lambda`` nats of margin. No finite optimum (like DPO,
    the loss falls for ever as the margin grows). ``lambda_ = 0`` is plain DPO. ``terms`` holds
    ``dpop_penalty``, the penalty ``lambda * max(0, -chosen log-ratio)`` in nats (detached).
    """
    _require_positive("beta", beta)
    _require_non_negative("lambda", lambda_)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    penalty = lambda_ * torch.clamp(-chosen, min=0.0)
    losses = -F.logsigmoid(beta * (chosen - rejected - penalty))
    return PairLoss(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        terms={"dpop_penalty": penalty.detach()},
    )


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    tau: float,
) -> PairLoss:
    """IPO (Azar et al.): ``(delta - 1/(2 tau))**2`` on *summed* log-probs; optimum at delta = 1/(2 tau).

    TRL's ``ipo`` averages log-probs per token, which moves the optimum with response length; this one
    does not. Rewards are ``2 * tau * log-ratio``, so the reward margin is 1 at the optimum and equals
    SPO's ``beta * log-ratio`` when ``tau = ipo_tau_matching_spo(beta)``. The gradient
    ``2 * (delta - 1/(2 tau))`` is unbounded by design: finite in fp32, beyond fp16's range for |delta| > 32k.
    """
    _require_positive("tau", tau)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen - rejected - 1.0 / (2.0 * tau)) ** 2
    return PairLoss(
        losses=losses,
        chosen_rewards=(2.0 * tau * chosen).detach(),
        rejected_rewards=(2.0 * tau * rejected).detach(),
    )


def ipo_tau_matching_spo(beta: float) -> float:
    """The tau whose IPO optimum delta = 1/(2 tau) coincides with SPO's margin optimum delta = 1/beta."""
    _require_positive("beta", beta)
    return beta / 2.0


# ---------------------------------------------------------------------------------------------- SimPO


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> PairLoss:
    """SimPO (Meng et al. 2024): ``-log s(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)``.

    Reference-free: the implicit reward of an answer is ``beta`` times its per-token mean log-prob, and
    those rewards are what ``chosen_rewards`` / ``rejected_rewards`` hold (no log-ratio exists). ``gamma``
    is the target reward margin in reward units (the per-token margin ``gamma / beta``). No finite optimum.
    A token count below 1 counts as 1.
    """
    _require_positive("beta", beta)
    _require_non_negative("gamma", gamma)
    _same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    chosen = _per_token(policy_chosen_logps, chosen_tokens, dtype)
    rejected = _per_token(policy_rejected_logps, rejected_tokens, dtype)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return PairLoss(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


# ---------------------------------------------------------------------------------------------- NLL term


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each chosen answer, ``-log pi(y_w) / |y_w|`` ([B], at least fp32)."""
    _same_shape(policy_chosen_logps=policy_chosen_logps, chosen_tokens=chosen_tokens)
    return -_per_token(policy_chosen_logps, chosen_tokens, compute_dtype(policy_chosen_logps))


def add_nll_term(out: PairLoss, nll: torch.Tensor, weight: float) -> PairLoss:
    """``out`` with ``weight * nll`` added to every example's loss and logged as ``terms["nll_term"]``."""
    _require_non_negative("nll_weight", weight)
    if nll.shape != out.losses.shape:
        raise ValueError(f"nll has shape {tuple(nll.shape)}, the losses have {tuple(out.losses.shape)}")
    term = weight * nll.to(compute_dtype(out.losses, nll))
    return PairLoss(
        losses=out.losses + term,
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        terms={**out.terms, "nll_term": term.detach()},
    )


def with_nll_term(loss_fn: PairLossFn, weight: float) -> PairLossFn:
    """``loss_fn`` plus ``weight`` times the chosen answer's per-token NLL (the RPO / "DPO + SFT" term)."""
    _require_non_negative("nll_weight", weight)

    def loss(inputs: PairInputs) -> PairLoss:
        return add_nll_term(loss_fn(inputs), chosen_nll(inputs.policy_chosen, inputs.chosen_tokens), weight)

    return loss
