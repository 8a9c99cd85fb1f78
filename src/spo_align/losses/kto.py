"""KTO (Ethayarajh et al. 2024) on unpaired desirable/undesirable examples: its recipe section and its entry.

KTO trains through TRL's KTOTrainer (`train/stages.py`), not through this project's pair trainer, so it has
no tensor function here: its entry says so (stage "kto", no `build`), brings the recipe checks its KL
reference point needs, and tells the data side that it reads unpaired rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from spo_align.losses.entry import LossEntry, Metric
from spo_align.section import Finding, Section


class KTOLoss(Section):
    type: Literal["kto"]
    beta: float = Field(0.1, gt=0, description="KTO inverse temperature.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable (chosen) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable (rejected) examples.")


def _checks(recipe: Any) -> Iterator[Finding]:
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


def _parameters(loss: KTOLoss) -> str:
    weights = (loss.desirable_weight, loss.undesirable_weight)
    return f"β={loss.beta:g}" + ("" if weights == (1.0, 1.0) else f" λD={weights[0]:g} λU={weights[1]:g}")


ENTRY = LossEntry(
    type="kto",
    title="KTO",
    order=90,
    colour="tab:orange",
    section=KTOLoss,
    stage="kto",
    needs_reference=True,
    reward="beta x log pi/pi_ref (summed) of desirable / undesirable examples (TRL's KTOTrainer)",
    reward_scale=lambda loss: float(loss.beta),
    optimum=lambda loss: None,
    optimum_note="no finite optimum; the gradient fades once an example sits a few 1/beta past the "
    "reference point",
    terms=(Metric("kl", "kl", "the reference point z0: TRL's estimate of KL(pi || pi_ref), clamped at 0",
                  "KTO reference point z₀ (kl)"),),
    checks=_checks,
    reads_unpaired_rows=True,
    parameters=_parameters,
)
