"""Run `spo train ARGS...` and SIGKILL it halfway through a save (a test helper, run as a script).

    KILL_AT=checkpoint:N  killed with half of checkpoint-N's trainer_state.json written (the Trainer's
                          last file of a checkpoint, so everything else of it is there)
    KILL_AT=final         killed with half of the final model written into the output folder, after the
                          last checkpoint

The kill is real (SIGKILL, no cleanup runs); only its moment is chosen, by wrapping the two writes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    from transformers import Trainer, TrainerState

    where = os.environ["KILL_AT"]
    if where.startswith("checkpoint:"):
        step = int(where.split(":", 1)[1])
        save_to_json = TrainerState.save_to_json

        def save_state(self: TrainerState, json_path: str) -> None:
            save_to_json(self, json_path)
            if self.global_step == step and Path(json_path).parent.name == f"checkpoint-{step}":
                _cut_in_half(Path(json_path))

        TrainerState.save_to_json = save_state  # type: ignore[method-assign]
    elif where == "final":
        save_model = Trainer.save_model

        def save_final_model(self: Trainer, output_dir: str | None = None, _internal_call: bool = False) -> None:
            save_model(self, output_dir, _internal_call)
            if not _internal_call:  # the final save (a checkpoint's is internal)
                _cut_in_half(next(Path(output_dir or self.args.output_dir).glob("*.safetensors")))

        Trainer.save_model = save_final_model  # type: ignore[method-assign]
    else:
        raise SystemExit(f"KILL_AT={where!r}: expected checkpoint:N or final")
    from spo_align.cli import main as spo

    sys.argv = ["spo", *sys.argv[1:]]
    spo()


if __name__ == "__main__":
    main()
