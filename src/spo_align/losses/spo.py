"""SPO, Stable Preference Optimization (the paper's eq. 6): its recipe section, its loss, its entry.

``f(beta * delta) + f(alpha * (log pi_ref(y_l) - log pi(y_l)))`` with ``f(z) = -z * exp(-z)``: each term is
minimal at argument 1, so the margin settles at ``beta * delta = 1`` and the rejected log-ratio at ``-1/alpha``
(the paper prints +1/alpha; docs/losses.md derives both and the numerical floor below).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from spo_align.losses.entry import LOG_RATIO_NOTE, LossEntry, Metric, Optimum
from spo_align.losses.pair import (
    PairLoss,
    PairLossSection,
    compute_dtype,
    log_ratios,
    nll_weight_field,
    require_positive,
)

if TYPE_CHECKING:
    import torch

    from spo_align.losses.pair import PairInputs, PairLossFn

DEFAULT_Z_FLOOR = -5.0
"""Where SPO's f(z) = -z*exp(-z) switches to its tangent line; see :func:`spo_f` for the reasons."""


class SPOLoss(PairLossSection):
    type: Literal["spo"]
    beta: float = Field(0.1, gt=0, description="Scale of the margin term: optimum at beta * margin = 1.")
    alpha: float = Field(
        1.0,
        gt=0,
        description="Scale of the rejected-answer term: optimum at log pi/pi_ref(rejected) = -1/alpha. "
        "alpha >= beta keeps the chosen log-ratio non-negative at the optimum (1/beta - 1/alpha).",
    )
    z_floor: float | None = Field(
        DEFAULT_Z_FLOOR,
        lt=1,
        description="Below this argument f(z) = -z*exp(-z) continues linearly (same value and slope) so "
        "gradients stay finite; must be < 1 (f's minimum). -5 caps one pair's gradient weight at ~890x its "
        "weight at the start (losses.spo.DEFAULT_Z_FLOOR, see docs/losses.md); null gives the paper's loss exactly.",
    )
    nll_weight: float = nll_weight_field()


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
    import torch

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
    require_positive("beta", beta)
    require_positive("alpha", alpha)
    chosen, rejected = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin_term = spo_f(beta * (chosen - rejected), z_floor=z_floor)
    rejected_term = spo_f(-alpha * rejected, z_floor=z_floor)
    return PairLoss(
        losses=margin_term + rejected_term,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        terms={"spo_margin_term": margin_term.detach(), "spo_rejected_term": rejected_term.detach()},
    )


def _build(loss: SPOLoss) -> PairLossFn:
    def fn(x: PairInputs) -> Any:
        return spo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta, alpha=loss.alpha,
                        z_floor=loss.z_floor)

    return fn


def _optimum(loss: SPOLoss) -> Optimum:
    return {
        "margin": 1.0 / loss.beta,
        "rejected_log_ratio": -1.0 / loss.alpha,
        "chosen_log_ratio": 1.0 / loss.beta - 1.0 / loss.alpha,
    }


ENTRY = LossEntry(
    type="spo",
    title="SPO",
    order=10,
    colour="tab:blue",
    section=SPOLoss,
    stage="pair",
    needs_reference=True,
    reward="beta x log pi/pi_ref (summed over the answer)",
    reward_scale=lambda loss: float(loss.beta),
    optimum=_optimum,
    optimum_note=LOG_RATIO_NOTE,
    terms=(
        Metric("spo_margin_term", "spo_m", "f(beta x margin), SPO's margin term", "SPO margin term f(β·Δ)"),
        Metric("spo_rejected_term", "spo_r", "f(-alpha x rejected log-ratio), SPO's rejected term",
               "SPO rejected term f(α·(log π_ref − log π))"),
    ),
    build=_build,
    parameters=lambda loss: f"β={loss.beta:g} α={loss.alpha:g}",
)
