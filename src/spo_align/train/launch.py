"""Start a run: in this process, or re-launched under torchrun / accelerate launch / deepspeed.

A plan with one process and no DeepSpeed config runs in-process (`run.run`). Otherwise this process takes
the folder's lock (`run_folder.hold`; held until the launcher returns, never by a rank) and claims the output
folder once (so ranks never race on it), materialises a `tiny:` model once, and then
starts the launcher, which runs `python -m spo_align.train.launch RECIPE --set ... [--resume-from CKPT]`
on every rank; each rank re-reads the same recipe with the same overrides and calls `run.execute`.
Multi-node: see docs/launch.md (torchrun reads SPO_NODE_RANK/MASTER_ADDR/MASTER_PORT; deepspeed a hostfile;
accelerate its own config plus the same variables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from spo_align.recipe.resolve import RunPlan
    from spo_align.train.stopping import LaunchOutcome

logger = logging.getLogger(__name__)

WORKER_MODULE = "spo_align.train.launch"
DEFAULT_MASTER_PORT = "29500"


class LaunchError(RuntimeError):
    """The launcher could not be started or a rank failed (its exit code is kept)."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class LaunchSpec:
    """How a plan is started: `command` is None for an in-process run."""

    launcher: str
    command: list[str] | None

    def describe(self) -> str:
        return "in-process (no re-launch)" if self.command is None else shlex.join(self.command)


def worker_args(recipe_path: Path, overrides: Sequence[str], resume_from: str | None) -> list[str]:
    args = [str(Path(recipe_path).resolve())]
    for override in overrides:
        args += ["--set", override]
    if resume_from is not None:
        args += ["--resume-from", resume_from]
    return args


def _node_env() -> tuple[str, str, str]:
    return (
        os.environ.get("SPO_NODE_RANK", os.environ.get("NODE_RANK", "0")),
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT),
    )


def launch_command(
    plan: RunPlan, recipe_path: Path, overrides: Sequence[str], resume_from: str | None = None
) -> LaunchSpec:
    """The exact command a plan starts with (None for in-process)."""
    dist = plan.recipe.distributed
    if plan.launcher == "inprocess":
        return LaunchSpec("inprocess", None)
    tail = worker_args(recipe_path, overrides, resume_from)
    nproc, nnodes = dist.num_processes, dist.num_nodes
    node_rank, master_addr, master_port = _node_env()
    if plan.launcher == "torchrun":
        cmd = ["torchrun", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
        if nnodes == 1:
            cmd.append("--standalone")  # a free local port, so parallel runs on one machine never collide
        else:
            cmd += [f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
        return LaunchSpec("torchrun", [*cmd, "-m", WORKER_MODULE, *tail])
    if plan.launcher == "accelerate":
        cmd = ["accelerate", "launch", f"--num_processes={nproc * nnodes}", f"--num_machines={nnodes}"]
        if nproc * nnodes > 1:
            # accelerate's torch.distributed launcher; without CUDA its ranks run on CPU over gloo (`--cpu`
            # would select the single-process launcher, or mpirun for several CPU processes)
            cmd.append("--multi_gpu")
        elif plan.device == "cpu":
            cmd.append("--cpu")
        if nnodes > 1:
            cmd += [f"--machine_rank={node_rank}", f"--main_process_ip={master_addr}", f"--main_process_port={master_port}"]
        return LaunchSpec("accelerate", [*cmd, "-m", WORKER_MODULE, *tail])
    if plan.launcher == "deepspeed":
        cmd = ["deepspeed", f"--num_gpus={nproc}"]
        if dist.hostfile is not None:
            hostfile = (plan.base_dir / dist.hostfile).resolve()
            cmd += [f"--hostfile={hostfile}", f"--num_nodes={nnodes}", f"--master_addr={master_addr}"]
        cmd += [f"--master_port={master_port}"]
        return LaunchSpec("deepspeed", [*cmd, "--module", WORKER_MODULE, *tail])
    raise LaunchError(f"unknown launcher {plan.launcher!r}")


def dry_run_report(plan: RunPlan, recipe_path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """What `spo train --dry-run` prints: the launch command and the trainer arguments (no model is loaded)."""
    from spo_align.train.args import training_kwargs
    from spo_align.train.model import resolve_attention, resolve_dtype
    from spo_align.train.run import stage_name

    spec = launch_command(plan, recipe_path, overrides)
    trainer_args = training_kwargs(plan, plan.output_dir)
    stage = stage_name(plan)
    if stage == "sft":
        from spo_align.train.stages import sft_config_kwargs

        trainer_args.update(sft_config_kwargs(plan))
    elif stage == "kto":
        from spo_align.train.stages import kto_config_kwargs

        trainer_args.update(kto_config_kwargs(plan))
    return {
        "stage": stage,
        "launcher": spec.launcher,
        "command": spec.describe(),
        "model": plan.model_path,
        "attention": resolve_attention(plan),
        "dtype": str(resolve_dtype(plan)).removeprefix("torch."),
        "adapter": plan.recipe.adapter.type if plan.recipe.adapter is not None else "full",
        "trainer_args": trainer_args,
    }


def _materialise_models(plan: RunPlan) -> None:
    """Write `tiny:` models once, here, before the ranks start and would race on the cache folder."""
    from spo_align.train.model import TINY_PREFIX, resolve_model_path

    for path in (plan.model_path, plan.reference_model_path, plan.recipe.model.tokenizer):
        if path is not None and path.startswith(TINY_PREFIX):
            resolve_model_path(path)


CONTRADICTORY_FLAGS = (
    "--resume and --overwrite contradict each other: --resume continues the run in output.dir, --overwrite "
    "deletes it; give one of them"
)


def launch(
    plan: RunPlan, recipe_path: Path, overrides: Sequence[str], *, resume: bool, overwrite: bool,
    accept_data_change: bool = False,
) -> Path:
    """Run the plan to completion, in-process or under its launcher; returns the output folder. A continued run
    whose data changed since it started is refused unless `accept_data_change` (`run_folder.data_sources`).

    Raises `OutputFolderError` for `resume` and `overwrite` together (continue the run, and delete it)."""
    from spo_align import run_folder
    from spo_align.run_folder import OutputFolderError
    from spo_align.train.model import check_model_setup
    from spo_align.train.run import claim_output, run, train_command

    if resume and overwrite:
        raise OutputFolderError(CONTRADICTORY_FLAGS)
    command = train_command(recipe_path, overrides)
    if plan.launcher == "inprocess":
        return run(plan, resume=resume, overwrite=overwrite, command=command, accept_data_change=accept_data_change)
    check_model_setup(plan)
    # A second node of a torchrun/accelerate launch runs this same command: it finds the same checkpoint
    # and leaves the folder to the first node.
    primary = plan.launcher == "deepspeed" or _node_env()[0] == "0"
    # The primary launcher holds the folder's lock until its ranks end; the ranks and other nodes never take it.
    held = run_folder.hold(Path(plan.output_dir), command=command) if primary else contextlib.nullcontext()
    with held:
        resume_from = claim_output(
            plan, resume=resume, overwrite=overwrite, command=command, primary=primary,
            accept_data_change=accept_data_change,
        )
        _materialise_models(plan)
        spec = launch_command(plan, recipe_path, overrides, resume_from)
        assert spec.command is not None
        logger.info("launching: %s", spec.describe())
        outcome = _run_launcher(spec.command, plan)
    if outcome.returncode != 0 and not outcome.told_to_stop:
        raise LaunchError(f"{spec.launcher} exited with code {outcome.returncode}", outcome.returncode)
    _check_finished(Path(plan.output_dir), outcome.stopped_at, told_to_stop=outcome.told_to_stop)
    return Path(plan.output_dir)


def _run_launcher(command: list[str], plan: RunPlan) -> LaunchOutcome:
    """Run the launcher; a SIGTERM this process receives reaches every rank (`train/stopping.py`), which then save
    a checkpoint and stop, instead of ending this process alone and, in a container, everything with it."""
    from spo_align.train.stopping import grace_seconds, run_launcher, stop_notice

    estimate = estimated_checkpoint_bytes(plan)
    output_dir = Path(plan.output_dir)
    try:
        return run_launcher(command, lambda saving: stop_notice(output_dir, saving, estimate, grace_seconds()))
    except FileNotFoundError as exc:
        raise LaunchError(f"launcher {command[0]!r} not found on PATH: {exc}") from exc


def estimated_checkpoint_bytes(plan: RunPlan) -> int | None:
    """A full fine-tuning checkpoint's size before one is written: the weights in their files plus Adam's fp32
    state per parameter, read from a local model's safetensors headers (None for an adapter or a hub name)."""
    from spo_align.train.stopping import OPTIMIZER_BYTES_PER_PARAM

    if plan.recipe.adapter is not None or not Path(plan.model_path).is_dir():
        return None
    weights, params = 0, 0
    for path in Path(plan.model_path).glob("*.safetensors"):
        try:
            with path.open("rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    weights += end - begin
                    params += math.prod(entry["shape"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # not a readable safetensors file: no estimate
    return weights + OPTIMIZER_BYTES_PER_PARAM * params if params else None


def _check_finished(output_dir: Path, stopped_at: tuple[int, str] | None, *, told_to_stop: bool = True) -> None:
    """A launch whose ranks all ended well but left the run unfinished was stopped on request (SIGTERM): say which
    checkpoint holds it, the one the ranks recorded on the stop if it is sealed, else the newest sealed one (as
    not saved on this stop when `spo` was told to stop; as found when the ranks were signalled by someone else,
    e.g. on another node)."""
    from spo_align.run_folder import checkpoint_step, finished_at, is_sealed, last_checkpoint
    from spo_align.train.preemption import RunStopped

    if finished_at(output_dir) is not None:
        return
    if stopped_at is not None and is_sealed(Path(stopped_at[1])):
        raise RunStopped(stopped_at[0], stopped_at[1])
    checkpoint = last_checkpoint(output_dir)
    last = None if checkpoint is None else (checkpoint_step(checkpoint)[0], str(checkpoint))
    raise RunStopped.unsaved(last) if told_to_stop else RunStopped.elsewhere(last)


# ---------------------------------------------------------------- worker entry point (one per rank)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One rank: re-read the recipe with the parent's overrides, then run the stage (folder already claimed)."""
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve
    from spo_align.train.run import execute

    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume-from", default=None)
    # The deepspeed launcher passes the rank as an argument too; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    import torch

    plan = resolve(load_recipe(args.recipe, args.overrides), args.recipe, "cuda" if torch.cuda.is_available() else "cpu")
    from spo_align.train.preemption import RunStopped

    try:
        execute(plan, args.resume_from)
    except RunStopped as exc:
        # Not a failure: every rank saved the checkpoint and stops; the parent finds the run unfinished.
        logger.warning("%s", exc)
        if rank == 0 and exc.checkpoint is not None and exc.step is not None:
            from spo_align.train.stopping import record_stop

            record_stop(exc.step, exc.checkpoint)
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank: leave now, without a barrier the others may never reach, and without the
        # interpreter's finalization (see `exit_worker`); `spo` says the run was interrupted.
        logger.warning("interrupted")
        return 130
    except Exception as exc:
        from spo_align.run_folder import write_failure

        message = write_failure(exc, Path(plan.output_dir))
        if message is None:
            raise
        logger.error("%s", message)  # one line, no traceback; the parent reports the exit code
        return 1
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Wait for every rank to finish its run (rank 0 writes the outputs last), then destroy the process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """Exit a rank after flushing its logs, without finalizing the interpreter.

    The process group's worker threads (gloo's ``pt_gloo_runloop``) release the tensors of finished
    collectives on their own, some time after the collective returned; a tensor that still has its Python
    object needs the GIL to let it go. If that happens while the interpreter is finalizing, Python ends the
    thread as it asks for the GIL, the unwinding meets a destructor that may not throw, and the process
    aborts (SIGABRT, "terminate called without an active exception") after a run that finished: the
    launcher then reported the run as failed and stopped the other ranks. A barrier does not close that
    window (the release follows the completion) and the group's C++ object outlives
    ``destroy_process_group`` while DeepSpeed and the model's parameters hold it. So the rank runs what a
    normal exit runs while the interpreter is whole (the atexit handlers: logging's flush, a wandb run's
    finish, ...) and then ends without the finalization.
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_worker(worker_main())
