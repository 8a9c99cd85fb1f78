"""IPO (Azar et al. 2023) on summed log-probs: its recipe section, its loss, its entry.

``(delta - 1/(2 tau))**2``, optimum at ``delta = 1/(2 tau)``. `match_spo_beta` derives tau = beta/2 so that
IPO's optimum coincides with SPO's ``beta * delta = 1`` (`tau_matching_spo`, the one place that formula lives).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from spo_align.losses.entry import LOG_RATIO_NOTE, LossEntry, Optimum
from spo_align.losses.pair import PairLoss, PairLossSection, log_ratios, nll_weight_field, require_positive

if TYPE_CHECKING:
    import torch

    from spo_align.losses.pair import PairInputs, PairLossFn


def tau_matching_spo(beta: float) -> float:
    """The tau whose IPO optimum delta = 1/(2 tau) coincides with SPO's margin optimum delta = 1/beta."""
    require_positive("beta", beta)
    return beta / 2.0


class IPOLoss(PairLossSection):
    type: Literal["ipo"]
    tau: float | None = Field(None, gt=0, description="IPO regularisation: optimum at margin = 1/(2 tau).")
    match_spo_beta: float | None = Field(
        None,
        gt=0,
        description="Derive tau = beta/2 so IPO's optimum coincides with SPO's beta*margin = 1.",
    )
    nll_weight: float = nll_weight_field()

    @model_validator(mode="after")
    def _one_of_tau(self) -> IPOLoss:
        if (self.tau is None) == (self.match_spo_beta is None):
            raise ValueError("give exactly one of 'tau' or 'match_spo_beta'")
        return self

    @property
    def resolved_tau(self) -> float:
        """tau as given, or `tau_matching_spo(match_spo_beta)` (the validator guarantees exactly one is set)."""
        if self.tau is not None:
            return self.tau
        assert self.match_spo_beta is not None
        return tau_matching_spo(self.match_spo_beta)


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
    SPO's ``beta * log-ratio`` when ``tau = tau_matching_spo(beta)``. The gradient
    ``2 * (delta - 1/(2 tau))`` is unbounded by design: finite in fp32, beyond fp16's range for |delta| > 32k.
    """
    require_positive("tau", tau)
    chosen, rejected = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (chosen - rejected - 1.0 / (2.0 * tau)) ** 2
    return PairLoss(
        losses=losses,
        chosen_rewards=(2.0 * tau * chosen).detach(),
        rejected_rewards=(2.0 * tau * rejected).detach(),
    )


def _build(loss: IPOLoss) -> PairLossFn:
    def fn(x: PairInputs) -> Any:
        return ipo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), tau=loss.resolved_tau)

    return fn


def _optimum(loss: IPOLoss) -> Optimum:
    return {"margin": 1.0 / (2.0 * loss.resolved_tau)}


ENTRY = LossEntry(
    type="ipo",
    title="IPO",
    order=30,
    colour="tab:green",
    section=IPOLoss,
    stage="pair",
    needs_reference=True,
    reward="2 tau x log pi/pi_ref (summed), so the reward margin is 1 at the optimum",
    reward_scale=lambda loss: 2.0 * loss.resolved_tau,
    optimum=_optimum,
    optimum_note=LOG_RATIO_NOTE,
    build=_build,
    parameters=lambda loss: f"τ={loss.resolved_tau:g}",
)
