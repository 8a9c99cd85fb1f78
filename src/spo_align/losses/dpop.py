"""DPO-Positive (Pal et al. 2024): its recipe section, its loss, its entry.

``-log s(beta * (delta - lambda * max(0, -chosen log-ratio)))``: DPO, except that while the chosen answer is
below the reference, every nat it loses costs ``1 + lambda`` nats of margin. No finite optimum (docs/losses.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field

from spo_align.losses.entry import LossEntry, Metric, Optimum
from spo_align.losses.pair import (
    PairLoss,
    PairLossSection,
    log_ratios,
    nll_weight_field,
    require_non_negative,
    require_positive,
)

if TYPE_CHECKING:
    import torch

    from spo_align.losses.pair import PairInputs, PairLossFn


class DPOPLoss(PairLossSection):
    """DPO-Positive (Pal et al. 2024). The recipe key is `lambda` (a Python keyword: `lambda_` in code)."""

    model_config = ConfigDict(serialize_by_alias=True)

    type: Literal["dpop"]
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward, as in DPO.")
    lambda_: float = Field(
        50.0,
        alias="lambda",
        ge=0,
        description="Weight of the penalty lambda * max(0, log pi_ref(chosen) - log pi(chosen)) subtracted from "
        "the margin inside the sigmoid: while the chosen answer is below the reference, raising it counts "
        "(1 + lambda) times as much as lowering the rejected one. 0 gives plain DPO. No finite optimum.",
    )
    nll_weight: float = nll_weight_field()


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
    import torch
    import torch.nn.functional as F

    require_positive("beta", beta)
    require_non_negative("lambda", lambda_)
    chosen, rejected = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = lambda_ * torch.clamp(-chosen, min=0.0)
    losses = -F.logsigmoid(beta * (chosen - rejected - penalty))
    return PairLoss(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        terms={"dpop_penalty": penalty.detach()},
    )


def _build(loss: DPOPLoss) -> PairLossFn:
    def fn(x: PairInputs) -> Any:
        return dpop_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta, lambda_=loss.lambda_)

    return fn


def _optimum(loss: DPOPLoss) -> Optimum:
    return {"margin": None}


ENTRY = LossEntry(
    type="dpop",
    title="DPOP",
    order=40,
    colour="tab:purple",
    section=DPOPLoss,
    stage="pair",
    needs_reference=True,
    reward="beta x log pi/pi_ref (summed over the answer), as DPO",
    reward_scale=lambda loss: float(loss.beta),
    optimum=_optimum,
    optimum_note="no finite optimum: the margin grows for ever, as in DPO; while the chosen log-ratio is "
    "below 0 it is pulled up (1 + lambda) times harder (docs/losses.md)",
    terms=(Metric("dpop_penalty", "dpop_pen", "lambda x max(0, -chosen log-ratio), in nats",
                  "DPOP penalty λ·max(0, −chosen log-ratio)"),),
    build=_build,
    parameters=lambda loss: f"β={loss.beta:g} λ={loss.lambda_:g}",
)
