"""What every pairwise loss shares: its section's base, the record the trainer feeds it, the result it
returns, the dtype and shape rules, and the optional NLL term on the chosen answer.

Every pairwise loss takes per-example log-probabilities *summed* over each answer's tokens (see
`spo_align.train.logps.sequence_logps`) and returns per-example, unreduced losses plus detached rewards for
logging. Losses are computed in at least fp32 whatever the input dtype (fp64 inputs stay fp64, which keeps
``torch.autograd.gradcheck`` usable). The maths, each optimum and two corrections to the SPO paper are
derived in ``docs/losses.md``.

Notation: for a pair (y_w chosen, y_l rejected),
``chosen log-ratio = log pi(y_w) - log pi_ref(y_w)``, ``rejected log-ratio = log pi(y_l) - log pi_ref(y_l)``
and the margin ``delta = chosen log-ratio - rejected log-ratio``.

torch is imported inside the functions, never at module level: the sections here are part of every recipe,
which the base install validates without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import Field

from spo_align.section import Section

if TYPE_CHECKING:
    import torch


class PairLossSection(Section):
    """A pairwise loss, trained by this project's preference trainer. Each one ends with `nll_weight`."""


def nll_weight_field() -> float:
    """The `nll_weight` field every pairwise section ends with."""
    return Field(  # type: ignore[no-any-return]
        0.0,
        ge=0,
        description="Weight w of an NLL term on the chosen answer, added to the pair loss: w * (-log pi(chosen)) "
        "per token of the chosen answer (the 'DPO + SFT term' / RPO fix for falling chosen likelihoods); logged "
        "as nll_term. 0 (default) adds nothing. It moves the loss's optimum: docs/losses.md.",
    )


@dataclass(frozen=True)
class PairLoss:
    """Result of a pairwise loss.

    ``losses`` is [B], unreduced, differentiable. ``chosen_rewards`` / ``rejected_rewards`` are [B],
    detached: the loss's implicit reward of each answer (its entry's `reward` says which). ``terms`` holds
    named per-example parts of the loss, detached, for logging (SPO: ``spo_margin_term`` and
    ``spo_rejected_term``; DPOP: ``dpop_penalty``; any loss with an NLL term: ``nll_term``).
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
    the NLL term; `spo_align.train.logps.token_counts` counts them from the batch labels).
    ``ref_chosen`` / ``ref_rejected``: the reference's summed log-probs, or None for a reference-free loss
    (the trainer computes them only when the loss's entry needs a reference).
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
    import torch

    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def same_shape(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    shape = tensors[names[0]].shape
    for name in names[1:]:
        if tensors[name].shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, {names[0]} has {tuple(shape)}")


def log_ratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen log-ratio, rejected log-ratio) in the compute dtype, after checking shapes agree."""
    same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dtype = compute_dtype(*tensors)
    pc, pr, rc, rr = (t.to(dtype) for t in tensors)
    return pc - rc, pr - rr


def per_token(logps: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Summed log-probs / token count, in `dtype`; a count below 1 (an empty answer) counts as 1."""
    return logps.to(dtype) / tokens.to(dtype).clamp(min=1.0)


def require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def require_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------- NLL term


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each chosen answer, ``-log pi(y_w) / |y_w|`` ([B], at least fp32)."""
    same_shape(policy_chosen_logps=policy_chosen_logps, chosen_tokens=chosen_tokens)
    return -per_token(policy_chosen_logps, chosen_tokens, compute_dtype(policy_chosen_logps))


def add_nll_term(out: PairLoss, nll: torch.Tensor, weight: float) -> PairLoss:
    """``out`` with ``weight * nll`` added to every example's loss and logged as ``terms["nll_term"]``."""
    require_non_negative("nll_weight", weight)
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
    require_non_negative("nll_weight", weight)

    def loss(inputs: PairInputs) -> PairLoss:
        return add_nll_term(loss_fn(inputs), chosen_nll(inputs.policy_chosen, inputs.chosen_tokens), weight)

    return loss
