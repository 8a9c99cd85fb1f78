"""One run, in this process: check the model set-up, claim the output folder, build the `RunContext`, call
exactly one stage.

`run()` is the whole in-process path. A multi-process launch (see `launch.py`) splits it: the parent
checks and claims the folder (`claim_output`), each worker process calls `execute()`. The stages are
`stages.py`; what a stage does with its Trainer (train, continue, stop, finish) and the `RunContext` it is
handed are `finish.py`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align.losses.registry import loss_entry

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.finish import RunContext

logger = logging.getLogger(__name__)


StageFn = Callable[["RunPlan", "RunContext"], None]


def stage_function(plan: RunPlan) -> StageFn:
    """The stage a plan runs: sft -> run_sft; preference -> its loss entry's stage (run_kto or run_preference)."""
    from spo_align.train.stages import (  # trl and torch, only when a stage runs
        run_kto,
        run_preference,
        run_sft,
    )

    recipe = plan.recipe
    if recipe.stage == "sft":
        return run_sft
    if recipe.loss is None:
        raise ValueError("stage: preference needs a loss section")
    return run_kto if loss_entry(recipe.loss).stage == "kto" else run_preference


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
    plan: RunPlan, *, resume: bool, overwrite: bool, command: str | None = None, primary: bool = True,
    accept_data_change: bool = False,
) -> str | None:
    """Claim the output folder for the plan (`run_folder.claim`); returns the checkpoint to continue from, or None."""
    from spo_align import run_folder

    command = command or train_command(plan.recipe_path, [])
    return run_folder.claim(
        plan, resume=resume, overwrite=overwrite, command=command, primary=primary,
        accept_data_change=accept_data_change,
    )


def build_context(plan: RunPlan, resume_from_checkpoint: str | None, extra_callbacks: Sequence[Any] = ()) -> RunContext:
    """The context of one run: every stage's callbacks (then `extra_callbacks`) and the final save."""
    from spo_align.losses.registry import reward_scale
    from spo_align.train.callbacks import default_callbacks
    from spo_align.train.finish import RunContext, make_save_final

    output_dir = Path(plan.output_dir)
    ctx = RunContext(output_dir=output_dir, resume_from_checkpoint=resume_from_checkpoint)
    scale = None if plan.recipe.loss is None else reward_scale(plan.recipe.loss)
    ctx.callbacks = [*default_callbacks(output_dir, stage_name(plan), scale), *extra_callbacks]
    ctx.save_final = make_save_final(plan, ctx)
    return ctx


def execute(plan: RunPlan, resume_from_checkpoint: str | None, extra_callbacks: Sequence[Any] = ()) -> Path:
    """Run the plan's stage in this process (one rank of a launch, or the whole run), its folder already claimed
    and its model set-up already checked (`run`, or the launching parent)."""
    stage = stage_function(plan)
    ctx = build_context(plan, resume_from_checkpoint, extra_callbacks)
    logger.info("running %s into %s", stage_name(plan), ctx.output_dir)
    with without_deepspeed(plan.deepspeed_config is not None):
        stage(plan, ctx)
    return ctx.output_dir


def run(
    plan: RunPlan, *, resume: bool, overwrite: bool, command: str | None = None, extra_callbacks: Sequence[Any] = (),
    accept_data_change: bool = False,
) -> Path:
    """Run the plan in this process: check its model set-up (before the folder is touched), take the folder's lock
    (`run_folder.hold`: another live run in it is refused) and claim the output folder, then execute its stage
    with `extra_callbacks` attached after every stage's own; returns the folder."""
    from spo_align import run_folder
    from spo_align.train.model import check_model_setup

    check_model_setup(plan)
    command = command or train_command(plan.recipe_path, [])
    with run_folder.hold(Path(plan.output_dir), command=command):  # one live run per folder, until this one ends
        checkpoint = claim_output(
            plan, resume=resume, overwrite=overwrite, command=command, accept_data_change=accept_data_change
        )
        return execute(plan, checkpoint, extra_callbacks)


# ---------------------------------------------------------------- no DeepSpeed import without a DeepSpeed config
# Keep DeepSpeed out of runs that do not use it.
#
# accelerate's `extract_model_from_parallel` (called by every `Accelerator.unwrap_model`, so by the Trainer's
# constructor and its saves) runs ``from deepspeed import DeepSpeedEngine`` whenever the package is installed,
# only to add that class to an `isinstance` check. Importing DeepSpeed costs seconds and memory and prints
# "Setting accelerator to CPU" to stdout on machines without a GPU. A run without a DeepSpeed config cannot hold a
# `DeepSpeedEngine`, so for its duration `without_deepspeed` makes that check see DeepSpeed as absent; runs
# with a DeepSpeed config, and processes that already imported it, are left as they are.
#
_PATCHED = (("accelerate.utils.other", "is_deepspeed_available"),)
"""(module, function name) pairs whose module-level binding decides whether DeepSpeed is imported."""


def _absent() -> bool:
    return False


@contextlib.contextmanager
def without_deepspeed(uses_deepspeed: bool) -> Iterator[None]:
    """For a run that does not use DeepSpeed (`uses_deepspeed` False), keep accelerate from importing it."""
    if uses_deepspeed or "deepspeed" in sys.modules:
        yield
        return
    saved = []
    for module_name, attribute in _PATCHED:
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, _absent)
    try:
        yield
    finally:
        for module, attribute, original in saved:
            setattr(module, attribute, original)
