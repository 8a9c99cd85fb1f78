"""A run started on an older spo-align continues on a newer one whose recipe gained keys with defaults: a key the
run's recorded settings lack, now at its schema default, is no change of recipe; set to anything else it is one,
and a default that changed between versions is one too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_align.run_folder.checkpoints import seal
from spo_align.run_folder.lifecycle import OutputFolderError, claim_folder
from spo_align.run_folder.recipe_hash import HASH_FILE, RecipeSettings


def _older_run(out: Path, settings: RecipeSettings, *, lacks: str, then: dict | None = None) -> None:
    """The folder a run of `settings` leaves, as an older version without the key `lacks` recorded it."""
    out.mkdir(parents=True)
    (out / "resolved_recipe.yaml").write_text("stage: preference\n")
    recorded = {k: v for k, v in settings.values.items() if k != lacks}
    recorded.update(then or {})
    (out / HASH_FILE).write_text(json.dumps({"recipe_hash": "older", "settings": recorded}))
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"w" * 64)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 12}))
    seal(checkpoint)


def test_a_key_added_since_the_run_started_is_no_change_at_its_default(plan_for, tmp_path: Path):
    settings = RecipeSettings.from_plan(plan_for("spo"))
    assert settings.values["loss.nll_weight"] == 0.0 == settings.defaults["loss.nll_weight"]
    out = tmp_path / "run"
    _older_run(out, settings, lacks="loss.nll_weight")
    claim = claim_folder(out, settings, resume=True, overwrite=False)
    assert claim.continued and claim.checkpoint == out / "checkpoint-4"
    # written with the explicit default, it is the same run too
    explicit = RecipeSettings.from_plan(plan_for("spo", "loss.nll_weight=0.0"))
    assert claim_folder(out, explicit, resume=True, overwrite=False).continued


def test_a_key_added_since_but_set_to_another_value_is_a_change(plan_for, tmp_path: Path):
    out = tmp_path / "run"
    _older_run(out, RecipeSettings.from_plan(plan_for("spo")), lacks="loss.nll_weight")
    with pytest.raises(OutputFolderError, match=r"another recipe \(loss.nll_weight: \(unset\) -> 0.5\)"):
        claim_folder(out, RecipeSettings.from_plan(plan_for("spo", "loss.nll_weight=0.5")), resume=False, overwrite=False)


def test_a_default_that_changed_between_versions_is_a_change(plan_for, tmp_path: Path):
    settings = RecipeSettings.from_plan(plan_for("spo"))
    out = tmp_path / "run"
    # the older version's default weight decay was 0.01; the run did not set it
    _older_run(out, settings, lacks="loss.nll_weight", then={"training.weight_decay": 0.01})
    with pytest.raises(OutputFolderError, match=r"training.weight_decay: 0.01 -> 0.0"):
        claim_folder(out, settings, resume=False, overwrite=False)
