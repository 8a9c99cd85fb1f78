"""One rank of a real 2-process gloo group that writes its part of a checkpoint the way the Trainer and DeepSpeed
name them, then runs the sealing callback (a test helper, run as a script by test_checkpoint_sealing.py).

    seal_two_ranks.py OUT    with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set

Every os.fsync this process makes is recorded (the path behind the descriptor) into OUT/fsynced-<RANK>.json;
the fsync itself is the real one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    synced: list[str] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    os.fsync = recording_fsync  # type: ignore[assignment]
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from spo_align.train.callbacks import CheckpointSealCallback

    args = TrainingArguments(output_dir=str(out), use_cpu=True, save_total_limit=2, report_to=[])
    assert args.world_size == 2 and args.process_index == rank
    folder = out / "checkpoint-4"
    (folder / "global_step4").mkdir(parents=True, exist_ok=True)
    mine = [f"rng_state_{rank}.pth", f"global_step4/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            f"global_step4/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"]
    if rank == 0:
        mine += ["model.safetensors", "trainer_state.json", "scheduler.pt", "latest", "global_step4/mp_rank_00_model_states.pt"]
    for name in mine:
        (folder / name).write_bytes(os.urandom(4096))
    callback = CheckpointSealCallback()
    control = TrainerControl()
    callback.on_init_end(args, TrainerState(), control)
    state = TrainerState(is_world_process_zero=rank == 0)
    state.global_step = 4
    callback.on_step_end(args, state, control)
    callback.on_save(args, state, control)
    (out / f"fsynced-{rank}.json").write_text(json.dumps({"wrote": mine, "fsynced": synced}))


if __name__ == "__main__":
    main()
