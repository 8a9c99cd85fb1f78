"""A run told to stop (SIGTERM: a spot instance's notice, `docker stop`, a scheduler) saves a checkpoint first.

The first SIGTERM asks the run to stop at the end of the optimizer step it is in: the Trainer writes a
checkpoint there (sealed like every other one, `train/checkpoints.py`) and training ends without the final
save, so the folder is not marked finished. `spo train` then exits with 143 (128 + SIGTERM) and one line naming
the checkpoint; the same command continues from it. A second SIGTERM ends the process at once (the signal's
default action), so a machine that must go can always go.

Under several processes the ranks agree at every step end (one all-reduce of a flag over the process group),
so that they stop at the same step and save the checkpoint together whichever rank heard the signal first.
`torchrun` passes a SIGTERM on to the ranks and kills them 30 s later; `spo train` passes its own on to the
launcher it started.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM
"""What a process that stopped on SIGTERM exits with, after saving."""


class RunStopped(Exception):
    """Training stopped on request after saving a checkpoint; the run is not finished."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(
            f"stopped on request (SIGTERM) after step {step}: {checkpoint} is saved and the run is not finished; "
            "run the same command to continue"
        )
        self.step = step
        self.checkpoint = checkpoint


class SaveOnSigterm(TrainerCallback):
    """Turns the first SIGTERM into a checkpoint at the current step's end and a stop (see the module doc)."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping (again to stop now)")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._agreed(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
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


def stopped_early(callback: SaveOnSigterm, state: TrainerState) -> bool:
    """True when the callback stopped training before its last step (a stop at the last step just finishes)."""
    return callback.stopped_at is not None and callback.stopped_at < state.max_steps
