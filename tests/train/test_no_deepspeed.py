"""A run without a DeepSpeed config never imports DeepSpeed (accelerate would, on every unwrap_model, and
DeepSpeed then prints "Setting accelerator to CPU" to stdout), and a preference run never imports TRL (it trains
with spo-align's own trainer; importing TRL cost seconds at every start): a real `spo train` in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
PROBE = """
import sys
from typer.testing import CliRunner
from spo_align.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(result.output)
print("DEEPSPEED_IMPORTED", "deepspeed" in sys.modules)
print("TRL_IMPORTED", "trl" in sys.modules)
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("recipe,uses_trl", [("spo", False), ("sft_packed", True)])
def test_a_run_without_deepspeed_config_never_imports_deepspeed_nor_a_preference_run_trl(
    small_model: Path, tmp_path: Path, recipe: str, uses_trl: bool
):
    args = [
        "train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={tmp_path / 'out'}", "--set", "training.max_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEEPSPEED_IMPORTED False" in proc.stdout
    assert "Setting accelerator" not in proc.stdout + proc.stderr
    assert f"TRL_IMPORTED {uses_trl}" in proc.stdout  # SFT trains through TRL's SFTTrainer
