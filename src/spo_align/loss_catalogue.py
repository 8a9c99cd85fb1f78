"""The loss catalogue: one entry per loss type, with everything the rest of the project knows about it.

An entry says how to build the loss (importing torch only when called), whether it needs a reference
model, what its logged rewards are and by what they scale the log-ratio, where its optimum lies (for
`spo resolve`), which terms it logs, and the recipe checks that only it needs. Everything that used to
ask "which loss is this?" asks the catalogue instead: `recipe/resolve` (optimum), `recipe/checks`,
`train/preference` (build, reference), `train/run` (which stage), `train/callbacks` and `train/plot`
(metric names), `eval/experiment_report` (reward scale).

Adding a loss: its schema section (`recipe/schema.py`), its pure function with closed-form tests
(`spo_align.pair_losses`), and its entry here. The derivations behind each optimum are in docs/losses.md.

This module imports no torch: recipes are validated and resolved with the base install alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from spo_align.recipe.schema import DPOLoss, DPOPLoss, IPOLoss, KTOLoss, SimPOLoss, SPOLoss

if TYPE_CHECKING:
    from spo_align.pair_losses import PairInputs, PairLossFn
    from spo_align.recipe.schema import Recipe

Optimum = dict[str, float | None]
"""Named quantities at the loss's minimum (summed log-ratios unless the name says otherwise); None: no finite value."""
Finding = tuple[tuple[str | int, ...], str]
"""(key path in the recipe, message), as `recipe/checks.py` yields them."""
Stage = Literal["pair", "kto"]
"""pair: this project's preference trainer (`train/preference.py`); kto: TRL's KTOTrainer (`train/kto.py`)."""


@dataclass(frozen=True)
class Metric:
    """A value the trainer logs to metrics.jsonl: its key, its progress-bar label, what it is."""

    name: str
    label: str
    meaning: str


PAIR_METRICS: tuple[Metric, ...] = (
    Metric("rewards/chosen", "r_c", "the loss's implicit reward of the chosen answer (see the entry's reward)"),
    Metric("rewards/rejected", "r_r", "the implicit reward of the rejected answer"),
    Metric("rewards/margins", "margin", "rewards/chosen - rewards/rejected"),
    Metric("rewards/accuracies", "acc", "share of pairs whose chosen reward is above the rejected one"),
    Metric("logps/chosen", "logp_c", "policy log-prob of the chosen answer, summed over its tokens"),
    Metric("logps/rejected", "logp_r", "policy log-prob of the rejected answer, summed over its tokens"),
)
"""What the preference trainer logs for every pairwise loss."""

NLL_TERM = Metric("nll_term", "nll", "nll_weight x per-token NLL of the chosen answer (only when nll_weight > 0)")
BOTH_BELOW_REF = Metric(
    "both_below_ref", "both_below", "share of pairs whose chosen and rejected log-probs are both below the reference"
)
"""Logged only by losses with a reference (a reference-free loss has nothing to compare with)."""


def _no_checks(recipe: Recipe) -> Iterator[Finding]:
    return iter(())


@dataclass(frozen=True)
class LossEntry:
    """Everything the project knows about one loss type."""

    type: str
    """The recipe's `loss.type`."""
    title: str
    """How tables and docs name it."""
    section: type[Any]
    """Its schema section in `recipe/schema.py`."""
    stage: Stage
    needs_reference: bool
    """False: no reference model is loaded, precomputed or run, and `reference.*` keys are refused."""
    reward: str
    """What `rewards/chosen` and `rewards/rejected` are for this loss."""
    reward_scale: Callable[[Any], float | None]
    """The factor by which `rewards/*` multiply the summed log-ratio; None when the rewards are no log-ratio."""
    optimum: Callable[[Any], Optimum | None]
    """Where the pair term's minimum lies, for `spo resolve`; None for a loss whose optimum takes no such form."""
    optimum_note: str
    """One line for `spo resolve`: the optimum's units, or why there is none."""
    terms: tuple[Metric, ...] = ()
    """Loss-specific terms it logs besides `PAIR_METRICS` (and `nll_term`)."""
    build: Callable[[Any], PairLossFn] | None = None
    """section -> the function over `PairInputs` (stage pair; imports torch when called)."""
    checks: Callable[[Recipe], Iterator[Finding]] = _no_checks
    """Cross-field recipe checks that only this loss needs."""
    reads_unpaired_rows: bool = False
    """Whether it trains on unpaired prompt/completion/label rows (data format kto)."""
    parameters: Callable[[Any], str] = lambda loss: ""
    """section -> its key parameters for a run's label (`spo plot`): "β=0.2 α=1"."""


# ---------------------------------------------------------------- builders (torch imported when called)


def _build_spo(loss: SPOLoss) -> PairLossFn:
    from spo_align.pair_losses import spo_loss

    def fn(x: PairInputs) -> Any:
        return spo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta, alpha=loss.alpha,
                        z_floor=loss.z_floor)

    return fn


def _build_dpo(loss: DPOLoss) -> PairLossFn:
    from spo_align.pair_losses import dpo_loss

    def fn(x: PairInputs) -> Any:
        return dpo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta,
                        label_smoothing=loss.label_smoothing)

    return fn


def _build_ipo(loss: IPOLoss) -> PairLossFn:
    from spo_align.pair_losses import ipo_loss

    def fn(x: PairInputs) -> Any:
        return ipo_loss(x.policy_chosen, x.policy_rejected, *x.reference(), tau=loss.resolved_tau)

    return fn


def _build_dpop(loss: DPOPLoss) -> PairLossFn:
    from spo_align.pair_losses import dpop_loss

    def fn(x: PairInputs) -> Any:
        return dpop_loss(x.policy_chosen, x.policy_rejected, *x.reference(), beta=loss.beta, lambda_=loss.lambda_)

    return fn


def _build_simpo(loss: SimPOLoss) -> PairLossFn:
    from spo_align.pair_losses import simpo_loss

    def fn(x: PairInputs) -> Any:
        return simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens, beta=loss.beta,
                          gamma=loss.gamma)

    return fn


# ---------------------------------------------------------------- optima (derived in docs/losses.md)


def _spo_optimum(loss: SPOLoss) -> Optimum:
    return {
        "margin": 1.0 / loss.beta,
        "rejected_log_ratio": -1.0 / loss.alpha,
        "chosen_log_ratio": 1.0 / loss.beta - 1.0 / loss.alpha,
    }


def _dpo_optimum(loss: DPOLoss) -> Optimum:
    eps = loss.label_smoothing
    return {"margin": math.log((1.0 - eps) / eps) / loss.beta if eps > 0 else None}


def _ipo_optimum(loss: IPOLoss) -> Optimum:
    return {"margin": 1.0 / (2.0 * loss.resolved_tau)}


def _dpop_optimum(loss: DPOPLoss) -> Optimum:
    return {"margin": None}


def _simpo_optimum(loss: SimPOLoss) -> Optimum:
    return {"per_token_margin": None, "gamma_over_beta": loss.gamma / loss.beta}


def _none(loss: Any) -> None:
    return None


# ---------------------------------------------------------------- loss-specific checks


def _kto_checks(recipe: Recipe) -> Iterator[Finding]:
    if recipe.training.per_device_batch_size < 2:
        yield ("training", "per_device_batch_size"), (
            "KTO needs per_device_batch_size >= 2: its KL reference point pairs each completion with "
            "another example's prompt from the same micro-batch"
        )
    if recipe.data.packing:
        yield ("data", "packing"), (
            "packing is not supported with loss 'kto': its KL term mixes completions and prompts across "
            "the batch, which packed rows do not keep; set 'packing: false'"
        )


def _kto_parameters(loss: KTOLoss) -> str:
    weights = (loss.desirable_weight, loss.undesirable_weight)
    return f"β={loss.beta:g}" + ("" if weights == (1.0, 1.0) else f" λD={weights[0]:g} λU={weights[1]:g}")


# ---------------------------------------------------------------- the catalogue

_LOG_RATIO_NOTE = "summed log-ratios (policy - reference) where the loss is minimal"

CATALOGUE: dict[str, LossEntry] = {
    entry.type: entry
    for entry in (
        LossEntry(
            type="spo",
            title="SPO",
            section=SPOLoss,
            stage="pair",
            needs_reference=True,
            reward="beta x log pi/pi_ref (summed over the answer)",
            reward_scale=lambda loss: float(loss.beta),
            optimum=_spo_optimum,
            optimum_note=_LOG_RATIO_NOTE,
            terms=(
                Metric("spo_margin_term", "spo_m", "f(beta x margin), SPO's margin term"),
                Metric("spo_rejected_term", "spo_r", "f(-alpha x rejected log-ratio), SPO's rejected term"),
            ),
            build=_build_spo,
            parameters=lambda loss: f"β={loss.beta:g} α={loss.alpha:g}",
        ),
        LossEntry(
            type="dpo",
            title="DPO",
            section=DPOLoss,
            stage="pair",
            needs_reference=True,
            reward="beta x log pi/pi_ref (summed over the answer)",
            reward_scale=lambda loss: float(loss.beta),
            optimum=_dpo_optimum,
            optimum_note=_LOG_RATIO_NOTE + "; plain DPO (label_smoothing 0) has none",
            build=_build_dpo,
            parameters=lambda loss: f"β={loss.beta:g} ε={loss.label_smoothing:g}",
        ),
        LossEntry(
            type="ipo",
            title="IPO",
            section=IPOLoss,
            stage="pair",
            needs_reference=True,
            reward="2 tau x log pi/pi_ref (summed), so the reward margin is 1 at the optimum",
            reward_scale=lambda loss: 2.0 * loss.resolved_tau,
            optimum=_ipo_optimum,
            optimum_note=_LOG_RATIO_NOTE,
            build=_build_ipo,
            parameters=lambda loss: f"τ={loss.resolved_tau:g}",
        ),
        LossEntry(
            type="dpop",
            title="DPOP",
            section=DPOPLoss,
            stage="pair",
            needs_reference=True,
            reward="beta x log pi/pi_ref (summed over the answer), as DPO",
            reward_scale=lambda loss: float(loss.beta),
            optimum=_dpop_optimum,
            optimum_note="no finite optimum: the margin grows for ever, as in DPO; while the chosen log-ratio is "
            "below 0 it is pulled up (1 + lambda) times harder (docs/losses.md)",
            terms=(Metric("dpop_penalty", "dpop_pen", "lambda x max(0, -chosen log-ratio), in nats"),),
            build=_build_dpop,
            parameters=lambda loss: f"β={loss.beta:g} λ={loss.lambda_:g}",
        ),
        LossEntry(
            type="simpo",
            title="SimPO",
            section=SimPOLoss,
            stage="pair",
            needs_reference=False,
            reward="beta x per-token mean log pi (no reference, so no log-ratio)",
            reward_scale=_none,
            optimum=_simpo_optimum,
            optimum_note="no finite optimum: the per-token log-prob margin is pushed past gamma/beta for ever "
            "(docs/losses.md)",
            build=_build_simpo,
            parameters=lambda loss: f"β={loss.beta:g} γ={loss.gamma:g}",
        ),
        LossEntry(
            type="kto",
            title="KTO",
            section=KTOLoss,
            stage="kto",
            needs_reference=True,
            reward="beta x log pi/pi_ref (summed) of desirable / undesirable examples (TRL's KTOTrainer)",
            reward_scale=lambda loss: float(loss.beta),
            optimum=_none,
            optimum_note="no finite optimum; the gradient fades once an example sits a few 1/beta past the "
            "reference point",
            terms=(Metric("kl", "kl", "the reference point z0: TRL's estimate of KL(pi || pi_ref), clamped at 0"),),
            checks=_kto_checks,
            reads_unpaired_rows=True,
            parameters=_kto_parameters,
        ),
    )
}
"""Every loss type, in the order docs and tables list them."""

TYPES: tuple[str, ...] = tuple(CATALOGUE)


def loss_entry(loss: Any) -> LossEntry:
    """The entry of a loss section (or of a `loss.type` string)."""
    name = loss if isinstance(loss, str) else getattr(loss, "type", None)
    if name not in CATALOGUE:
        raise ValueError(f"no catalogue entry for loss type {name!r}; known: {', '.join(TYPES)}")
    return CATALOGUE[name]


def build_pair_loss(loss: Any) -> PairLossFn:
    """The function over `PairInputs` for a pairwise loss section, with its NLL term when nll_weight > 0."""
    entry = loss_entry(loss)
    if entry.stage != "pair" or entry.build is None:
        pair_types = ", ".join(t for t, e in CATALOGUE.items() if e.stage == "pair")
        raise ValueError(f"loss {entry.type!r} is not a pairwise loss ({pair_types})")
    fn = entry.build(loss)
    weight = float(getattr(loss, "nll_weight", 0.0))
    if weight > 0:
        from spo_align.pair_losses import with_nll_term

        fn = with_nll_term(fn, weight)
    return fn


def loss_optimum(loss: Any) -> Optimum | None:
    """Where the loss's pair term is minimal (None for no loss, or a loss without one; docs/losses.md)."""
    return None if loss is None else loss_entry(loss).optimum(loss)


def optimum_note(loss: Any) -> str:
    """The `spo resolve` note on `loss_optimum`, saying when an NLL term moves it."""
    if loss is None:
        return ""
    note = loss_entry(loss).optimum_note
    weight = float(getattr(loss, "nll_weight", 0.0))
    if weight > 0:
        note += f"; of the pair term alone: the NLL term (nll_weight {weight:g}) moves it (docs/losses.md)"
    return note


def reward_scale(loss: Any) -> float | None:
    """What the runner's `rewards/*` are the log-ratio multiplied by; None when they are no log-ratio (SimPO)."""
    return loss_entry(loss).reward_scale(loss)


def loss_label(loss: Any) -> str:
    """A run's loss and key parameters, e.g. `spo β=0.2 α=1`, `dpo β=0.1 ε=0.1 +nll 1` (tables, `spo plot`)."""
    parameters = loss_entry(loss).parameters(loss)
    nll = float(getattr(loss, "nll_weight", 0.0))
    return f"{loss.type}{' ' + parameters if parameters else ''}" + (f" +nll {nll:g}" if nll > 0 else "")


def logged_metrics() -> tuple[Metric, ...]:
    """Every loss-related metric the stages log, in display order: rewards and log-probs, each loss's
    terms (catalogue order), the NLL term, and the both-below-reference share."""
    terms = [term for entry in CATALOGUE.values() for term in entry.terms]
    return (*PAIR_METRICS, *terms, NLL_TERM, BOTH_BELOW_REF)
