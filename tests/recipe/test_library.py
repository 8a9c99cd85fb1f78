"""The shipped recipe library: every recipe validates, and the paper's grid is wired as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipe_paths import RECIPE_ROOTS, REPO, repo_recipes

from spo_align.losses.dpo import DPOLoss
from spo_align.losses.dpop import DPOPLoss
from spo_align.losses.ipo import IPOLoss
from spo_align.losses.kto import KTOLoss
from spo_align.losses.simpo import SimPOLoss
from spo_align.losses.spo import SPOLoss
from spo_align.recipe.load import find_recipe_files, load_recipe
from spo_align.recipe.resolve import resolve

RECIPES = repo_recipes()
MODELS = ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct")
BASELINES = ("dpo", "ipo", "kto", "dpop", "simpo", "dpo_nll")


def test_collection_is_recursive_and_matches_the_cli_search() -> None:
    found, missing = find_recipe_files(RECIPE_ROOTS)
    assert not missing
    assert sorted(p.resolve() for p in found) == [p.resolve() for p in RECIPES]
    nested = [p for p in RECIPES if len(p.relative_to(REPO).parts) > 3]
    assert nested, "sweep recipes two folders down must be collected"
    assert any(p.parent.name == "tiny" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_recipe_validates_and_resolves(path: Path) -> None:
    recipe = load_recipe(path)
    plan = resolve(recipe, path)
    assert plan.global_batch_size >= 1
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "a recipe opens with a comment saying why"


@pytest.mark.parametrize("model", MODELS)
def test_paper_grid_starts_every_preference_run_from_the_same_sft_output(model: str) -> None:
    sft_path = REPO / "recipes" / model / "sft.yaml"
    sft = load_recipe(sft_path)
    assert sft.stage == "sft"
    assert [(s.path, s.split) for s in sft.data.train] == [("HuggingFaceH4/ultrachat_200k", "train_sft")]
    assert [(s.path, s.split) for s in sft.data.eval] == [("HuggingFaceH4/ultrachat_200k", "test_sft")]
    preference = [REPO / "recipes" / model / f"{name}.yaml" for name in BASELINES]
    preference += sorted((REPO / "spo_recipes" / model).rglob("*.yaml"))
    losses = set()
    for path in preference:
        recipe = load_recipe(path)
        assert recipe.stage == "preference"
        assert recipe.model.name_or_path == str(sft.output.dir), path
        assert [(s.path, s.split) for s in recipe.data.train] == [
            ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
        ]
        assert [(s.path, s.split) for s in recipe.data.eval] == [("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")]
        losses.add(type(recipe.loss))
    assert losses == {SPOLoss, DPOLoss, IPOLoss, KTOLoss, DPOPLoss, SimPOLoss}


@pytest.mark.parametrize("model", MODELS)
def test_baselines_match_the_paper_settings(model: str) -> None:
    dpo = load_recipe(REPO / "recipes" / model / "dpo.yaml").loss
    assert isinstance(dpo, DPOLoss) and dpo.label_smoothing == 0.1
    ipo = load_recipe(REPO / "recipes" / model / "ipo.yaml").loss
    spo = load_recipe(REPO / "spo_recipes" / model / "spo_full_zero3.yaml").loss
    assert isinstance(ipo, IPOLoss) and isinstance(spo, SPOLoss)
    assert ipo.match_spo_beta == spo.beta
    assert ipo.resolved_tau == pytest.approx(spo.beta / 2)
    # The answers to falling chosen likelihoods start from the DPO baseline's beta.
    dpop = load_recipe(REPO / "recipes" / model / "dpop.yaml").loss
    dpo_nll = load_recipe(REPO / "recipes" / model / "dpo_nll.yaml").loss
    assert isinstance(dpop, DPOPLoss) and dpop.beta == dpo.beta and dpop.lambda_ == 50
    assert isinstance(dpo_nll, DPOLoss) and dpo_nll.model_copy(update={"nll_weight": 0.0}) == dpo and dpo_nll.nll_weight > 0
    assert isinstance(load_recipe(REPO / "recipes" / model / "simpo.yaml").loss, SimPOLoss)


@pytest.mark.parametrize("model", MODELS)
def test_spo_full_recipe_is_eight_gpus_zero3_and_differs_from_baselines_only_in_loss(model: str) -> None:
    spo_path = REPO / "spo_recipes" / model / "spo_full_zero3.yaml"
    plan = resolve(load_recipe(spo_path), spo_path)
    assert (plan.world_size, plan.zero_stage, plan.launcher) == (8, 3, "deepspeed")
    for name in BASELINES:
        other = load_recipe(REPO / "recipes" / model / f"{name}.yaml")
        for section in ("model", "data", "training"):
            assert getattr(other, section) == getattr(plan.recipe, section), (name, section)


@pytest.mark.parametrize("model", MODELS)
def test_sweep_varies_only_beta_alpha_and_output(model: str) -> None:
    base = load_recipe(REPO / "spo_recipes" / model / "spo_lora.yaml")
    points = sorted((REPO / "spo_recipes" / model / "sweep").glob("*.yaml"))
    assert len(points) >= 3
    seen = set()
    for path in points:
        recipe = load_recipe(path)
        assert isinstance(recipe.loss, SPOLoss)
        seen.add((recipe.loss.beta, recipe.loss.alpha))
        assert recipe.adapter == base.adapter and recipe.training == base.training and recipe.data == base.data
        assert recipe.output.dir != base.output.dir
    assert len(seen) == len(points)


def test_deepspeed_configs_leave_batch_and_precision_to_the_trainer() -> None:
    import json

    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        config = json.loads((REPO / "deepspeed_configs" / f"{name}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            assert config[key] == "auto"
        assert config["bf16"]["enabled"] == "auto"
