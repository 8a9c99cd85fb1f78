"""End to end through `spo train`: every stage, LoRA and full fine-tuning, on the hidden-32 tiny model.

Each run checks what holds by construction, on any CPU: every logged loss is finite; a preference stage's first
loss is its loss at zero log-ratios (the policy starts as the reference); the optimiser changed the trained
weights; the output folder is marked complete and holds run.json, the resolved recipe and metrics.jsonl; the
saved model (or adapter) and tokenizer load with from_pretrained.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
LORA = ("--set", "adapter.r=8", "--set", "adapter.alpha=16", "--set", "adapter.dropout=0.0")
LORA_LR = ("--set", "training.learning_rate=2.0e-2")
STEPS = 6
FEW_ROWS = ("--set", "data.train.0.max_samples=8")


def _train(recipe: str, out: Path, model: Path, *extra: str):
    return CliRunner().invoke(
        app,
        ["train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={model}", "--set", f"output.dir={out}", *extra],
    )


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def loss_at_zero_log_ratios(loss: dict) -> float | None:
    """A preference loss where policy == reference (every log-ratio, margin and KL estimate is 0), from the
    closed forms in docs/losses.md; None for SFT."""
    kind = loss.get("type") if loss else None
    if kind == "spo":
        return 0.0  # f(0) + f(0), f(z) = -z exp(-z)
    if kind == "dpo":
        return math.log(2.0)  # -(1 - e) log s(0) - e log s(0)
    if kind == "ipo":
        tau = loss["tau"] if loss.get("tau") is not None else loss["match_spo_beta"] / 2
        return (1.0 / (2.0 * tau)) ** 2
    if kind == "kto":
        assert loss["desirable_weight"] == loss["undesirable_weight"]
        return loss["desirable_weight"] * 0.5  # w * s(0) for both classes
    return None


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    assert files, f"no weights in {path}"
    return {k: v for f in files for k, v in load_file(f).items()}


def _trained(out: Path, start: Path, lora: bool) -> None:
    """The optimiser moved what it trains: LoRA's B matrices start at zero; full weights start as `start`'s."""
    if lora:
        b = [v for k, v in _weights(out).items() if "lora_B" in k]
        assert b and any(bool(v.abs().max() > 0) for v in b)
    else:
        before, after = _weights(start), _weights(out)
        assert any(not bool((after[k] == before[k]).all()) for k in before if k in after)


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
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    import yaml

    resolved = yaml.safe_load((out / "resolved_recipe.yaml").read_text())
    expected = loss_at_zero_log_ratios(resolved.get("loss"))
    if expected is not None:
        assert losses[0] == pytest.approx(expected, abs=1e-5), losses
    _trained(out, small_model, adapter == "lora")
    assert (out / "COMPLETE").exists()
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
