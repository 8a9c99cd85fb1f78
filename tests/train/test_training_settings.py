"""Recipe settings reach the trainer as written, for every stage: activation (gradient) checkpointing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spo_align.cli import app

RECIPES = Path(__file__).resolve().parents[1] / "data" / "recipes"
STAGES = {"spo": None, "sft_packed": "SFTConfig", "kto": "KTOConfig"}


@pytest.mark.parametrize("value", [False, True])
@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_gradient_checkpointing_reaches_every_stage_both_ways_without_a_deprecation_warning(
    plan_for, tmp_path: Path, recipe: str, value: bool
):
    import trl

    from spo_align.train.args import build_training_args

    plan = plan_for(recipe, f"training.gradient_checkpointing={str(value).lower()}", "output.report_to=[none]")
    cls = getattr(trl, STAGES[recipe]) if STAGES[recipe] else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = build_training_args(plan, tmp_path, cls)
    assert args.activation_checkpointing is value and args.gradient_checkpointing is value
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_dry_run_shows_the_checkpointing_the_run_will_use(small_model: Path, recipe: str):
    result = CliRunner().invoke(
        app, ["train", str(RECIPES / f"{recipe}.yaml"), "--set", f"model.name_or_path={small_model}", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    args = json.loads(result.stdout.split("\n", 1)[1])["trainer_args"]
    assert args["activation_checkpointing"] is False
