"""A run stopped by SIGTERM between two logging steps and continued writes the same metrics.jsonl as a run never
stopped: stopped after step 13 with `logging_steps: 10`, the step-20 record averages steps 11-20 (not 14-20), the
cumulative token count (`num_tokens`) goes on from step 13's (not step 10's), and the closing `train_loss` is the
mean over all 20 steps (not the continued session's 7).

Compared: every key of every record, except the ones that measure wall-clock time and differ between any two runs
(`elapsed_s`, `train_runtime`, `train_samples_per_second`, `train_steps_per_second`). Real processes and a real
signal, as tests/train/test_train_preemption.py."""

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

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "data" / "recipes"
WALL_CLOCK = {"elapsed_s", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _args(recipe: str, model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=20", "--set", "training.logging_steps=10", "--set", "training.save_steps=100",
    ]


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["spo", "sft_packed", "kto"])
def test_a_run_stopped_between_logging_steps_and_continued_logs_what_an_uninterrupted_run_logs(
    small_model: Path, tmp_path: Path, recipe: str
):
    straight = tmp_path / "straight"
    done = CliRunner().invoke(app, _args(recipe, small_model, straight))
    assert done.exit_code == 0, done.output

    out = tmp_path / "out"
    env = {**os.environ, "SIGNAL_AT": "13", "SIGNAL": "TERM", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([sys.executable, str(HERE / "signal_at_step.py"), *_args(recipe, small_model, out)],
                             env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert (out / "checkpoint-13").is_dir()
    assert [r["step"] for r in _records(out) if "loss" in r] == [10]  # the window 11-13 is not logged yet

    again = CliRunner().invoke(app, _args(recipe, small_model, out))  # the same command
    assert again.exit_code == 0, again.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-13")
    expected = _records(straight)
    assert [r["step"] for r in expected] == [10, 20, 20]  # two logging steps, then the closing summary
    got = _records(out)
    for want, have in zip(expected, got, strict=True):
        assert have == want, {k: (want.get(k), have.get(k)) for k in {*want, *have} if want.get(k) != have.get(k)}


@pytest.mark.slow
def test_two_ranks_stopped_between_logging_steps_and_continued_log_what_an_uninterrupted_launch_logs(
    small_model: Path, tmp_path: Path
):
    """Under torchrun (2 CPU ranks over gloo) each rank carries its own share of the summed loss
    (`logging_window_<rank>.json`): the continued launch's records equal the uninterrupted launch's."""
    from spo_align.run_folder.checkpoints import is_sealed

    two = ["--set", "distributed.num_processes=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    done = subprocess.run([sys.executable, "-m", "spo_align.cli", *_args("spo", small_model, straight), *two],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "out"
    signalled = {**env, "RANK_SIGNAL_AT": "13", "PYTHONPATH": f"{HERE / 'rank_signal'}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    stopped = subprocess.run([sys.executable, "-m", "spo_align.cli", *_args("spo", small_model, out), *two],
                             env=signalled, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert is_sealed(out / "checkpoint-13")
    assert {p.name for p in (out / "checkpoint-13").glob("logging_window_*")} == {"logging_window_0.json", "logging_window_1.json"}

    again = subprocess.run([sys.executable, "-m", "spo_align.cli", *_args("spo", small_model, out), *two],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    expected, got = _records(straight), _records(out)
    assert [r["step"] for r in expected] == [10, 20, 20]
    for want, have in zip(expected, got, strict=True):
        assert have == want, {k: (want.get(k), have.get(k)) for k in {*want, *have} if want.get(k) != have.get(k)}
