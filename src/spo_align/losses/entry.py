"""What the project knows about one loss: its `LossEntry`, and the metrics the training stages log.

Each loss module of this package ends with one `ENTRY = LossEntry(...)`; `registry.py` collects them. An
entry says how to build the loss (importing torch only when called), whether it needs a reference model,
what its logged rewards are and by what they scale the log-ratio, where its optimum lies (for `spo
resolve`), which terms it logs, how plots colour and label it, and the recipe checks only it needs.

No torch here: recipes are validated and resolved with the base install alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from spo_align.section import Finding

if TYPE_CHECKING:
    from spo_align.losses.pair import PairLossFn

Optimum = dict[str, float | None]
"""Named quantities at the loss's minimum (summed log-ratios unless the name says otherwise); None: no finite value."""
Stage = Literal["pair", "kto"]
"""pair: this project's preference trainer (`train/preference_trainer.py`); kto: TRL's KTOTrainer (`train/stages.py`)."""

LOG_RATIO_NOTE = "summed log-ratios (policy - reference) where the loss is minimal"
"""The `optimum_note` of a loss whose optimum is given in summed log-ratios."""


@dataclass(frozen=True)
class Metric:
    """A value the trainer logs to metrics.jsonl: its key, its progress-bar label, what it is, its plot title."""

    name: str
    label: str
    meaning: str
    title: str = ""
    """The title of its panel in `spo plot` (a loss term's panel); empty: the name."""


PAIR_METRICS: tuple[Metric, ...] = (
    Metric("rewards/chosen", "r_c", "the loss's implicit reward of the chosen answer (see the entry's reward)"),
    Metric("rewards/rejected", "r_r", "the implicit reward of the rejected answer"),
    Metric("rewards/margins", "margin", "rewards/chosen - rewards/rejected"),
    Metric("rewards/accuracies", "acc", "share of pairs whose chosen reward is above the rejected one"),
    Metric("logps/chosen", "logp_c", "policy log-prob of the chosen answer, summed over its tokens"),
    Metric("logps/rejected", "logp_r", "policy log-prob of the rejected answer, summed over its tokens"),
)
"""What the preference trainer logs for every pairwise loss."""

NLL_TERM = Metric(
    "nll_term", "nll", "nll_weight x per-token NLL of the chosen answer (only when nll_weight > 0)",
    "NLL term on the chosen answer (per token)",
)
BOTH_BELOW_REF = Metric(
    "both_below_ref", "both_below", "share of pairs whose chosen and rejected log-probs are both below the reference"
)
"""Logged only by losses with a reference (a reference-free loss has nothing to compare with)."""


def no_checks(recipe: Any) -> Iterator[Finding]:
    """The `checks` of a loss that needs none beyond the schema's."""
    return iter(())


def no_parameters(loss: Any) -> str:
    return ""


@dataclass(frozen=True)
class LossEntry:
    """Everything the project knows about one loss type."""

    type: str
    """The recipe's `loss.type`."""
    title: str
    """How tables and docs name it."""
    order: int
    """Where it is listed (schema, messages, tables, progress bar): entries are sorted by it."""
    colour: str
    """Its line colour in `spo plot` (a matplotlib colour name) when one run of it is drawn."""
    section: type[Any]
    """Its recipe section (a `spo_align.section.Section` whose `type` field is `Literal[<type>]`)."""
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
    checks: Callable[[Any], Iterator[Finding]] = no_checks
    """Cross-field recipe checks that only this loss needs, called with the whole recipe (`recipe.schema.Recipe`,
    a package above this one, so it is typed here by what the check reads)."""
    reads_unpaired_rows: bool = False
    """Whether it trains on unpaired prompt/completion/label rows (data format kto)."""
    parameters: Callable[[Any], str] = no_parameters
    """section -> its key parameters for a run's label (`spo plot`): "β=0.2 α=1"."""
