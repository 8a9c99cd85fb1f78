"""An experiment without an SFT stage: every preference run starts from the `start` model as it is, which is
evaluated beside them as 'start'; held-out pairwise accuracy (eval.pairs), the reference judge's `choice`
rule, and summary.md. The end-to-end run here is on the embedded tiny model (tests/real has the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spo_align.experiment.spec import START_NAME, load_experiment, plan_stages
from spo_align.experiment.summary import SummaryRow, summary_markdown
from spo_align.recipe.errors import RecipeErrors

ROOT = Path(__file__).resolve().parents[2]

START = f"""\
output_dir: out
seeds: [0]
start: some-org/some-model
preference:
  - {{name: spo, recipe: {ROOT}/recipes/tiny/spo.yaml}}
  - {{name: dpo, recipe: {ROOT}/recipes/tiny/dpo.yaml}}
eval:
  prompts: {ROOT}/data/tiny/test.jsonl
  judge: {{type: reference}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _messages(exc: pytest.ExceptionInfo[RecipeErrors]) -> str:
    return exc.value.format("text")


def test_every_preference_run_starts_from_the_start_model_and_no_sft_runs(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, START))
    steps = plan_stages(experiment)
    assert [s.name for s in steps] == ["spo", "dpo"]
    assert all("model.name_or_path=some-org/some-model" in s.overrides for s in steps)
    assert experiment.stage_names == [START_NAME, "spo", "dpo"]
    assert experiment.model_path(0, START_NAME) == "some-org/some-model"
    assert experiment.model_path(0, "spo") == str(experiment.output_dir / "seed0" / "spo")


def test_a_start_folder_is_made_absolute_and_set_replaces_the_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(_write(tmp_path, START), ["start=model"])
    assert experiment.start_model == str(tmp_path / "model")
    assert f"model.name_or_path={tmp_path / 'model'}" in plan_stages(experiment)[0].overrides


def test_sft_and_start_are_one_or_the_other_at_their_line(tmp_path: Path) -> None:
    sft = f"sft: {{name: sft, recipe: {ROOT}/recipes/tiny/sft.yaml}}\n"
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("start: some-org/some-model\n", "")))
    assert f"{tmp_path / 'exp.yaml'}:1:1:" in _messages(exc) and "required key 'sft' or 'start' is missing" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("seeds: [0]\n", "seeds: [0]\n" + sft)))
    assert "give either 'sft'" in _messages(exc) and "not both" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("some-org/some-model", "' '")))
    assert f"{tmp_path / 'exp.yaml'}:3:" in _messages(exc) and "start must name a model" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("name: dpo", f"name: {START_NAME}")))
    assert f"'{START_NAME}' is reserved" in _messages(exc)


def test_the_choice_rule_and_held_out_pairs_are_checked_at_their_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("{type: reference}", "{type: reference, match: choice}")))
    assert ":9:" in _messages(exc) and "needs at least two distinct, non-empty choices" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("{type: reference}", "{type: reference, choices: [a, b]}")))
    assert "'choices' needs match: choice" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START.replace("{type: reference}", "{type: reference, match: choise}")))
    assert "did you mean 'choice'" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, START + "  pairs: nowhere.jsonl\n"))
    assert ":10:" in _messages(exc) and "held-out pair file not found" in _messages(exc)
    spec = load_experiment(_write(tmp_path, START.replace("{type: reference}", "{type: reference, match: choice, choices: [even, odd]}"))).spec
    assert spec.eval.judge.choices == ["even", "odd"]


def test_the_shipped_smollm2_experiment_starts_every_loss_from_the_instruct_model() -> None:
    from spo_align.losses.registry import CATALOGUE

    experiment = load_experiment(ROOT / "experiments" / "smollm2-parity.yaml")
    steps = plan_stages(experiment)
    assert experiment.spec.sft is None and experiment.spec.start == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert all("model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct" in s.overrides for s in steps)
    from spo_align.recipe.load import load_recipe

    recipes = [load_recipe(s.recipe_path, s.overrides) for s in steps]
    assert sorted(r.loss.type for r in recipes) == sorted(CATALOGUE)  # every loss of the catalogue, once
    budgets = {(r.training.max_steps, r.training.per_device_batch_size, r.training.learning_rate,
                r.adapter.r, r.adapter.target_modules) for r in recipes}
    assert budgets == {(12, 4, 2.0e-4, 16, "all-linear")}  # the same budget for all
    assert experiment.spec.eval.pairs is not None and experiment.spec.eval.judge.match == "choice"


def test_summary_table_has_every_column_and_says_n_a_where_a_value_does_not_apply() -> None:
    rows = [SummaryRow("start", prefers_chosen=0.5, greedy_right=0.25),
            SummaryRow("spo", 0.5, -1.0, 0.1, 0.9, 0.8, 0.75), SummaryRow("simpo", prefers_chosen=1.0)]
    text = summary_markdown(rows, "start", [0], pairs=True, greedy=True)
    assert ("| model | chosen log-ratio | rejected log-ratio | both below reference | held-out pairwise accuracy | "
            "held-out prefers chosen | held-out greedy right |") in text
    assert "| **start** | n/a | n/a | n/a | n/a | 0.50 | 0.25 |" in text
    assert "| **spo** | +0.50 | -1.00 | 0.10 | 0.90 | 0.80 | 0.75 |" in text
    assert "| **simpo** | n/a | n/a | n/a | n/a | 1.00 | n/a |" in text
    assert "pairwise" not in summary_markdown(rows, "start", [0], pairs=False, greedy=True).split("| model")[1]


@pytest.mark.slow
def test_a_start_experiment_runs_end_to_end_on_the_tiny_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from spo_align.experiment.runner import run_experiment
    from spo_align.tiny import write_tiny_model

    torch.set_num_threads(1)
    model = write_tiny_model(tmp_path / "tiny-start")
    pairs = tmp_path / "heldout.jsonl"
    lines = (ROOT / "data" / "tiny" / "pairs_train.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = _write(tmp_path, START + f"  pairs: {pairs}\n  n: 6\n  generation: {{max_new_tokens: 4, batch_size: 6}}\n")
    out = tmp_path / "out"
    overrides = [f"start={model}", f"output_dir={out}", "eval.n_bootstrap=20",
                 "recipe_set=[training.max_steps=2, training.per_device_batch_size=4, training.logging_steps=1, "
                 "data.train.0.max_samples=8]"]
    result = run_experiment(load_experiment(path, overrides))
    assert result.trained == ["seed0/spo", "seed0/dpo"]
    assert not (out / "seed0" / START_NAME).exists()  # the start model is read where it is, never trained
    assert (out / "seed0" / "generations" / f"{START_NAME}.jsonl").is_file()
    scores = {name: json.loads((out / "seed0" / "heldout_pairs" / f"{name}.json").read_text())["scores"]
              for name in (START_NAME, "spo", "dpo")}
    assert all(len(s) == 6 for s in scores.values())
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "held-out pairwise accuracy" in summary and "held-out greedy right" in summary
    assert f"| **{START_NAME}** | n/a | n/a | n/a | n/a |" in summary  # the reference of every margin
    for name in ("spo", "dpo"):
        cells = next(line for line in summary.splitlines() if line.startswith(f"| **{name}** |")).split("|")[2:-1]
        fractions = [float(c) for c in cells[2:]]
        assert all(0.0 <= f <= 1.0 for f in fractions), cells
    assert (out / "curves_seed0.png").stat().st_size > 0
    again = run_experiment(load_experiment(path, overrides))  # every score is read back, none recomputed
    assert again.trained == [] and (out / "summary.md").read_text(encoding="utf-8") == summary
