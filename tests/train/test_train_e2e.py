"""End to end through `spo train`: every stage, LoRA and full fine-tuning, on the hidden-32 tiny model.

Each run: loss falls, the output folder is marked complete and holds run.json, the resolved recipe and
metrics.jsonl, and the saved model (or adapter) and tokenizer load with from_pretrained.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
LORA = ("--set", "adapter.r=8", "--set", "adapter.alpha=16", "--set", "adapter.dropout=0.0")
# Preference losses need a larger step on LoRA's few parameters to move in 12 steps.
LORA_LR = ("--set", "training.learning_rate=2.0e-2")
STEPS = 30
# One batch of pairs (two of KTO's single examples, one packed SFT batch), seen again every step, so that a
# falling loss is the optimiser working and not batch-to-batch noise.
FEW_ROWS = ("--set", "data.train.0.max_samples=8")


def _train(recipe: str, out: Path, model: Path, *extra: str):
    return CliRunner().invoke(
        app,
        ["train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}", *extra],
    )


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _loads(out: Path, lora: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(out)
    if lora:
        from peft import AutoPeftModelForCausalLM

        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        model = AutoPeftModelForCausalLM.from_pretrained(out)
        assert any("lora_" in name for name, _ in model.named_parameters())
    else:
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("recipe", ["sft_packed", "spo", "dpo", "ipo", "kto"])
def test_stage_runs_end_to_end_and_its_output_loads(recipe: str, adapter: str, tmp_path: Path, small_model: Path):
    out = tmp_path / "out"
    extra = (*LORA, *(LORA_LR if recipe != "sft_packed" else ())) if adapter == "lora" else ()
    if adapter == "lora" and recipe == "sft_packed":
        extra = (*extra, "--set", "output.save_merged=true")
    result = _train(recipe, out, small_model, *extra, *FEW_ROWS, "--set", f"training.max_steps={STEPS}")
    assert result.exit_code == 0, result.output
    losses = _losses(out)
    assert len(losses) == STEPS
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert tail < head, losses
    assert (out / "COMPLETE").exists() and (out / "resolved_recipe.yaml").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["packages"]["trl"] and info["hardware"]["cuda"] is False and info["finished"]
    assert info["stage"] == ("sft" if recipe == "sft_packed" else "preference")
    _loads(out, adapter == "lora")
    if adapter == "lora" and recipe == "sft_packed":
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        assert not any("lora_" in name for name, _ in merged.named_parameters())


@pytest.mark.slow
def test_a_finished_run_is_kept_unless_overwrite_is_given(tmp_path: Path, small_model: Path):
    out = tmp_path / "out"
    fast = ("--set", "training.max_steps=2", "--set", "training.save_steps=100")
    assert _train("spo", out, small_model, *fast).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    again = _train("spo", out, small_model, *fast, "--set", "training.learning_rate=0.5")
    assert again.exit_code == 1 and "holds a finished run; pass --overwrite" in again.stderr
    assert (out / "model.safetensors").read_bytes() == before
    resumed = _train("spo", out, small_model, *fast, "--resume")
    assert resumed.exit_code == 1 and (out / "COMPLETE").exists()
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    replaced = _train(
        "spo", out, small_model, *fast, "--set", "training.learning_rate=0.5", "--set", "output.report_to=[tensorboard]",
        "--overwrite",
    )
    assert replaced.exit_code == 0, replaced.output
    assert any((out / "runs").rglob("events.out.tfevents.*")) == tensorboard
    assert (out / "model.safetensors").read_bytes() != before and (out / "COMPLETE").exists()
    plotted = CliRunner().invoke(app, ["plot", str(out)])
    assert plotted.exit_code == 0 and (out / "metrics.png").exists()
