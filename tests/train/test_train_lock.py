"""Two `spo train` of the same recipe started together (a double start, a scheduler's retry): exactly one trains,
the other exits 1 with one line naming the live run, and nothing of the first run is deleted or interleaved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

LOCK = ".spo-lock"  # run_folder.layout.LOCK, spelled out so that this test runs on code without it

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
STEPS = 40


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["in-process", "torchrun"])
def test_two_launches_of_the_same_recipe_one_trains_the_other_says_why(
    processes: int, small_model: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "spo_align.cli", "train", str(RECIPES / "spo.yaml"),
        "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
        "--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=10", "--set", "training.save_total_limit=1",
        "--set", "data.train.0.max_samples=64", "--set", f"distributed.num_processes={processes}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=600) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 1], [r[1][-3000:] for r in results]
    refused = results[[proc.returncode for proc in procs].index(1)][1]
    assert "Traceback" not in refused
    errors = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"output.dir {out} is in use by another spo-align run (host " in errors[0], refused

    # the run that trained is whole: finished once, every step logged once and in order, one session
    assert (out / "COMPLETE").exists() and (out / "model.safetensors").exists() and not (out / LOCK).exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:-1] == list(range(1, STEPS + 1)) and steps[-1] == STEPS  # the closing summary last
    info = json.loads((out / "run.json").read_text())
    assert len(info["sessions"]) == 1 and info["resumed_from"] is None
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{STEPS}"]


@pytest.mark.slow
def test_a_launch_beside_a_live_run_deletes_nothing(small_model: Path, tmp_path: Path):
    """Deterministic form: the second launch starts once the first holds the folder and has written into it."""
    out = tmp_path / "out"
    base = [
        sys.executable, "-m", "spo_align.cli", "train", str(RECIPES / "spo.yaml"),
        "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
        "--set", "training.save_steps=5", "--set", "data.train.0.max_samples=64",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*base, "--set", "training.max_steps=100000"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-5").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach a checkpoint"
            time.sleep(0.1)
        for extra in ([], ["--overwrite"], ["--resume"]):
            second = subprocess.run([*base, "--set", "training.max_steps=100000", *extra], env=env,
                                    capture_output=True, text=True, timeout=300)
            assert second.returncode == 1, second.stderr[-3000:]
            assert second.stderr.strip().splitlines()[-1].startswith(f"error: output.dir {out} is in use"), second.stderr
            assert first.poll() is None  # the first run trains on
            assert (out / "resolved_recipe.yaml").exists() and (out / "metrics.jsonl").exists()
    finally:
        first.kill()
        first.wait()
