"""The loss registry: every loss module found, torch-free, and held to the same contract.

Nothing here names a loss: each test runs over whatever the registry found, so a new loss module is held to
the contract (a tiny recipe, a test file, a docs section, a union member, consistent facts) by being added.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from spo_align.losses.pair import PairLossSection
from spo_align.losses.registry import (
    CATALOGUE,
    SECTIONS,
    TYPES,
    LossRegistryError,
    build_pair_loss,
    logged_metrics,
    loss_entry,
    loss_label,
    loss_optimum,
    optimum_note,
    reward_scale,
)
from spo_align.recipe.schema import Loss
from tests.losses.closed_form import tiny_recipe_loss

REPO = Path(__file__).resolve().parents[2]
ENTRIES = list(CATALOGUE.values())
IDS = list(CATALOGUE)


def test_the_recipe_union_is_the_registry_in_its_order() -> None:
    union = typing.get_args(Loss)[0]
    assert tuple(typing.get_args(union)) == SECTIONS
    assert TYPES == tuple(entry.type for entry in sorted(ENTRIES, key=lambda e: e.order))
    assert len(set(TYPES)) == len(TYPES) >= 6


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_each_loss_ships_its_section_tiny_recipe_test_and_docs(entry) -> None:
    (tag,) = typing.get_args(entry.section.model_fields["type"].annotation)
    assert tag == entry.type
    assert entry.section.__module__ == f"spo_align.losses.{entry.type}"
    assert isinstance(tiny_recipe_loss(entry.type), entry.section)
    assert (REPO / "tests" / "losses" / f"test_{entry.type}.py").is_file()
    headings = [line for line in (REPO / "docs" / "losses.md").read_text(encoding="utf-8").splitlines() if line.startswith("## ")]
    assert any(line.startswith(f"## {entry.title}") for line in headings), headings


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_pair_losses_end_with_nll_weight_and_are_built_others_are_not(entry) -> None:
    fields = list(entry.section.model_fields)
    if entry.stage == "pair":
        assert issubclass(entry.section, PairLossSection) and entry.build is not None
        assert fields[0] == "type" and fields[-1] == "nll_weight", fields
        assert entry.section.model_fields["nll_weight"].default == 0.0
    else:
        assert "nll_weight" not in fields and entry.build is None
        with pytest.raises(ValueError, match=f"'{entry.type}' is not a pairwise loss"):
            build_pair_loss(tiny_recipe_loss(entry.type))
    assert not entry.reads_unpaired_rows or entry.stage != "pair"  # the pair trainer reads pairs only


def test_an_unknown_type_is_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="no catalogue entry for loss type 'nope'; known: spo, dpo"):
        loss_entry("nope")


def test_two_modules_claiming_one_type_are_refused(monkeypatch) -> None:
    import dataclasses

    import spo_align.losses.registry as registry
    import spo_align.losses.spo as spo

    monkeypatch.setattr(spo, "ENTRY", dataclasses.replace(spo.ENTRY, type="dpo"))
    with pytest.raises(LossRegistryError, match="same type: dpo"):
        registry._discover()


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_optimum_note_and_label_come_from_the_entry(entry) -> None:
    section = tiny_recipe_loss(entry.type)
    assert loss_optimum(section) == entry.optimum(section)
    assert optimum_note(section) == entry.optimum_note
    assert loss_label(section).startswith(entry.type)
    if entry.stage == "pair":
        with_nll = section.model_copy(update={"nll_weight": 0.2})
        assert loss_optimum(with_nll) == loss_optimum(section)  # of the pair term alone ...
        assert "nll_weight 0.2" in optimum_note(with_nll)  # ... and the note says the NLL term moves it
        assert loss_label(with_nll).endswith(" +nll 0.2")
    assert loss_optimum(None) is None and optimum_note(None) == ""


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.stage == "pair"], ids=lambda e: e.type)
def test_reward_scale_undoes_the_rewards_into_summed_log_ratios(entry) -> None:
    """Plots and tables divide `rewards/*` by the reward scale to draw log-ratios: it must be what the loss used."""
    torch = pytest.importorskip("torch")
    from spo_align.losses.pair import PairInputs

    section = tiny_recipe_loss(entry.type)
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    tokens = torch.randint(1, 9, (6,), generator=g)
    out = build_pair_loss(section)(PairInputs(pc, pr, tokens, tokens, rc, rr))
    scale = reward_scale(section)
    if scale is None:
        assert not entry.needs_reference  # only a reference-free loss has rewards that are no log-ratio
        return
    assert scale > 0
    torch.testing.assert_close(out.chosen_rewards / scale, pc - rc)
    torch.testing.assert_close(out.rejected_rewards / scale, pr - rr)


def test_progress_bar_and_plot_show_every_catalogue_metric() -> None:
    pytest.importorskip("transformers")
    from spo_align.plots.compare import term_title
    from spo_align.train.progress import PROGRESS_FIELDS

    names = [m.name for m in logged_metrics()]
    for entry in ENTRIES:
        for term in entry.terms:
            assert term.name in names and term.title and term_title(term.name) == term.title
    assert {"nll_term", "both_below_ref"} <= set(names)
    assert [k for k, _ in PROGRESS_FIELDS if k in names] == names
    labels = [label for _, label in PROGRESS_FIELDS]
    assert len(set(labels)) == len(labels)
    assert len({entry.colour for entry in ENTRIES}) == len(ENTRIES)


def test_catalogue_validation_and_resolve_import_no_torch(tmp_path: Path) -> None:
    """The base install (no torch) finds every loss and validates and resolves recipes of every loss."""
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
from spo_align.losses.registry import CATALOGUE, loss_optimum
from spo_align.recipe.load import load_recipe
from spo_align.recipe.resolve import resolve
plan = resolve(load_recipe(Path({str(recipe)!r})), Path({str(recipe)!r}))
text = plan.to_yaml()
assert 'lambda: 25.0' in text and 'nll_weight: 0.1' in text, text
assert plan.derived()['loss_optimum'] == {{'margin': None}}
for name in CATALOGUE:
    loss_optimum(load_recipe(Path({str(REPO)!r}) / 'recipes' / 'tiny' / (name + '.yaml')).loss)
print('ok', len(CATALOGUE))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(CATALOGUE)}"
