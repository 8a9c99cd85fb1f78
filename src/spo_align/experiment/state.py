"""Where each stage of an experiment stands before it runs: `done` (finished, same recipe: skipped), `changed`
(finished with another recipe), `stale` (a preference run of an SFT run that changed, is newer, or will train
again), `resume` or `to run`; the refusal of changed and stale stages, and forgetting a retrained model's answers.

A stage's recipe is compared with its finished run's as `spo train` compares them (`run_folder.recipe_changes`,
the deciding keys of the resolved recipe); like `spo train` on a finished run, a changed one is refused unless
asked to train it again (`--rerun-changed`, as `spo train --overwrite`). `runner.py` runs the stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spo_align.experiment.spec import LoadedExperiment, StageStep, plan_stages
from spo_align.run_folder import finished_at

logger = logging.getLogger(__name__)


class ExperimentError(ValueError):
    """The experiment cannot go on (a stage failed, a file is inconsistent); the message says where."""


def _device() -> Literal["cpu", "cuda"]:
    from spo_align.train.model import cuda_available

    return "cuda" if cuda_available() else "cpu"


RERUN_FLAG = "--rerun-changed"

StateName = Literal["done", "changed", "stale", "resume", "to run"]


@dataclass(frozen=True)
class StageState:
    """Where a stage stands before the experiment runs it, and why (for `changed` and `stale`)."""

    name: StateName
    why: str = ""

    @property
    def trains(self) -> bool:
        return self.name != "done"


def stage_plan(step: StageStep) -> Any:
    """The stage's resolved recipe (`RunPlan`), as `spo train` would resolve it on this machine."""
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve

    return resolve(load_recipe(step.recipe_path, step.overrides), step.recipe_path, _device())


def stage_state(step: StageStep, starts_from: Path | None = None, upstream: StageState | None = None) -> StageState:
    """`done` (finished, same recipe: skipped), `changed` (finished with another recipe: `why` names the keys,
    old -> new, compared as `spo train` compares them), `stale` (finished, but from an SFT run that is newer or
    will be trained again: `upstream` is that SFT stage's state), `resume` or `to run`."""
    from spo_align.run_folder import recipe_changes

    done = finished_at(step.output_dir)
    if done is None:
        started = step.output_dir.is_dir() and any(step.output_dir.iterdir())
        return StageState("resume" if started else "to run")
    changes = recipe_changes(step.output_dir, stage_plan(step))
    if changes:
        return StageState("changed", "; ".join(changes))
    if starts_from is not None:
        if upstream is not None and upstream.trains:
            return StageState("stale", f"the SFT run it starts from ({starts_from}) is {upstream.name}")
        base_done = finished_at(starts_from)
        if base_done is not None and base_done > done:
            return StageState("stale", f"it predates the SFT run it starts from ({starts_from})")
    return StageState("done")


def refusal(step: StageStep, state: StageState) -> str:
    if state.name == "changed":
        return (f"seed {step.seed} {step.name}: the finished run in {step.output_dir} was trained with another recipe "
                f"({state.why}); pass {RERUN_FLAG} to train it again (and the runs that start from it), or undo the "
                "change")
    return (f"seed {step.seed} {step.name}: the finished run in {step.output_dir} is stale: {state.why}; pass "
            f"{RERUN_FLAG} to train it again")


def stage_states(experiment: LoadedExperiment) -> list[tuple[StageStep, StageState]]:
    """Every stage in order, with its state (a preference stage is stale when its seed's SFT stage will train)."""
    states: dict[tuple[int, str], StageState] = {}
    sft_name = experiment.spec.sft.name if experiment.spec.sft is not None else None
    out = []
    for step in plan_stages(experiment):
        if sft_name is None or step.name == sft_name:  # a `start:` model is an input: a change shows in its recipe
            state = stage_state(step)
        else:
            state = stage_state(step, experiment.seed_dir(step.seed) / sft_name, states[(step.seed, sft_name)])
        states[(step.seed, step.name)] = state
        out.append((step, state))
    return out


def check_stages(experiment: LoadedExperiment, rerun_changed: bool = False) -> list[tuple[StageStep, StageState]]:
    """`stage_states`, before anything runs; raises `ExperimentError` naming every finished stage whose recipe
    changed or that is stale, unless `rerun_changed` (then they are trained again, as `spo train --overwrite`)."""
    states = stage_states(experiment)
    refused = [refusal(step, state) for step, state in states if state.name in ("changed", "stale")]
    if refused and not rerun_changed:
        raise ExperimentError("\n".join(refused))
    return states


def forget_evaluation(experiment: LoadedExperiment, seed: int, name: str) -> None:
    """Drop a model's answers and every judgment that involves it, before it is trained (again): the answers of
    the old model must not stand for the new one's."""
    from spo_align.eval.judge_store import read_judgments
    from spo_align.run_folder import write_durably

    seed_dir = experiment.seed_dir(seed)
    (seed_dir / "generations" / f"{name}.jsonl").unlink(missing_ok=True)
    judgments = seed_dir / "judgments.jsonl"
    if judgments.is_file():
        records = read_judgments(judgments)
        kept = [r for r in records if name not in (r.model_a, r.model_b)]
        if len(kept) != len(records):
            write_durably(judgments, "".join(r.to_json() + "\n" for r in kept))
