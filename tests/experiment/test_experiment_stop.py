"""SIGTERM to `spo experiment` while a stage trains: the stage saves a checkpoint, then one `stopped:` line (no
traceback) and exit 143, as `spo train` does; the same command then continues the stage from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spo_align.run_folder.checkpoints import is_sealed, last_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny.yaml"
SIGNALLER = ROOT / "tests" / "train" / "signal_at_step.py"


@pytest.mark.slow
def test_a_sigterm_to_spo_experiment_saves_the_stage_and_exits_143_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    args = [
        "experiment", str(TINY), "--set", f"output_dir={out}", "--set", "seeds=[0]", "--set", "jobs=1",
        "--set", "preference=[{name: spo, recipe: ../recipes/tiny/spo.yaml}]",
        "--set", "recipe_set=[training.max_steps=6, training.save_steps=100, data.train.0.max_samples=64]",
    ]
    env = {**os.environ, "SIGNAL_AT": "3", "SIGNAL": "TERM", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([sys.executable, str(SIGNALLER), *args], env=env, capture_output=True, text=True,
                             timeout=600)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped:")]
    sft = out / "seed0" / "sft"
    assert len(lines) == 1 and "seed 0 sft" in lines[0] and str(sft / "checkpoint-3") in lines[0], stopped.stderr[-3000:]
    assert "spo experiment" in lines[0]  # what to run to continue
    assert last_checkpoint(sft) == sft / "checkpoint-3" and is_sealed(sft / "checkpoint-3")
    assert not (sft / "COMPLETE").exists() and not (out / "seed0" / "spo").exists()


@pytest.mark.slow
def test_a_sigterm_to_spo_experiment_with_two_seed_workers_reaches_both_and_each_saves(tmp_path: Path) -> None:
    """`jobs: 2`: the seeds train in worker processes; the SIGTERM to `spo experiment` is passed on to both, each
    stage saves a checkpoint, and the command still ends with one line and 143."""
    import time

    out = tmp_path / "exp"
    args = [
        "experiment", str(TINY), "--set", f"output_dir={out}", "--set", "seeds=[0, 1]", "--set", "jobs=2",
        "--set", "preference=[{name: spo, recipe: ../recipes/tiny/spo.yaml}]",
        "--set", "recipe_set=[training.max_steps=100000, training.logging_steps=1, training.save_steps=100000, "
        "data.train.0.max_samples=64]",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spo_align.cli", *args], env=env, stderr=subprocess.PIPE, text=True)
    metrics = [out / f"seed{s}" / "sft" / "metrics.jsonl" for s in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(m.exists() and m.read_text().count("\n") >= 2 for m in metrics):
        assert proc.poll() is None and time.monotonic() < deadline, "the seeds did not start training"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(lines) == 1 and "seed 0 sft" in lines[0] and "seed 1 sft" in lines[0], stderr[-3000:]
    for seed in (0, 1):
        sft = out / f"seed{seed}" / "sft"
        checkpoint = last_checkpoint(sft)
        assert checkpoint is not None and is_sealed(checkpoint) and checkpoint.name in lines[0]
        assert not (sft / "COMPLETE").exists()
