"""CUDA-only paths (skipped without a GPU): bf16 by default, attention auto, a LoRA SPO run in bf16."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"


@pytest.mark.gpu
def test_cuda_defaults_are_bf16_and_the_best_available_attention(plan_for, tmp_path: Path):
    from spo_align.train.args import build_training_args
    from spo_align.train.model import resolve_attention, resolve_dtype

    plan = plan_for("spo", "model.dtype=auto", "model.attention=auto")
    assert resolve_dtype(plan) == torch.bfloat16
    flash = importlib.util.find_spec("flash_attn") is not None
    assert resolve_attention(plan) == ("flash_attention_2" if flash else "sdpa")
    args = build_training_args(plan, tmp_path)
    assert args.bf16 and not args.use_cpu


@pytest.mark.gpu
@pytest.mark.slow
def test_lora_spo_runs_in_bf16_on_cuda(tmp_path: Path, small_model: Path):
    from spo_align.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={small_model}", "--set", f"output.dir={out}",
            "--set", "model.dtype=auto", "--set", "adapter.r=8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "COMPLETE").exists() and (out / "adapter_config.json").exists()
