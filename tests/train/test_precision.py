"""Full fine-tuning in bfloat16 without DeepSpeed trains float32 master weights under bfloat16 autocast
(an optimizer step on bfloat16 weights rounds small updates away); LoRA keeps a bfloat16 base and DeepSpeed
its own masters. The reference is loaded and run like the policy, so the first step's log-ratios are 0.

On CPU, bfloat16 autocast is CPU autocast; what a CUDA run adds is checked by the `gpu` test."""

from __future__ import annotations

import json
from pathlib import Path

import preference_helpers as h
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"


def _trained_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def test_bf16_full_fine_tuning_loads_fp32_weights_and_autocasts(plan_for, tmp_path: Path):
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model

    plan = plan_for("spo", "model.dtype=bfloat16", "output.report_to=[none]")
    assert _trained_dtypes(load_model(plan)) == {torch.float32}
    assert {p.dtype for p in load_model(plan, plan.model_path, for_training=False).parameters()} == {torch.float32}
    assert build_training_args(plan, tmp_path).bf16 is True

    lora = plan_for("spo", "model.dtype=bfloat16", "adapter.r=4", "output.report_to=[none]")
    assert {p.dtype for p in load_model(lora).parameters()} == {torch.bfloat16}  # the frozen base stays bf16
    assert build_training_args(lora, tmp_path).bf16 is False  # on CPU, as before: no autocast over a bf16 base

    zero2 = plan_for("spo_zero2", "model.dtype=bfloat16", "output.report_to=[none]")
    assert {p.dtype for p in load_model(zero2).parameters()} == {torch.bfloat16}  # DeepSpeed keeps the masters


@pytest.mark.parametrize(
    "recipe,extra",
    [("spo", []), ("kto", []), ("spo", ["reference.precompute=true", "data.packing=true", "data.train.0.max_samples=16",
                                         "training.per_device_batch_size=4", "training.gradient_accumulation_steps=4"])],
    ids=["spo", "kto", "spo-precomputed-packed"],
)
def test_bf16_full_fine_tuning_starts_at_log_ratio_zero_and_records_its_precision(
    recipe: str, extra: list[str], small_model: Path, tmp_path: Path
):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={out}", "--set", "model.dtype=bfloat16", "--set", "training.max_steps=1",
        "--set", "data.train.0.max_samples=8", *(arg for o in extra for arg in ("--set", o)),
    ])
    assert result.exit_code == 0, result.output
    first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line)
    assert (first["rewards/chosen"], first["rewards/rejected"]) == (0.0, 0.0)
    device = json.loads((out / "run.json").read_text())["run_info"]["device"]
    assert (device["weights"], device["autocast"]) == ("float32", "bfloat16")
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")  # saved in the recipe's dtype, checkpoints keep float32
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(out / "checkpoint-1" / "model.safetensors").values()} == {torch.float32}


def test_the_preference_trainer_computes_in_bf16_over_fp32_weights(plan_for, tmp_path: Path):
    """The policy's forward runs under autocast although `batch_logps` swaps the causal LM's forward, which is
    where accelerate puts its autocast for a model without wrappers; the optimizer updates float32 weights."""
    from spo_align.data.collate import PairCollator
    from spo_align.losses.registry import build_pair_loss
    from spo_align.losses.spo import SPOLoss
    from spo_align.train.args import build_training_args
    from spo_align.train.model import load_model
    from spo_align.train.preference_trainer import PreferenceTrainer, ReferenceSpec

    plan = plan_for("spo", "model.dtype=bfloat16", "output.report_to=[none]")
    tok = h.tokenizer()
    model = load_model(plan)
    seen: list[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = PreferenceTrainer(
        model=model,
        args=build_training_args(plan, tmp_path, max_steps=2, remove_unused_columns=False, save_strategy="no"),
        train_dataset=h.tokenized_dataset(tok, 16),
        data_collator=PairCollator(tok.pad_token_id, "padded"),
        processing_class=tok,
        pair_loss=build_pair_loss(SPOLoss(type="spo")),
        reference=ReferenceSpec(kind="model", model=load_model(plan, plan.model_path, for_training=False)),
    )
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}  # every forward: policy and reference, both steps
    assert _trained_dtypes(trainer.model) == {torch.float32}


def test_a_forward_set_on_the_model_instance_survives_a_log_prob_call(plan_for):
    from spo_align.data.collate import PairCollator
    from spo_align.train.logps import batch_logps
    from spo_align.train.model import load_model

    tok = h.tokenizer()
    model = load_model(plan_for("spo"))
    wrapper = model.forward  # stands for accelerate's autocast wrapper, which it sets on the instance
    model.forward = wrapper
    ds = h.tokenized_dataset(tok, 2)
    batch_logps(model, PairCollator(tok.pad_token_id, "padded")([ds[0], ds[1]]))
    assert model.__dict__.get("forward") is wrapper


@pytest.mark.gpu
def test_bf16_full_fine_tuning_on_cuda_keeps_fp32_masters_and_starts_at_log_ratio_zero(
    small_model: Path, tmp_path: Path
):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "train", str(RECIPES / "spo.yaml"), "--set", f"model.name_or_path={small_model}",
        "--set", f"output.dir={out}", "--set", "model.dtype=bfloat16", "--set", "training.max_steps=2",
        "--set", "data.train.0.max_samples=8",
    ])
    assert result.exit_code == 0, result.output
    first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line)
    assert (first["rewards/chosen"], first["rewards/rejected"]) == (0.0, 0.0)
    device = json.loads((out / "run.json").read_text())["run_info"]["device"]
    assert (device["device"], device["weights"], device["autocast"]) == ("cuda:0", "float32", "bfloat16")
