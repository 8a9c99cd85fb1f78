"""Trainer callbacks every stage attaches: metrics.jsonl, checkpoint sealing (the progress display is `progress`).

The metrics file is the main process's; each rank flushes the checkpoint files it wrote,
then the main process seals (see `run_folder.checkpoints`). `metrics.jsonl` gets one JSON object per `Trainer.log`
call
(every logging step, plus the final summary), with `step`, `epoch` and wall time added. On resume, records
past the checkpoint's step (logged by the killed run after its last checkpoint) are dropped, so the file of a
resumed run reads like the file of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spo_align.run_folder import METRICS, flush_own_files, keep_records_up_to, rotate, seal, write_durably

logger = logging.getLogger(__name__)

def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsJsonlCallback(TrainerCallback):
    """Append every logged record to `path` as one JSON line (main process only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._started = time.monotonic()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not state.is_world_process_zero:
            return
        self._started = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_records_up_to(self.path, state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: _jsonable(v) for k, v in logs.items()})
        record["elapsed_s"] = round(time.monotonic() - self._started, 3)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def keep_metrics_up_to(output_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records past `step` (and a torn last line): a run continued from checkpoint `step` at
    its last step, which trains no more (its closing summary, if written, stays)."""
    keep_records_up_to(Path(output_dir) / METRICS, step, keep_summary=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointSealCallback(TrainerCallback):
    """Seal each checkpoint once every rank has written its part, then delete old ones (main process).

    See `run_folder.checkpoints`: the Trainer's own rotation (which deletes before the new checkpoint is whole) is
    switched off here, and `training.save_total_limit` is applied after sealing instead."""

    def __init__(self) -> None:
        self.keep: int | None = None
        self._step_ended: float | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.keep = args.save_total_limit
        args.save_total_limit = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._step_ended = time.monotonic()  # a checkpoint of this step is written after the step's callbacks

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # The seal records how long this process took to write the checkpoint and how long sealing took after
        # that (waiting for the other ranks included), which `spo` reads to say whether a stop's save fits in time.
        written = time.monotonic()
        write_s = None if self._step_ended is None else written - self._step_ended
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            flush_own_files(folder, args.process_index, args.world_size)  # every rank its own, in parallel
        _barrier()  # every rank's optimizer shards and RNG state are written and on disk
        if state.is_world_process_zero and folder.is_dir():
            seal(folder, files_flushed=True, write_s=write_s, started=written)
            rotate(Path(args.output_dir), self.keep)
        _barrier()


def default_callbacks(output_dir: Path, description: str, reward_scale: float | None = None) -> list[TrainerCallback]:
    """metrics.jsonl, checkpoint sealing and the progress display (`train.progress`); `reward_scale` turns the
    logged rewards back into log-ratios on the plain progress lines."""
    from spo_align.train.progress import ProgressCallback

    return [
        MetricsJsonlCallback(Path(output_dir) / METRICS),
        CheckpointSealCallback(),
        ProgressCallback(description, reward_scale=reward_scale),
    ]


def quiet_trainer(trainer: Any) -> Any:
    """Drop the Trainer's own `PrinterCallback` (it prints every log dict); our callbacks report instead."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def restore_token_count(trainer: Any, checkpoint: str | None) -> None:
    """Continue TRL's cumulative `num_tokens` metric from the checkpoint instead of restarting it at 0.

    TRL 1.16's SFT and KTO trainers (and `PreferenceTrainer`, alike) keep the count in `_total_train_tokens` and
    do not save it; the last logged value in the checkpoint's trainer state is the count at that step when
    logging_steps divides save_steps (the resume test logs every step and fails if TRL renames the attribute).
    A checkpoint that carries its logging window (`LoggingWindow` below) restores the exact count at its step
    over this one, when training begins; this is the fallback for a checkpoint written before it did.
    """
    if checkpoint is None:
        return
    if not hasattr(trainer, "_total_train_tokens"):
        raise AttributeError("TRL no longer keeps _total_train_tokens: update restore_token_count")
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    counts = [entry["num_tokens"] for entry in state.get("log_history", []) if "num_tokens" in entry]
    if counts:
        trainer._total_train_tokens = int(counts[-1])


# ---------------------------------------------------------------- the logging window a checkpoint carries
# The logging window a checkpoint carries, so that a continued run logs what an uninterrupted one logs.
#
# Between two logging steps the Trainer and the stage trainers accumulate what the next record averages: the
# Trainer's summed loss (`_tr_loss`, per rank) since `_globalstep_last_logged`, and the stage trainer's per-step
# metric lists (`_metrics["train"]`: rewards, log-probs, entropy, ... ; ours and TRL's alike, gathered over the
# ranks when appended). TRL's SFT and KTO trainers also count the tokens trained on (`_total_train_tokens`, logged
# as `num_tokens`), and the Trainer sums every logged loss (`_total_loss_scalar`) for the closing `train_loss`. None
# of this is in a Trainer checkpoint, so a run stopped at step 13 with `logging_steps: 10` and continued logged the
# mean of steps 14-20 at step 20, a token count that restarted from step 10's, and a `train_loss` over the continued
# session only.
#
# `LoggingWindow` writes that state into every checkpoint (`logging_window_<rank>.json`, each rank its own, before
# the checkpoint is sealed: `run_folder/checkpoints.py` counts it as that rank's file) and puts it back when training
# continues from one, after the Trainer has reset it. The closing summary's `train_loss` is then the mean over every
# step of the run, as an uninterrupted run's. A checkpoint written before this file existed continues as before
# (the window restarts at the checkpoint; the token count from the last logged value).
# Installed by `finish.train`; transformers 5.x's attribute names, checked when a run starts (`require`).
#
logger = logging.getLogger(__name__)

WINDOW_FILE = "logging_window_{rank}.json"
TRAINER_ATTRIBUTES = ("_tr_loss", "_globalstep_last_logged", "_total_loss_scalar", "_initial_global_step")


def window_path(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / WINDOW_FILE.format(rank=rank)


def capture_window(trainer: Any) -> dict[str, Any]:
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


def restore_window(trainer: Any, body: dict[str, Any]) -> None:
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


def require_window_attributes(trainer: Any) -> None:
    """Fail loudly when transformers renamed what this module reads and writes."""
    missing = [name for name in TRAINER_ATTRIBUTES if not hasattr(trainer, name)]
    if missing:
        raise AttributeError(f"the Trainer no longer keeps {', '.join(missing)}: update train/callbacks.py")


class LoggingWindow(TrainerCallback):
    """Saves the logging window into each checkpoint and restores it from `checkpoint` (see the module doc).
    Must come before `CheckpointSealCallback` (its file is sealed with the checkpoint) and before
    `MetricsJsonlCallback` (it corrects the closing `train_loss` that callback writes)."""

    def __init__(self, trainer: Any, checkpoint: str | None) -> None:
        self.trainer = trainer
        self.checkpoint = checkpoint
        self.restored = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        require_window_attributes(self.trainer)
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
        restore_window(self.trainer, body)
        self.restored = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_durably(window_path(folder, args.process_index), json.dumps(capture_window(self.trainer)) + "\n")

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


def install_logging_window(trainer: Any, checkpoint: str | None) -> LoggingWindow:
    """Add a `LoggingWindow` first in the trainer's callbacks (before the checkpoint seal and metrics.jsonl)."""
    window = LoggingWindow(trainer, checkpoint)
    trainer.callback_handler.callbacks.insert(0, window)
    return window
