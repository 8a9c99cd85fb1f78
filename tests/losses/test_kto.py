"""KTO's section and entry: it trains through TRL (no tensor function here), reads unpaired rows, and brings
the recipe checks its KL reference point needs. TRL's loss is checked against the paper in
tests/train/test_train_kto.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo_align.losses.kto import KTOLoss
from spo_align.losses.registry import CATALOGUE, loss_label, loss_optimum, reward_scale
from spo_align.recipe.errors import RecipeErrors
from spo_align.recipe.load import load_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "kto.yaml"


def test_entry_trains_through_trl_on_unpaired_rows():
    entry = CATALOGUE["kto"]
    assert entry.stage == "kto" and entry.build is None and entry.reads_unpaired_rows and entry.needs_reference
    assert loss_optimum(KTOLoss(type="kto")) is None
    assert reward_scale(KTOLoss(type="kto", beta=0.1)) == 0.1


def test_label_shows_the_class_weights_only_when_they_differ_from_one():
    assert loss_label(KTOLoss(type="kto", beta=0.1)) == "kto β=0.1"
    assert loss_label(KTOLoss(type="kto", beta=0.1, desirable_weight=1.5)) == "kto β=0.1 λD=1.5 λU=1"


@pytest.mark.parametrize(
    "override,key,message",
    [
        ("training.per_device_batch_size=1", "training.per_device_batch_size", "KTO needs per_device_batch_size >= 2"),
        ("data.packing=true", "data.packing", "packing is not supported with loss 'kto'"),
    ],
)
def test_its_checks_refuse_what_its_kl_reference_point_cannot_use(override, key, message):
    with pytest.raises(RecipeErrors) as caught:
        load_recipe(TINY, [override])
    assert any(error.key_path == key and message in error.message for error in caught.value.errors)
