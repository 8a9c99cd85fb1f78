"""Fixtures for the runner tests: a hidden-32 tiny Llama written once per session, the test recipes, and a
helper that resolves a recipe with overrides exactly as `spo train` does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "tests" / "data" / "recipes"


@pytest.fixture(scope="session", autouse=True)
def _one_thread_and_private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["SPO_ALIGN_CACHE"] = str(tmp_path_factory.mktemp("spo_cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny tokenizer on a hidden-32, 2-layer Llama (24k parameters), saved with save_pretrained."""
    from spo_align.tiny import TinyModelShape, write_tiny_model

    shape = TinyModelShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny32", shape)


def make_plan(recipe: str, *overrides: str, device: str = "cpu") -> Any:
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve

    path = RECIPES / f"{recipe}.yaml"
    return resolve(load_recipe(path, list(overrides)), path, device)  # type: ignore[arg-type]


@pytest.fixture
def plan_for(small_model: Path, tmp_path: Path):
    """plan_for("spo", "loss.beta=0.5") -> a RunPlan on the small model writing under tmp_path."""

    def build(recipe: str, *overrides: str) -> Any:
        return make_plan(
            recipe, f"model.name_or_path={small_model}", f"output.dir={tmp_path / ('out-' + recipe)}", *overrides
        )

    return build


@pytest.fixture
def plan_from():
    """plan_from("spo_zero2", "distributed.launcher=accelerate") -> a RunPlan with exactly these overrides."""
    return make_plan
