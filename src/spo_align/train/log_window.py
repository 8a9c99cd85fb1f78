"""The logging window a checkpoint carries, so that a continued run logs what an uninterrupted one logs.

Between two logging steps the Trainer and the stage trainers accumulate what the next record averages: the
Trainer's summed loss (`_tr_loss`, per rank) since `_globalstep_last_logged`, and the stage trainer's per-step
metric lists (`_metrics["train"]`: rewards, log-probs, entropy, ... ; ours and TRL's alike, gathered over the
ranks when appended). TRL's SFT and KTO trainers also count the tokens trained on (`_total_train_tokens`, logged
as `num_tokens`), and the Trainer sums every logged loss (`_total_loss_scalar`) for the closing `train_loss`. None
of this is in a Trainer checkpoint, so a run stopped at step 13 with `logging_steps: 10` and continued logged the
mean of steps 14-20 at step 20, a token count that restarted from step 10's, and a `train_loss` over the continued
session only.

`LoggingWindow` writes that state into every checkpoint (`logging_window_<rank>.json`, each rank its own, before
the checkpoint is sealed: `run_folder/checkpoints.py` counts it as that rank's file) and puts it back when training
continues from one, after the Trainer has reset it. The closing summary's `train_loss` is then the mean over every
step of the run, as an uninterrupted run's. A checkpoint written before this file existed continues as before
(the window restarts at the checkpoint; the token count from the last logged value).
Installed by `finish.train`; transformers 5.x's attribute names, checked when a run starts (`require`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spo_align.run_folder import write_durably

logger = logging.getLogger(__name__)

WINDOW_FILE = "logging_window_{rank}.json"
TRAINER_ATTRIBUTES = ("_tr_loss", "_globalstep_last_logged", "_total_loss_scalar", "_initial_global_step")


def window_path(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / WINDOW_FILE.format(rank=rank)


def capture(trainer: Any) -> dict[str, Any]:
    """This rank's logging window now (between two optimizer steps)."""
    metrics = getattr(trainer, "_metrics", {}).get("train", {})
    body: dict[str, Any] = {
        "step": trainer.state.global_step,
        "tr_loss": float(trainer._tr_loss.item()),
        "last_logged_step": int(trainer._globalstep_last_logged),
        # Every logged loss since step 0: this session's, plus what earlier sessions carried in.
        "total_loss": float(trainer._total_loss_scalar),
        "metrics": {name: [float(v) for v in values] for name, values in metrics.items()},
    }
    if hasattr(trainer, "_total_train_tokens"):
        body["total_train_tokens"] = int(trainer._total_train_tokens)
    return body


def restore(trainer: Any, body: dict[str, Any]) -> None:
    """Put a captured window back, after the Trainer reset it at the start of `train`."""
    import torch

    trainer._tr_loss += torch.tensor(body["tr_loss"], dtype=trainer._tr_loss.dtype, device=trainer._tr_loss.device)
    trainer._globalstep_last_logged = int(body["last_logged_step"])
    trainer._total_loss_scalar = float(body["total_loss"])
    if hasattr(trainer, "_metrics"):
        train = trainer._metrics["train"]
        train.clear()
        for name, values in body["metrics"].items():
            train[name] = list(values)
    if "total_train_tokens" in body and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = int(body["total_train_tokens"])


def require(trainer: Any) -> None:
    """Fail loudly when transformers renamed what this module reads and writes."""
    missing = [name for name in TRAINER_ATTRIBUTES if not hasattr(trainer, name)]
    if missing:
        raise AttributeError(f"the Trainer no longer keeps {', '.join(missing)}: update train/log_window.py")


class LoggingWindow(TrainerCallback):
    """Saves the logging window into each checkpoint and restores it from `checkpoint` (see the module doc).
    Must come before `CheckpointSealCallback` (its file is sealed with the checkpoint) and before
    `MetricsJsonlCallback` (it corrects the closing `train_loss` that callback writes)."""

    def __init__(self, trainer: Any, checkpoint: str | None) -> None:
        self.trainer = trainer
        self.checkpoint = checkpoint
        self.restored = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        require(self.trainer)
        self.restored = False
        if self.checkpoint is None:
            return
        path = window_path(Path(self.checkpoint), args.process_index)
        if not path.is_file():
            logger.warning("%s has no %s (written by an older spo-align): the next logged record averages only the "
                           "steps after the checkpoint", self.checkpoint, path.name)
            return
        body = json.loads(path.read_text(encoding="utf-8"))
        if int(body.get("step", -1)) != state.global_step:
            logger.warning("%s is of step %s, not %d: not restored", path, body.get("step"), state.global_step)
            return
        restore(self.trainer, body)
        self.restored = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_durably(window_path(folder, args.process_index), json.dumps(capture(self.trainer)) + "\n")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        # The Trainer divides the summed losses by this session's steps; the sum holds every step's since step 0
        # once a window was restored, so the mean is over every step, as in a run never stopped.
        if self.restored and logs is not None and "train_loss" in logs and state.global_step > 0:
            logs["train_loss"] = self.trainer._total_loss_scalar / state.global_step


def install(trainer: Any, checkpoint: str | None) -> LoggingWindow:
    """Add a `LoggingWindow` first in the trainer's callbacks (before the checkpoint seal and metrics.jsonl)."""
    window = LoggingWindow(trainer, checkpoint)
    trainer.callback_handler.callbacks.insert(0, window)
    return window
