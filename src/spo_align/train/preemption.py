"""A run told to stop (SIGTERM: a spot instance's notice, `docker stop`, a scheduler) saves a checkpoint first.

The first SIGTERM asks the run to stop at the end of the optimizer step it is in: the Trainer writes a
checkpoint there (sealed like every other one, `run_folder/checkpoints.py`) and training ends without the final
save, so the folder is not marked finished. A SIGTERM that arrives while a checkpoint is being written stops
the run as soon as that checkpoint is sealed. `spo train` then exits with 143 (128 + SIGTERM) and one line
naming the checkpoint; the same command continues from it. A second SIGTERM ends the process at once (the
signal's default action), so a machine that must go can always go. Before training begins the signal keeps its
default action (nothing is trained yet, so nothing is lost).

Under several processes the ranks agree at every step end and after every save (one all-reduce of a flag over
the process group), so that they stop at the same step and save the checkpoint together whichever rank heard
the signal first. How the signal reaches the ranks of a launched run is `train/stopping.py`'s: each rank
announces itself there once training has begun.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM
"""What a process that stopped on SIGTERM exits with, after saving."""


class RunStopped(Exception):
    """Training stopped on request; the run is not finished. `checkpoint` is the one saved on this stop (None when
    the run stopped before it could save one: see `unsaved`)."""

    def __init__(self, step: int | None, checkpoint: str | None, message: str | None = None):
        super().__init__(
            message
            or f"stopped on request (SIGTERM) after step {step}: {checkpoint} is saved and the run is not finished; "
            "run the same command to continue"
        )
        self.step = step
        self.checkpoint = checkpoint

    @classmethod
    def unsaved(cls, last: tuple[int, str] | None) -> RunStopped:
        """Stopped before a checkpoint of this stop was sealed; `last` is the newest sealed one (step, path)."""
        if last is None:
            return cls(None, None, "stopped on request (SIGTERM) before a checkpoint was saved, and the run has "
                       "none sealed: run the same command to start it over")
        return cls(None, None, f"stopped on request (SIGTERM) without saving a checkpoint on this stop: the newest "
                   f"sealed one is {last[1]} (step {last[0]}); run the same command to continue from it")

    @classmethod
    def elsewhere(cls, last: tuple[int, str] | None) -> RunStopped:
        """The ranks stopped without finishing, told by someone else than this `spo` (another node's, a SIGTERM
        sent to them); `last` is the newest sealed checkpoint (step, path)."""
        where = "it has no sealed checkpoint" if last is None else f"the newest sealed checkpoint is {last[1]} (step {last[0]})"
        return cls(None, None, f"the ranks stopped on request without finishing the run: {where}; run the same "
                   "command to continue")


class SaveOnSigterm(TrainerCallback):
    """Turns the first SIGTERM into a checkpoint at the current step's end and a stop (see the module doc)."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None
        self._installed = False
        self._announced: Path | None = None
        self._output_dir: Path | None = None
        self._estimate: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        from spo_align.train.stopping import STOP_DIR_ENV, grace_seconds, stop_notice

        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        short = "SIGTERM: saving a checkpoint at the end of this step, then stopping (again to stop now)"
        if os.environ.get(STOP_DIR_ENV) or self._output_dir is None:  # a launched rank: `spo` says the rest
            logger.warning("%s", short)
            return
        try:
            logger.warning("%s", stop_notice(self._output_dir, True, self._estimate, grace_seconds()))
        except Exception as exc:  # the notice only informs: it must never cost the stop itself
            logger.warning("%s (no estimate: %s)", short, exc)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        from spo_align.train.stopping import announce_rank

        self._output_dir = Path(args.output_dir)
        self._estimate = _estimated_checkpoint_bytes(kwargs.get("model"))
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
            self._announced = announce_rank()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._agreed(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # After the checkpoint callbacks (this one is added last): a SIGTERM that came during a regular save stops
        # the run now, on the checkpoint just sealed, instead of one step and one more checkpoint later.
        if self.stopped_at is None and self._agreed(args):
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        from spo_align.train.stopping import withdraw_rank

        withdraw_rank(self._announced)
        self._announced = None
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def _agreed(self, args: TrainingArguments) -> bool:
        """True on every rank when any rank was asked to stop."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _estimated_checkpoint_bytes(model: Any) -> int | None:
    """The saved weights (all of them, or an adapter's) plus Adam's fp32 state per trained parameter."""
    from spo_align.train.stopping import OPTIMIZER_BYTES_PER_PARAM

    if model is None:
        return None
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    saved = trained if hasattr(model, "peft_config") else params
    weights = sum(p.numel() * p.element_size() for p in saved)
    return weights + OPTIMIZER_BYTES_PER_PARAM * sum(p.numel() for p in trained)


def stopped_early(callback: SaveOnSigterm, state: TrainerState) -> bool:
    """True when the callback stopped training before its last step (a stop at the last step just finishes)."""
    return callback.stopped_at is not None and callback.stopped_at < state.max_steps
