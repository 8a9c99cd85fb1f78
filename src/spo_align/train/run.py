"""One run, in this process: claim the output folder, build the `RunContext`, call exactly one stage.

`run()` is the whole in-process path. A multi-process launch (see `launch.py`) splits it: the parent
claims the folder (`claim_output`), each worker process calls `execute()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from spo_align.loss_catalogue import loss_entry

    if loss_entry(recipe.loss).stage == "kto":
        from spo_align.train.kto import run_kto

        return run_kto
    from spo_align.train.preference import run_preference

    return run_preference


def train_and_save(trainer: Any, ctx: RunContext) -> None:
    """The end of every TRL-backed stage: quiet the Trainer, train (resuming if asked), save through ctx."""
    from spo_align.train.callbacks import quiet_trainer, restore_token_count

    quiet_trainer(trainer)
    restore_token_count(trainer, ctx.resume_from_checkpoint)
    trainer.train(resume_from_checkpoint=ctx.resume_from_checkpoint)
    if ctx.save_final is not None:
        ctx.save_final(trainer)


def stage_name(plan: RunPlan) -> str:
    recipe = plan.recipe
    return recipe.stage if recipe.loss is None else recipe.loss.type


def claim_output(plan: RunPlan, *, resume: bool, overwrite: bool) -> str | None:
    """Prepare the output folder and write the resolved recipe; returns the checkpoint to resume from."""
    from spo_align.train.outputs import prepare_output_dir, save_resolved_recipe

    checkpoint = prepare_output_dir(Path(plan.output_dir), resume=resume, overwrite=overwrite)
    save_resolved_recipe(plan, Path(plan.output_dir))
    return str(checkpoint) if checkpoint is not None else None


def build_context(plan: RunPlan, resume_from_checkpoint: str | None) -> RunContext:
    from spo_align.train.callbacks import default_callbacks
    from spo_align.train.outputs import make_save_final, now

    output_dir = Path(plan.output_dir)
    ctx = RunContext(output_dir=output_dir, resume_from_checkpoint=resume_from_checkpoint)
    ctx.callbacks = default_callbacks(output_dir, stage_name(plan))
    ctx.save_final = make_save_final(plan, ctx, started=now())
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


def run(plan: RunPlan, *, resume: bool, overwrite: bool) -> Path:
    """Run the plan in this process: claim the output folder, then execute its stage; returns the folder."""
    from spo_align.train.model import check_model_setup

    check_model_setup(plan)
    checkpoint = claim_output(plan, resume=resume, overwrite=overwrite)
    return execute(plan, checkpoint)
