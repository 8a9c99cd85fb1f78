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

from spo_align.run_folder import METRICS, flush_own_files, keep_records_up_to, rotate, seal

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
    A checkpoint that carries its logging window (`train/log_window.py`) restores the exact count at its step
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
