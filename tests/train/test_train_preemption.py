"""A SIGTERM (a spot instance's notice, `docker stop`) saves a checkpoint at the end of the step it arrives in
and stops, exit 143, the run not finished; the same command then continues and ends exactly like a run that was
never stopped. A second SIGTERM ends the process at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.run_folder.checkpoints import is_sealed, last_checkpoint

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "data" / "recipes"
NOT_COMPARED = {
    "elapsed_s", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
}


def _args(model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=8", "--set", "training.save_steps=100", "--set", "data.train.0.max_samples=64",
    ]


def _signalled(args: list[str], at: str, signal_name: str = "TERM") -> subprocess.CompletedProcess:
    env = {**os.environ, "SIGNAL_AT": at, "SIGNAL": signal_name, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(HERE / "signal_at_step.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in rows]


@pytest.mark.slow
def test_a_sigterm_saves_a_checkpoint_and_the_same_command_ends_like_an_uninterrupted_run(
    small_model: Path, tmp_path: Path
):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert CliRunner().invoke(app, _args(small_model, straight)).exit_code == 0

    out = tmp_path / "out"
    stopped = _signalled(_args(small_model, out), "3")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and f"after step 3: {out / 'checkpoint-3'} is saved" in lines[0], stopped.stderr[-3000:]
    assert last_checkpoint(out) == out / "checkpoint-3" and is_sealed(out / "checkpoint-3")
    assert not (out / "COMPLETE").exists() and not (out / "model.safetensors").exists()

    again = CliRunner().invoke(app, _args(small_model, out))  # the same command
    assert again.exit_code == 0, again.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-3")
    assert _records(out) == _records(straight)
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_a_second_sigterm_ends_the_process_at_once(small_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    stopped = _signalled(_args(small_model, out), "2,2")
    assert stopped.returncode == -signal.SIGTERM, stopped.stderr[-3000:]  # the default action: no save, no line
    assert not (out / "checkpoint-2").exists() and not (out / "COMPLETE").exists()


@pytest.mark.slow
def test_a_torchrun_launch_passes_the_sigterm_on_and_its_ranks_stop_at_the_same_step(
    small_model: Path, tmp_path: Path
):
    """`spo train` re-launched under torchrun (2 CPU ranks over gloo): SIGTERM to the parent reaches both ranks
    through torchrun; they agree on the step, save one checkpoint and stop; the parent exits 143."""
    import time

    out = tmp_path / "out"
    args = [*_args(small_model, out), "--set", "training.max_steps=100000", "--set", "distributed.num_processes=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spo_align.cli", *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoint = last_checkpoint(out)
    assert checkpoint is not None and is_sealed(checkpoint) and not (out / "COMPLETE").exists()
    assert any(line.startswith("stopped:") and checkpoint.name in line for line in stderr.splitlines()), stderr[-3000:]
