"""A precompute run (full fine-tuning) stopped after a checkpoint, its `reference_logps/` then deleted: the same
command says the cache is gone, computes it again from the starting weights on disk, and ends with the weights
of a run never stopped (never "the starting weights are gone")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "data" / "recipes"


def _args(model: Path, out: Path) -> list[str]:
    return [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}",
        "--set", "training.max_steps=8", "--set", "training.save_steps=100", "--set", "data.train.0.max_samples=64",
        "--set", "reference.precompute=true",
    ]


@pytest.mark.slow
def test_a_continued_precompute_run_whose_cache_was_deleted_computes_it_again(
    small_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert CliRunner().invoke(app, _args(small_model, straight)).exit_code == 0

    out = tmp_path / "out"
    env = {**os.environ, "SIGNAL_AT": "3", "SIGNAL": "TERM", "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([sys.executable, str(HERE / "signal_at_step.py"), *_args(small_model, out)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert any((out / "reference_logps").glob("*.pt"))
    shutil.rmtree(out / "reference_logps")

    caplog.set_level("WARNING", logger="spo_align.train.preference_trainer")
    again = CliRunner().invoke(app, _args(small_model, out))
    assert again.exit_code == 0, again.output
    said = [r.getMessage() for r in caplog.records]
    assert any("reference log-probs of this continued run (train) are not in" in m and
               f"computing them again from the starting weights {small_model}" in m for m in said), said
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name
