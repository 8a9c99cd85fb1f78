"""NCA, pairwise noise contrastive alignment (Chen et al. 2024): its recipe section, its loss, its entry.

``-log s(beta c) - 1/2 log s(-beta c) - 1/2 log s(-beta r)`` with c, r the chosen and rejected summed
log-ratios. Each answer's reward is scored on its own, not only their difference, so the chosen answer has
a finite optimum above the reference, ``c = ln 2 / beta``, while the rejected one is pushed down for ever
(its gradient fading like ``exp(beta r)``); docs/losses.md derives both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from spo_align.losses.entry import LOG_RATIO_NOTE, LossEntry, Optimum
from spo_align.losses.pair import PairLoss, PairLossSection, log_ratios, nll_weight_field, require_positive

if TYPE_CHECKING:
    import torch

    from spo_align.losses.pair import PairInputs, PairLossFn


class NCALoss(PairLossSection):
    """NCA (Chen et al. 2024, pairwise): each answer's reward beta * log-ratio is scored on its own."""

    type: Literal["nca"]
    beta: float = Field(
        0.1,
        gt=0,
        description="Inverse temperature of the implicit reward: the chosen log-ratio settles at ln 2 / beta; the "
        "rejected one has no finite optimum.",
    )
    nll_weight: float = nll_weight_field()


def nca_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> PairLoss:
    """NCA (Chen et al. 2024, the pairwise form): ``-log s(beta c) - 1/2 log s(-beta c) - 1/2 log s(-beta r)``.

    Its derivative in ``u = beta c`` is ``3/2 s(u) - 1``: zero at ``s(u) = 2/3``, so the chosen log-ratio's
    optimum is ``c = ln 2 / beta`` (the loss is convex in c). In ``v = beta r`` it is ``1/2 s(v) > 0``: the
    rejected answer is pushed down for ever, ever more weakly. Rewards are ``beta * log-ratio``.
    """
    import torch.nn.functional as F

    require_positive("beta", beta)
    chosen, rejected = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    losses = (
        -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    )
    return PairLoss(losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach())


def _build(loss: NCALoss) -> PairLossFn:
    def fn(x: PairInputs) -> Any:
        return nca_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta)

    return fn


def _optimum(loss: NCALoss) -> Optimum:
    return {"chosen_log_ratio": math.log(2.0) / loss.beta, "rejected_log_ratio": None, "margin": None}


ENTRY = LossEntry(
    type="nca",
    title="NCA",
    order=60,
    colour="tab:cyan",
    section=NCALoss,
    stage="pair",
    needs_reference=True,
    reward="beta x log pi/pi_ref (summed over the answer), as DPO",
    reward_scale=lambda loss: float(loss.beta),
    optimum=_optimum,
    optimum_note=LOG_RATIO_NOTE + ": the chosen answer's at ln 2 / beta; the rejected one is pushed down for ever "
    "(docs/losses.md)",
    build=_build,
    parameters=lambda loss: f"β={loss.beta:g}",
)
