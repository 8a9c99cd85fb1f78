"""The loss catalogue: one entry per schema loss, torch-free, and every consumer reading it."""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from spo_align.loss_catalogue import (
    CATALOGUE,
    TYPES,
    build_pair_loss,
    logged_metrics,
    loss_entry,
    loss_optimum,
    optimum_note,
    reward_scale,
)
from spo_align.recipe.schema import (
    DPOLoss,
    DPOPLoss,
    IPOLoss,
    KTOLoss,
    Loss,
    PairLossSection,
    SimPOLoss,
    SPOLoss,
)

REPO = Path(__file__).resolve().parents[1]


def _schema_sections() -> list[type]:
    union = typing.get_args(Loss)[0]
    return list(typing.get_args(union))


def test_every_schema_loss_has_exactly_one_entry_and_back() -> None:
    sections = _schema_sections()
    assert {entry.section for entry in CATALOGUE.values()} == set(sections)
    assert len(sections) == len(CATALOGUE)
    for entry in CATALOGUE.values():
        (tag,) = typing.get_args(entry.section.model_fields["type"].annotation)
        assert tag == entry.type
    assert TYPES == ("spo", "dpo", "ipo", "dpop", "simpo", "kto")


def test_pair_losses_end_with_nll_weight_and_are_built_kto_is_not() -> None:
    for entry in CATALOGUE.values():
        fields = list(entry.section.model_fields)
        if entry.stage == "pair":
            assert issubclass(entry.section, PairLossSection) and entry.build is not None, entry.type
            assert fields[0] == "type" and fields[-1] == "nll_weight", (entry.type, fields)
            assert entry.section.model_fields["nll_weight"].default == 0.0
        else:
            assert "nll_weight" not in fields and entry.build is None
    with pytest.raises(ValueError, match="'kto' is not a pairwise loss"):
        build_pair_loss(KTOLoss(type="kto"))
    with pytest.raises(ValueError, match="no catalogue entry for loss type 'nope'"):
        loss_entry("nope")


def test_only_simpo_is_reference_free_and_only_kto_reads_unpaired_rows() -> None:
    assert [t for t, e in CATALOGUE.items() if not e.needs_reference] == ["simpo"]
    assert [t for t, e in CATALOGUE.items() if e.reads_unpaired_rows] == ["kto"]
    assert [t for t, e in CATALOGUE.items() if e.stage == "kto"] == ["kto"]


def test_optima_of_the_new_losses_and_the_nll_note() -> None:
    assert loss_optimum(DPOPLoss.model_validate({"type": "dpop", "beta": 0.1, "lambda": 50})) == {"margin": None}
    assert loss_optimum(SimPOLoss(type="simpo", beta=2.0, gamma=1.0)) == {"per_token_margin": None, "gamma_over_beta": 0.5}
    # The NLL term leaves the pair term's optimum in place but the note says it moves the whole loss's.
    with_nll = SPOLoss(type="spo", beta=0.1, nll_weight=0.2)
    assert loss_optimum(with_nll) == loss_optimum(SPOLoss(type="spo", beta=0.1))
    assert "nll_weight 0.2" in optimum_note(with_nll) and "nll" not in optimum_note(SPOLoss(type="spo"))
    assert loss_optimum(DPOLoss(type="dpo", beta=0.1, label_smoothing=0.1))["margin"] == pytest.approx(10 * math.log(9))
    assert loss_optimum(None) is None and optimum_note(None) == ""


def test_reward_scales_undo_each_loss_s_rewards() -> None:
    assert reward_scale(SPOLoss(type="spo", beta=0.2)) == 0.2
    assert reward_scale(IPOLoss(type="ipo", tau=0.1)) == pytest.approx(0.2)
    assert reward_scale(DPOPLoss.model_validate({"type": "dpop", "beta": 0.3})) == 0.3
    assert reward_scale(KTOLoss(type="kto", beta=0.1)) == 0.1
    assert reward_scale(SimPOLoss(type="simpo")) is None  # no log-ratio to undo


def test_built_losses_equal_the_pure_functions_plus_the_nll_term() -> None:
    torch = pytest.importorskip("torch")
    from spo_align import pair_losses as pl

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 9, (5,), generator=g) for _ in range(2))
    x = pl.PairInputs(pc, pr, nc, nr, rc, rr)
    expected = {
        SPOLoss(type="spo", beta=0.2, alpha=0.5, z_floor=None): pl.spo_loss(pc, pr, rc, rr, beta=0.2, alpha=0.5, z_floor=None),
        DPOLoss(type="dpo", beta=0.3, label_smoothing=0.2): pl.dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2),
        IPOLoss(type="ipo", match_spo_beta=0.4): pl.ipo_loss(pc, pr, rc, rr, tau=0.2),
        DPOPLoss.model_validate({"type": "dpop", "beta": 0.1, "lambda": 7}): pl.dpop_loss(pc, pr, rc, rr, beta=0.1, lambda_=7.0),
        SimPOLoss(type="simpo", beta=2.5, gamma=1.5): pl.simpo_loss(pc, pr, nc, nr, beta=2.5, gamma=1.5),
    }
    assert {type(s) for s in expected} == {e.section for e in CATALOGUE.values() if e.stage == "pair"}
    for section, want in expected.items():
        got = build_pair_loss(section)(x)
        torch.testing.assert_close(got.losses, want.losses)
        torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards)
        assert "nll_term" not in got.terms
        with_nll = build_pair_loss(section.model_copy(update={"nll_weight": 0.5}))(x)
        torch.testing.assert_close(with_nll.losses - want.losses, 0.5 * -pc / nc)
    # SimPO never asks for the reference: it runs on inputs that carry none.
    no_ref = pl.PairInputs(pc, pr, nc, nr)
    build_pair_loss(SimPOLoss(type="simpo"))(no_ref)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        build_pair_loss(DPOLoss(type="dpo"))(no_ref)


def test_progress_bar_and_plot_show_every_catalogue_metric() -> None:
    pytest.importorskip("transformers")
    from spo_align.plots.compare import TERM_TITLES
    from spo_align.train.callbacks import PROGRESS_FIELDS

    names = [m.name for m in logged_metrics()]
    for entry in CATALOGUE.values():
        for term in entry.terms:
            assert term.name in names
    assert {"nll_term", "dpop_penalty", "spo_margin_term", "both_below_ref"} <= set(names)
    assert [k for k, _ in PROGRESS_FIELDS if k in names] == names
    assert {term.name for entry in CATALOGUE.values() for term in entry.terms} | {"nll_term"} <= set(TERM_TITLES)
    labels = [label for _, label in PROGRESS_FIELDS]
    assert len(set(labels)) == len(labels)


def test_catalogue_validation_and_resolve_import_no_torch(tmp_path: Path) -> None:
    """The base install (no torch) validates and resolves recipes of every loss through the catalogue."""
    recipe = tmp_path / "dpop.yaml"
    recipe.write_text(
        "stage: preference\nmodel: {name_or_path: outputs/sft}\ndata: {train: [{path: pairs.jsonl, format: pairs}]}\n"
        "loss: {type: dpop, beta: 0.2, lambda: 25, nll_weight: 0.1}\ntraining: {learning_rate: 1.0e-6}\n"
        "output: {dir: outputs/dpop}\n",
        encoding="utf-8",
    )
    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'trl'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, NoTorch())
from pathlib import Path
from spo_align.loss_catalogue import CATALOGUE
from spo_align.recipe.load import load_recipe
from spo_align.recipe.resolve import resolve
plan = resolve(load_recipe(Path({str(recipe)!r})), Path({str(recipe)!r}))
text = plan.to_yaml()
assert 'lambda: 25.0' in text and 'nll_weight: 0.1' in text, text
assert plan.derived()['loss_optimum'] == {{'margin': None}}
print('ok', len(CATALOGUE))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(CATALOGUE)}"


def test_resolved_dpop_recipe_writes_lambda_and_loads_again(tmp_path: Path) -> None:
    from spo_align.recipe.load import load_recipe
    from spo_align.recipe.resolve import resolve

    path = tmp_path / "dpop.yaml"
    path.write_text(
        "stage: preference\nmodel: {name_or_path: outputs/sft}\ndata: {train: [{path: pairs.jsonl, format: pairs}]}\n"
        "loss: {type: dpop, lambda: 5}\ntraining: {learning_rate: 1.0e-6}\noutput: {dir: outputs/dpop}\n",
        encoding="utf-8",
    )
    plan = resolve(load_recipe(path), path)
    assert plan.recipe_dict()["loss"] == {"type": "dpop", "beta": 0.1, "lambda": 5.0, "nll_weight": 0.0}
    again = tmp_path / "resolved.yaml"
    again.write_text(plan.to_yaml(), encoding="utf-8")
    loss = load_recipe(again).loss
    assert isinstance(loss, DPOPLoss) and loss.lambda_ == 5.0
    assert "optimum" in plan.to_yaml() and "no finite optimum" in plan.to_yaml()
