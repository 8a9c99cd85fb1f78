"""DPO with cDPO label smoothing (the DPO paper's eq. 12): its recipe section, its loss, its entry.

``-(1-e) log s(beta * delta) - e log s(-beta * delta)``: plain DPO (e = 0) has no finite optimum; for
0 < e < 0.5 the margin settles at ``beta * delta = ln((1-e)/e)`` (docs/losses.md).
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


class DPOLoss(PairLossSection):
    type: Literal["dpo"]
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward.")
    label_smoothing: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="cDPO epsilon (paper eq. 12); 0 gives plain DPO. Optimum at beta*margin = ln((1-e)/e).",
    )
    nll_weight: float = nll_weight_field()


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
    import torch.nn.functional as F

    require_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return PairLoss(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


def _build(loss: DPOLoss) -> PairLossFn:
    def fn(x: PairInputs) -> Any:
        return dpo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta,
                        label_smoothing=loss.label_smoothing)

    return fn


def _optimum(loss: DPOLoss) -> Optimum:
    eps = loss.label_smoothing
    return {"margin": math.log((1.0 - eps) / eps) / loss.beta if eps > 0 else None}


ENTRY = LossEntry(
    type="dpo",
    title="DPO",
    order=20,
    colour="tab:red",
    section=DPOLoss,
    stage="pair",
    needs_reference=True,
    reward="beta x log pi/pi_ref (summed over the answer)",
    reward_scale=lambda loss: float(loss.beta),
    optimum=_optimum,
    optimum_note=LOG_RATIO_NOTE + "; plain DPO (label_smoothing 0) has none",
    build=_build,
    parameters=lambda loss: f"β={loss.beta:g} ε={loss.label_smoothing:g}",
)
