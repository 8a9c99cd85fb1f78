"""What every stage does once its Trainer is built: train (continuing a checkpoint if asked), then finish.

Stages (`sft`, `kto`, `preference`) import this module; it imports none of them, so the runner
(`run.py`) and the stages import each other through nothing.

A SIGTERM stops training after a checkpoint at the end of the current step (`train/preemption.py`); the
run is then not finished and `RunStopped` says where to continue from.

A run continued from a checkpoint taken at its last step (killed during the final save) does not train:
the Trainer would take one more step before it checks the step count. `train` then loads the checkpoint
through the Trainer (weights, optimizer and, under DeepSpeed, the engine's shards) and stops before the
first step, so the final save writes exactly the checkpoint's weights.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)


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
    from spo_align.run_folder import checkpoint_step

    step, max_steps = checkpoint_step(checkpoint)
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
        return _train_until_done_or_stopped(trainer, ctx, checkpoint)
    from spo_align.run_folder import checkpoint_step

    step, _ = checkpoint_step(checkpoint)  # type: ignore[arg-type]
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
