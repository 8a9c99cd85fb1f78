"""What SIGTERM (a spot notice, `docker stop` through the image's init) and SIGINT (Ctrl-C) do to an in-process
`spo train` in each phase of a run, with real signals (tests/train/signal_at_step.py picks the moment):

| phase                         | SIGTERM                                          | SIGINT                                     |
|-------------------------------|--------------------------------------------------|--------------------------------------------|
| before training (model load)  | ends at once (default action), nothing written   | exit 130, one `interrupted:` line          |
| during a step                 | test_train_preemption.py: checkpoint, exit 143   | test_train_lifecycle.py: exit 130          |
| during a checkpoint's write   | that checkpoint is sealed, then exit 143         | exit 130, the checkpoint left unsealed     |

In every case the same command then ends with the weights of a run never stopped.
"""

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
from spo_align.run_folder import checkpoint_folders, is_sealed, last_checkpoint

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "data" / "recipes"


def _args(model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=6", "--set", "training.save_steps=2", "--set", "training.save_total_limit=5",
        "--set", "data.train.0.max_samples=48",
    ]


def _signalled(args: list[str], at: str, signal_name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SIGNAL_AT": at, "SIGNAL": signal_name, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(HERE / "signal_at_step.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def straight(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    result = CliRunner().invoke(app, _args(small_model, out))
    assert result.exit_code == 0, result.output
    return out


def _finishes_like(straight: Path, model: Path, out: Path, resumed_from: str | None) -> None:
    from safetensors.torch import load_file

    again = CliRunner().invoke(app, _args(model, out))  # the same command
    assert again.exit_code == 0, again.output
    assert json.loads((out / "run.json").read_text())["resumed_from"] == resumed_from
    want, got = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert (want[name] - got[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_a_sigterm_before_training_ends_the_process_at_once_and_the_run_starts_over(
    small_model: Path, tmp_path: Path, straight: Path
):
    out = tmp_path / "out"
    stopped = _signalled(_args(small_model, out), "load", "TERM")
    assert stopped.returncode == -signal.SIGTERM, stopped.stderr[-3000:]
    assert checkpoint_folders(out) == [] and not (out / "COMPLETE").exists()
    _finishes_like(straight, small_model, out, None)


@pytest.mark.slow
def test_a_sigint_before_training_says_interrupted_and_the_run_starts_over(
    small_model: Path, tmp_path: Path, straight: Path
):
    out = tmp_path / "out"
    stopped = _signalled(_args(small_model, out), "load", "INT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert sum(line.startswith("interrupted:") for line in stopped.stderr.splitlines()) == 1, stopped.stderr[-3000:]
    assert checkpoint_folders(out) == [] and not (out / "COMPLETE").exists()
    _finishes_like(straight, small_model, out, None)


@pytest.mark.slow
def test_a_sigterm_during_a_checkpoint_stops_on_that_checkpoint_once_sealed(
    small_model: Path, tmp_path: Path, straight: Path
):
    out = tmp_path / "out"
    stopped = _signalled(_args(small_model, out), "save:4", "TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and f"after step 4: {out / 'checkpoint-4'} is saved" in lines[0], stopped.stderr[-3000:]
    assert [step for step, _ in checkpoint_folders(out)] == [2, 4] and is_sealed(out / "checkpoint-4")
    _finishes_like(straight, small_model, out, str(out / "checkpoint-4"))


@pytest.mark.slow
def test_a_sigint_during_a_checkpoint_leaves_it_unsealed_and_the_run_continues_from_the_one_before(
    small_model: Path, tmp_path: Path, straight: Path
):
    out = tmp_path / "out"
    stopped = _signalled(_args(small_model, out), "save:4", "INT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert not is_sealed(out / "checkpoint-4") and last_checkpoint(out) == out / "checkpoint-2"
    _finishes_like(straight, small_model, out, str(out / "checkpoint-2"))
