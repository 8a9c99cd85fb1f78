"""Kill-and-resume: SIGKILL a run after a checkpoint, `spo train --resume`, and it ends exactly where an
uninterrupted run ends (CPU, one thread, deterministic): same per-step metrics, same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.run_folder.checkpoints import last_checkpoint

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
STEPS = 80
# Wall time differs; the Trainer's closing `train_loss` is by design the mean over the steps of the session
# that ran last (transformers Trainer._finalize_training), so it is not a metric of the run as a whole.
NOT_COMPARED = {
    "elapsed_s", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
}


def _args(recipe: str, model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=10", "--set", "training.save_total_limit=2",
        "--set", "training.lr_scheduler=cosine", "--set", "training.learning_rate=1.0e-3",
    ]


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in rows]


def _kill_after_first_checkpoint(args: list[str], out: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spo_align.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        checkpoint = last_checkpoint(out)
        if checkpoint is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return int(checkpoint.name.split("-")[1])
        time.sleep(0.02)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.kill()
    pytest.fail(f"the run ended (code {proc.returncode}) before a checkpoint could be killed after: {stderr[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["spo", "sft_packed"])
def test_a_killed_run_resumes_to_the_same_metrics_and_weights(recipe: str, tmp_path: Path, small_model: Path):
    from safetensors.torch import load_file

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ["--set", "data.train.0.max_samples=64"]
    result = CliRunner().invoke(app, [*_args(recipe, small_model, straight), *extra])
    assert result.exit_code == 0, result.output

    step = _kill_after_first_checkpoint([*_args(recipe, small_model, killed), *extra], killed)
    assert 0 < step < STEPS
    assert not (killed / "COMPLETE").exists()
    resumed = CliRunner().invoke(app, [*_args(recipe, small_model, killed), *extra, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((killed / "run.json").read_text())["resumed_from"].endswith(f"checkpoint-{step}")

    expected, got = _records(straight), _records(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, have in zip(expected, got):
        assert have.keys() == want.keys()
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (want["step"], key)
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name
