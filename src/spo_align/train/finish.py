"""The end of a run: the model (or adapter) and tokenizer, the curves, then the folder marked complete.

The model is saved by every rank (ZeRO-3 gathers its shards); the main process then draws the curves and
hands the folder to `run_folder.complete` (run.json, the model card, every file flushed, the marker last), so
a machine lost at any moment leaves either a finished run whole or a folder that is not marked finished. A
failure to write (a full disk) raises before the marker; a failure to draw the curves does not stop the run,
and the card says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo_align import run_folder

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.context import RunContext

logger = logging.getLogger(__name__)


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
