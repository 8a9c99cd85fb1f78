"""How a stage's Trainer trains and how its run finishes: continue a checkpoint, stop on SIGTERM after one,
then save the model, draw the curves and mark the folder complete.

Every stage (`stages.py`) is handed a `RunContext` (by `run.py`), builds its Trainer and calls
`train_and_save` (or `train`, then `ctx.save_final`).

A SIGTERM stops training after a checkpoint at the end of the current step (`train/preemption.py`); the
run is then not finished and `RunStopped` says where to continue from. Each checkpoint carries the steps not yet
logged (`train/callbacks.py`), so the continued run's metrics.jsonl equals an uninterrupted run's.

A run continued from a checkpoint taken at its last step (killed during the final save) does not train:
the Trainer would take one more step before it checks the step count. `train` then loads the checkpoint
through the Trainer (weights, optimizer and, under DeepSpeed, the engine's shards) and stops before the
first step, so the final save writes exactly the checkpoint's weights.

The end (`make_save_final`): the model is saved by every rank (ZeRO-3 gathers its shards); the main process
then draws the curves and hands the folder to `run_folder.complete` (run.json, the model card, every file
flushed, the marker last), so a machine lost at any moment leaves either a finished run whole or a folder
that is not marked finished. A failure to write (a full disk) raises before the marker; a failure to draw
the curves does not stop the run, and the card says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spo_align import run_folder

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the runner hands to a stage: where to write, whether to resume, which callbacks to attach."""

    output_dir: Path
    """Final output folder (model/adapter, tokenizer, resolved recipe, metrics.jsonl, run.json)."""
    resume_from_checkpoint: str | None = None
    """Checkpoint folder to resume from, or None for a fresh run."""
    callbacks: list[Any] = field(default_factory=list)
    """transformers.TrainerCallback instances every stage attaches (metrics.jsonl, progress bar, ...)."""
    save_final: Callable[[Any], None] | None = None
    """Called with the finished Trainer: saves model/adapter + tokenizer and marks the run complete."""
    run_info: dict[str, Any] = field(default_factory=dict)
    """Facts a stage adds for run.json (row-policy counts, padding share, real tokens/s, ...)."""


# ---------------------------------------------------------------- training, continued or stopped


class _AtTheEnd(Exception):
    """Raised by `_StopBeforeTheFirstStep` once the Trainer has loaded the checkpoint."""


class _StopBeforeTheFirstStep(TrainerCallback):
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        raise _AtTheEnd


def _no_draft_card(*args: Any, **kwargs: Any) -> None:
    """TRL writes a draft README.md at every checkpoint; the run's own card is written when it finishes."""


def reached_the_end(checkpoint: str | None) -> bool:
    """True when `checkpoint` was taken at (or past) the run's last step."""
    if checkpoint is None:
        return False
    step, max_steps = run_folder.checkpoint_step(checkpoint)
    return max_steps is not None and step >= max_steps


def train(trainer: Any, ctx: RunContext, *, restore_tokens: bool = False) -> Any | None:
    """Quiet the Trainer and train, continuing `ctx.resume_from_checkpoint`; returns the Trainer's
    `TrainOutput`, or None when the checkpoint is already at the last step (nothing is trained)."""
    from spo_align.train.callbacks import keep_metrics_up_to, quiet_trainer, restore_token_count

    quiet_trainer(trainer)
    if hasattr(trainer, "create_model_card"):
        trainer.create_model_card = _no_draft_card
    if restore_tokens:
        restore_token_count(trainer, ctx.resume_from_checkpoint)
    checkpoint = ctx.resume_from_checkpoint
    if not reached_the_end(checkpoint):
        from spo_align.train.callbacks import install_logging_window

        install_logging_window(trainer, checkpoint)  # the unlogged steps' sums travel in each checkpoint
        return _train_until_done_or_stopped(trainer, ctx, checkpoint)
    step, _ = run_folder.checkpoint_step(checkpoint)  # type: ignore[arg-type]
    logger.info("%s was taken at the last step (%d): finishing the run without training", checkpoint, step)
    if trainer.is_world_process_zero():
        keep_metrics_up_to(ctx.output_dir, step)
    # First in line: no other callback starts (progress bar, reference pass) for a run that will not train.
    trainer.callback_handler.callbacks.insert(0, _StopBeforeTheFirstStep())
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except _AtTheEnd:
        pass
    finally:
        trainer.callback_handler.callbacks = [
            cb for cb in trainer.callback_handler.callbacks if not isinstance(cb, _StopBeforeTheFirstStep)
        ]
    return None


def _train_until_done_or_stopped(trainer: Any, ctx: RunContext, checkpoint: str | None) -> Any:
    """`trainer.train`, raising `RunStopped` when a SIGTERM stopped it early (its checkpoint saved)."""
    from spo_align.train.preemption import RunStopped, SaveOnSigterm, stopped_early

    stop = SaveOnSigterm()
    trainer.add_callback(stop)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        trainer.remove_callback(stop)
    if stopped_early(stop, trainer.state):
        step = trainer.state.global_step
        raise RunStopped(step, str(ctx.output_dir / f"checkpoint-{step}"))
    return result


def train_and_save(trainer: Any, ctx: RunContext, *, restore_tokens: bool = True) -> Any | None:
    """`train`, then the final save through `ctx.save_final` (model, run.json, model card, marker)."""
    result = train(trainer, ctx, restore_tokens=restore_tokens)
    if ctx.save_final is not None:
        ctx.save_final(trainer)
    return result


# ---------------------------------------------------------------- the end of a run


def draw_curves(output_dir: Path) -> str | None:
    """Draw metrics.png; returns None when drawn, else why not. A write error (a full disk) is raised."""
    from spo_align.plots.compare import plot_runs

    try:
        plot_runs([Path(output_dir)], Path(output_dir) / run_folder.CURVES, every_curve=True)
    except Exception as exc:  # noqa: BLE001 - the card says what went wrong; the run itself is fine
        if run_folder.is_write_failure(exc):
            raise
        logger.warning("the curves could not be drawn: %s", exc)
        return f"{type(exc).__name__}: {exc}"
    return None


def make_save_final(plan: RunPlan, ctx: RunContext) -> Any:
    """The `RunContext.save_final` callable."""

    def save_final(trainer: Any) -> None:
        output_dir = ctx.output_dir
        _to_recipe_dtype(trainer, plan)
        trainer.save_model(str(output_dir))  # every rank: ZeRO-3 gathers the shards here
        if trainer.is_world_process_zero():
            tokenizer = getattr(trainer, "processing_class", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(output_dir))
            if plan.recipe.adapter is not None and plan.recipe.output.save_merged:
                _save_merged(trainer, output_dir / "merged", tokenizer)
            run_folder.complete(
                output_dir, plan, resumed_from=ctx.resume_from_checkpoint, facts=ctx.run_info,
                curves_error=draw_curves(output_dir),
            )
        # The other ranks wait for the marker: a rank that exits while rank 0 still writes can take the
        # launch down with it (torchrun stops every rank when one ends badly).
        trainer.accelerator.wait_for_everyone()

    return save_final


def _to_recipe_dtype(trainer: Any, plan: RunPlan) -> None:
    """A bfloat16 run that trained float32 master weights (`model.fp32_master_weights`) is saved in bfloat16, the
    dtype its recipe names: half the size, and what `from_pretrained(dtype="auto")` then loads. Checkpoints keep
    the float32 weights (a continued run needs them); training is over when this runs."""
    import torch

    from spo_align.train.model import fp32_master_weights

    if fp32_master_weights(plan):
        trainer.accelerator.unwrap_model(trainer.model).to(torch.bfloat16)
        logger.info("saving the model in bfloat16 (trained as float32 master weights under bfloat16 autocast)")


def _save_merged(trainer: Any, path: Path, tokenizer: Any) -> None:
    import copy

    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    logger.info("saved the merged model to %s", path)
