"""One run, in this process: claim the output folder, build the `RunContext`, call exactly one stage.

`run()` is the whole in-process path. A multi-process launch (see `launch.py`) splits it: the parent
claims the folder (`claim_output`), each worker process calls `execute()`. What a stage does with its
Trainer (train, continue, finish) is in `loop.py`, which the stages import.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from spo_align.train.context import RunContext

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)

StageFn = Callable[["RunPlan", RunContext], None]


def stage_function(plan: RunPlan) -> StageFn:
    """The stage a plan runs: sft -> run_sft; preference -> the loss's catalogue stage (run_kto or run_preference)."""
    recipe = plan.recipe
    if recipe.stage == "sft":
        from spo_align.train.sft import run_sft

        return run_sft
    if recipe.loss is None:
        raise ValueError("stage: preference needs a loss section")
    from spo_align.losses.registry import loss_entry

    if loss_entry(recipe.loss).stage == "kto":
        from spo_align.train.kto import run_kto

        return run_kto
    from spo_align.train.preference import run_preference

    return run_preference


def stage_name(plan: RunPlan) -> str:
    recipe = plan.recipe
    return recipe.stage if recipe.loss is None else recipe.loss.type


def train_command(recipe_path: Path, overrides: Sequence[str]) -> str:
    """The `spo train` command line that runs this plan again (recorded in run.json and the model card)."""
    args = ["spo", "train", str(recipe_path)]
    for override in overrides:
        args += ["--set", override]
    return shlex.join(args)


def claim_output(
    plan: RunPlan, *, resume: bool, overwrite: bool, command: str | None = None, primary: bool = True
) -> str | None:
    """Claim the output folder for the plan (`run_folder.claim`); returns the checkpoint to continue from, or None."""
    from spo_align import run_folder

    command = command or train_command(plan.recipe_path, [])
    return run_folder.claim(plan, resume=resume, overwrite=overwrite, command=command, primary=primary)


def build_context(plan: RunPlan, resume_from_checkpoint: str | None) -> RunContext:
    from spo_align.train.callbacks import default_callbacks
    from spo_align.train.finish import make_save_final

    output_dir = Path(plan.output_dir)
    ctx = RunContext(output_dir=output_dir, resume_from_checkpoint=resume_from_checkpoint)
    ctx.callbacks = default_callbacks(output_dir, stage_name(plan))
    ctx.save_final = make_save_final(plan, ctx)
    return ctx


def execute(plan: RunPlan, resume_from_checkpoint: str | None) -> Path:
    """Run the plan's stage in this process (one rank of a launch, or the whole run)."""
    from spo_align.train.model import check_model_setup

    check_model_setup(plan)  # before any weights or data are read
    stage = stage_function(plan)
    ctx = build_context(plan, resume_from_checkpoint)
    logger.info("running %s into %s", stage_name(plan), ctx.output_dir)
    stage(plan, ctx)
    return ctx.output_dir


def run(plan: RunPlan, *, resume: bool, overwrite: bool, command: str | None = None) -> Path:
    """Run the plan in this process: claim the output folder, then execute its stage; returns the folder."""
    from spo_align.train.model import check_model_setup

    check_model_setup(plan)
    checkpoint = claim_output(plan, resume=resume, overwrite=overwrite, command=command)
    return execute(plan, checkpoint)
