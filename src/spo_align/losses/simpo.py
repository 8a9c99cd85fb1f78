"""SimPO (Meng et al. 2024), reference-free on per-token mean log-probs: its recipe section, its loss, its entry.

``-log s(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)``: no reference model is loaded or run. No
finite optimum: the per-token margin is pushed past gamma/beta for ever (docs/losses.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from spo_align.losses.entry import LossEntry, Optimum
from spo_align.losses.pair import (
    PairLoss,
    PairLossSection,
    compute_dtype,
    nll_weight_field,
    per_token,
    require_non_negative,
    require_positive,
    same_shape,
)

if TYPE_CHECKING:
    import torch

    from spo_align.losses.pair import PairInputs, PairLossFn


class SimPOLoss(PairLossSection):
    """SimPO (Meng et al. 2024): reference-free, on per-token mean log-probs."""

    type: Literal["simpo"]
    beta: float = Field(
        2.0, gt=0, description="Scale of the per-token mean log-prob (SimPO's reward = beta * mean log pi)."
    )
    gamma: float = Field(
        1.0,
        ge=0,
        description="Target reward margin gamma, in reward units (absolute, as in the paper's equation and TRL's "
        "simpo_gamma; not the SimPO repository's gamma/beta ratio): the loss is -log s(beta * per-token margin - "
        "gamma), so the per-token margin it aims past is gamma / beta. No finite optimum.",
    )
    nll_weight: float = nll_weight_field()


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
    import torch.nn.functional as F

    require_positive("beta", beta)
    require_non_negative("gamma", gamma)
    same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    chosen = per_token(policy_chosen_logps, chosen_tokens, dtype)
    rejected = per_token(policy_rejected_logps, rejected_tokens, dtype)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return PairLoss(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


def _build(loss: SimPOLoss) -> PairLossFn:
    def fn(x: PairInputs) -> Any:
        return simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens, beta=loss.beta,
                          gamma=loss.gamma)

    return fn


def _optimum(loss: SimPOLoss) -> Optimum:
    return {"per_token_margin": None, "gamma_over_beta": loss.gamma / loss.beta}


ENTRY = LossEntry(
    type="simpo",
    title="SimPO",
    order=50,
    colour="tab:brown",
    section=SimPOLoss,
    stage="pair",
    needs_reference=False,
    reward="beta x per-token mean log pi (no reference, so no log-ratio)",
    reward_scale=lambda loss: None,
    optimum=_optimum,
    optimum_note="no finite optimum: the per-token log-prob margin is pushed past gamma/beta for ever "
    "(docs/losses.md)",
    build=_build,
    parameters=lambda loss: f"β={loss.beta:g} γ={loss.gamma:g}",
)
