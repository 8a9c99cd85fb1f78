"""Derived values: one place computes world size, global batch, IPO tau, launcher, ZeRO stage, pack length."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from recipe_paths import REPO

from spo_align.recipe.load import load_recipe
from spo_align.recipe.resolve import RunPlan, resolve

BASE = """\
stage: preference
model:
  name_or_path: {model}
data:
  train:
    - path: pairs.jsonl
  max_length: {max_length}
  packing: {packing}
loss:
  type: ipo
  match_spo_beta: 0.3
training:
  learning_rate: 1.0e-6
  per_device_batch_size: 3
  gradient_accumulation_steps: 5
distributed:
  num_processes: {procs}
  num_nodes: {nodes}
output:
  dir: out/run
"""


def plan_for(tmp_path: Path, device: str | None = None, **fields: object) -> RunPlan:
    values = {"model": "org/model", "max_length": 2048, "packing": "false", "procs": 1, "nodes": 1} | fields
    path = tmp_path / "r.yaml"
    path.write_text(BASE.format(**values))
    return resolve(load_recipe(path), path, device)  # type: ignore[arg-type]


def test_batch_world_size_and_ipo_tau(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, procs=4, nodes=2)
    assert (plan.world_size, plan.global_batch_size) == (8, 3 * 5 * 8)
    assert plan.ipo_tau == pytest.approx(0.15)
    assert plan.launcher == "torchrun" and plan.zero_stage is None and plan.deepspeed_config is None


def test_single_process_without_deepspeed_runs_in_process(tmp_path: Path) -> None:
    assert plan_for(tmp_path).launcher == "inprocess"


def test_deepspeed_config_is_parsed_and_sets_launcher_and_stage() -> None:
    path = REPO / "spo_recipes" / "llama-3.1-8b-instruct" / "spo_full_zero3.yaml"
    plan = resolve(load_recipe(path), path)
    assert plan.launcher == "deepspeed" and plan.zero_stage == 3
    assert plan.deepspeed_config_path == (REPO / "deepspeed_configs" / "zero3.json").resolve()
    assert plan.deepspeed_config is not None and plan.deepspeed_config["train_batch_size"] == "auto"
    assert plan.recipe_path.is_absolute() and plan.base_dir == path.parent.resolve()


@pytest.mark.parametrize(
    ("device", "max_length", "pack_length", "expected"),
    [("cuda", 4096, None, 4096), ("cpu", 4096, None, 1024), ("cpu", 512, None, 512), ("cpu", 512, 3000, 3000), (None, 4096, None, None)],
)
def test_pack_length_defaults_depend_on_device(
    tmp_path: Path, device: str | None, max_length: int, pack_length: int | None, expected: int | None
) -> None:
    fields: dict[str, object] = {"max_length": max_length, "packing": "true"}
    if pack_length is not None:
        fields["packing"] = f"true\n  pack_length: {pack_length}"
    plan = plan_for(tmp_path, device, **fields)
    assert plan.pack_length == expected
    if expected is None:
        assert plan.derived()["pack_length"] == {"cuda": 4096, "cpu": 1024}


def test_pack_length_is_none_without_packing(tmp_path: Path) -> None:
    assert plan_for(tmp_path, "cuda").pack_length is None


def test_local_model_and_output_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    plan = plan_for(tmp_path, model="outputs/m/sft")
    assert plan.model_path == str(work / "outputs/m/sft")
    assert plan.output_dir == work / "out/run"
    assert plan_for(tmp_path, model="Qwen/Qwen2.5-7B-Instruct").model_path == "Qwen/Qwen2.5-7B-Instruct"
    assert plan_for(tmp_path, model="./m").model_path == str(work / "m")


def test_plan_is_frozen_and_serialises(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "cpu")
    with pytest.raises(ValidationError):
        plan.world_size = 2  # type: ignore[misc]
    data = plan.to_dict()
    assert data["derived"]["ipo_tau"] == pytest.approx(0.15)
    assert data["recipe"]["loss"] == {"type": "ipo", "tau": None, "match_spo_beta": 0.3, "nll_weight": 0.0}
    assert "#   ipo_tau: 0.15" in plan.to_yaml()


def test_schema_spo_floor_default_is_the_loss_module_default() -> None:
    """The recipe is the one source of the floor; its default must be the one losses/spo.py justifies."""
    from spo_align.losses.spo import DEFAULT_Z_FLOOR, SPOLoss

    assert SPOLoss(type="spo").z_floor == DEFAULT_Z_FLOOR
    with pytest.raises(ValidationError):
        SPOLoss(type="spo", z_floor=1.0)


def test_loss_optimum_is_shown_for_each_paired_loss() -> None:
    import math

    from spo_align.losses.dpo import DPOLoss
    from spo_align.losses.ipo import IPOLoss
    from spo_align.losses.kto import KTOLoss
    from spo_align.losses.spo import SPOLoss
    from spo_align.recipe.resolve import loss_optimum

    assert loss_optimum(SPOLoss(type="spo", beta=0.1, alpha=1.0)) == pytest.approx(
        {"margin": 10.0, "rejected_log_ratio": -1.0, "chosen_log_ratio": 9.0}
    )
    assert loss_optimum(DPOLoss(type="dpo", beta=0.1, label_smoothing=0.1))["margin"] == pytest.approx(10 * math.log(9))
    assert loss_optimum(DPOLoss(type="dpo", label_smoothing=0.0)) == {"margin": None}
    ipo = IPOLoss(type="ipo", match_spo_beta=0.1)
    assert loss_optimum(ipo)["margin"] == pytest.approx(loss_optimum(SPOLoss(type="spo", beta=0.1))["margin"])
    assert loss_optimum(KTOLoss(type="kto")) is None and loss_optimum(None) is None
