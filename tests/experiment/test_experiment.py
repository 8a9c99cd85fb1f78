"""`spo experiment`: the experiment file (errors with lines), the stage plan, the tables, and a
scaled-down tiny experiment run end to end twice (the second run must skip everything)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spo_align.experiment.report import (
    AccuracyRow,
    LogRatioRow,
    accuracy_markdown,
    log_ratio_markdown,
    read_prompt_groups,
    reward_scale,
)
from spo_align.experiment.runner import ExperimentError
from spo_align.experiment.spec import load_experiment, plan_stages
from spo_align.recipe.errors import RecipeErrors

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = f"""\
output_dir: out
seeds: [0, 1]
sft: {{name: sft, recipe: {ROOT}/recipes/tiny/sft.yaml}}
preference:
  - {{name: spo, recipe: {ROOT}/recipes/tiny/spo.yaml}}
eval:
  prompts: {ROOT}/data/tiny/test.jsonl
  judge: {{type: reference}}
"""


def _messages(exc: pytest.ExceptionInfo[RecipeErrors]) -> str:
    return exc.value.format("text")


def test_unknown_key_is_reported_with_its_line_and_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("  judge: {type: reference}", "  judge: {type: reference}\n  n_bootstrp: 10"))
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(path)
    assert f"{path}:9:3: eval.n_bootstrp: unknown key 'n_bootstrp' in 'eval' (did you mean 'n_bootstrap'?)" in _messages(exc)


def test_openai_judge_needs_a_model_and_reference_judge_takes_none(tmp_path: Path) -> None:
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD.replace("{type: reference}", "{type: openai}")))
    assert ":8:" in _messages(exc) and "needs 'model'" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD.replace("{type: reference}", "{type: reference, model: gpt-4o}")))
    assert "takes no 'model'" in _messages(exc)


def test_missing_recipe_and_repeated_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD.replace("tiny/spo.yaml", "tiny/nope.yaml")))
    assert f"{tmp_path / 'exp.yaml'}:5:" in _messages(exc) and "recipe file not found" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD.replace("name: spo", "name: sft")))
    assert "stage names must be distinct; repeated: sft" in _messages(exc)
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD), ["seeds=[3, 3]"])
    assert "seeds must be distinct" in _messages(exc)


def test_set_overrides_apply_and_are_named_in_errors(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, GOOD), ["seeds=[7]", "eval.n=5"])
    assert experiment.spec.seeds == [7] and experiment.spec.eval.n == 5
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD), ["eval.n=0"])
    assert "[from --set eval.n=0]" in _messages(exc)


def test_plan_points_every_preference_run_at_its_seeds_sft_output(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, GOOD), ["recipe_set=[training.max_steps=3]"])
    steps = plan_stages(experiment)
    assert [(s.seed, s.name) for s in steps] == [(0, "sft"), (0, "spo"), (1, "sft"), (1, "spo")]
    out = experiment.output_dir
    spo1 = steps[3]
    assert spo1.output_dir == out / "seed1" / "spo"
    assert f"model.name_or_path={out / 'seed1' / 'sft'}" in spo1.overrides
    assert {"training.max_steps=3", "training.seed=1", f"output.dir={out / 'seed1' / 'spo'}"} <= set(spo1.overrides)
    assert not any(o.startswith("model.name_or_path") for o in steps[2].overrides)


def test_a_recipe_override_error_names_the_recipe_before_anything_runs(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, GOOD), ["recipe_set=[training.learning_rat=1]"])
    with pytest.raises(RecipeErrors) as exc:
        plan_stages(experiment)
    assert "recipes/tiny/sft.yaml" in _messages(exc) and "did you mean 'learning_rate'" in _messages(exc)
    assert not experiment.output_dir.exists()


@pytest.mark.parametrize("name", ["tiny.yaml", "paper-qwen2.5-7b.yaml", "paper-llama-3.1-8b.yaml"])
def test_shipped_experiments_and_their_recipes_validate(name: str) -> None:
    experiment = load_experiment(ROOT / "experiments" / name)
    steps = plan_stages(experiment)
    assert len(steps) == len(experiment.spec.seeds) * 5
    assert [s.name for s in steps[:5]] == ["sft", "dpo", "kto", "ipo", "spo"]


def test_tiny_experiment_has_several_seeds_and_the_carry_breakdown() -> None:
    spec = load_experiment(TINY).spec
    assert len(spec.seeds) > 1 and spec.eval.judge.type == "reference" and spec.eval.accuracy_by == "carry"


def test_boolean_field_groups_prompts_as_field_and_no_field() -> None:
    groups = read_prompt_groups(ROOT / "data" / "tiny" / "test.jsonl", "carry")
    assert len(groups) == 200
    assert sorted(set(groups.values())) == ["carry", "no-carry"]
    assert list(groups.values()).count("carry") == 90


def test_accuracy_table_averages_seeds_and_shows_their_range() -> None:
    rows = [
        AccuracyRow("sft", 0, "carry", 1, 10), AccuracyRow("sft", 1, "carry", 3, 10),
        AccuracyRow("sft", 0, "all", 11, 20), AccuracyRow("sft", 1, "all", 13, 20),
        AccuracyRow("spo", 0, "carry", 9, 10), AccuracyRow("spo", 1, "carry", 10, 10),
        AccuracyRow("spo", 0, "all", 19, 20), AccuracyRow("spo", 1, "all", 20, 20),
    ]
    text = accuracy_markdown(rows, ["sft", "spo"], [0, 1])
    assert "mean over 2 seed(s) (0, 1)" in text
    assert "| model | carry (n=10) | all (n=20) |" in text
    assert "| **sft** | 20.0 [10.0, 30.0] | 60.0 [55.0, 65.0] |" in text
    assert "| **spo** | 95.0 [90.0, 100.0] | 97.5 [95.0, 100.0] |" in text


def test_log_ratios_undo_each_losss_reward_scale_and_average_seeds() -> None:
    from spo_align.losses.dpo import DPOLoss
    from spo_align.losses.ipo import IPOLoss
    from spo_align.losses.spo import SPOLoss

    assert reward_scale(SPOLoss(type="spo", beta=0.2)) == 0.2
    assert reward_scale(DPOLoss(type="dpo", beta=0.1)) == 0.1
    assert reward_scale(IPOLoss(type="ipo", match_spo_beta=0.2)) == pytest.approx(0.2)  # 2 tau, tau = beta / 2
    rows = [LogRatioRow("dpo", 0, -1.0, -5.0, 0.5), LogRatioRow("dpo", 1, -0.5, -6.0, 0.3),
            LogRatioRow("spo", 0, 0.4, -1.4, None)]
    text = log_ratio_markdown(rows, [0, 1])
    assert "| **dpo** | -0.75 | -5.50 | 0.40 |" in text
    assert "| **spo** | +0.40 | -1.40 | n/a |" in text


# ---------------------------------------------------------------- end to end


QUICK = [
    "output_dir={out}",
    "eval.n=24",
    "eval.n_bootstrap=50",
    # A few steps on a few rows: the plumbing, not the learning, is under test here.
    (
        "recipe_set=[training.max_steps=4, training.per_device_batch_size=8, training.save_steps=2, "
        "training.logging_steps=1, data.train.0.max_samples=64]"
    ),
]


def _judgment_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_tiny_experiment_runs_end_to_end_then_skips_every_finished_stage(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from spo_align.experiment.runner import run_experiment

    torch.set_num_threads(1)
    out = tmp_path / "exp"
    experiment = load_experiment(TINY, [o.format(out=out) for o in QUICK])
    stages = [f"seed{s}/{n}" for s in (0, 1) for n in ("sft", "dpo", "kto", "ipo", "spo")]

    assert experiment.spec.jobs == 2  # both seeds at once, in worker processes
    first = run_experiment(experiment)
    assert first.trained == stages and first.skipped == []
    for seed in (0, 1):
        for name in ("sft", "dpo", "kto", "ipo", "spo"):
            assert (out / f"seed{seed}" / name / "COMPLETE").is_file()
            assert (out / f"seed{seed}" / "generations" / f"{name}.jsonl").is_file()
        # 10 pairs of models x 24 prompts x 2 orders
        assert len(_judgment_lines(out / f"seed{seed}" / "judgments.jsonl")) == 10 * 24 * 2
    win_rates = (out / "win_rates.md").read_text(encoding="utf-8")
    assert "Averaged over 2 seed(s) (0, 1)" in win_rates and "n=48" in win_rates
    assert (out / "win_rates.png").stat().st_size > 0 and (out / "win_rates_seed1.md").is_file()
    assert all((out / f"curves_seed{s}.{ext}").stat().st_size > 0 for s in (0, 1) for ext in ("png", "svg"))
    accuracy = (out / "accuracy.md").read_text(encoding="utf-8")
    assert "carry (n=" in accuracy and "no-carry (n=" in accuracy and "all (n=24)" in accuracy
    log_ratios = (out / "log_ratios.md").read_text(encoding="utf-8")
    assert all(f"| **{name}** |" in log_ratios for name in ("dpo", "ipo", "spo"))
    csv_rows = (out / "accuracy.csv").read_text(encoding="utf-8").splitlines()
    assert len(csv_rows) == 1 + 2 * 5 * 3  # header + seeds x models x {carry, no-carry, all}

    kept = {p: p.stat().st_mtime_ns for p in out.glob("seed*/generations/*.jsonl")}
    judged = {s: _judgment_lines(out / f"seed{s}" / "judgments.jsonl") for s in (0, 1)}
    # A URL with credentials given with --set (a judge's base_url, here in the description) is stored masked.
    second = run_experiment(load_experiment(TINY, [*experiment.overrides, "description=judge http://u:Pw-9x7q@h/v1"]))
    assert second.trained == [] and second.skipped == stages
    runs_log = (out / "runs.jsonl").read_text(encoding="utf-8")
    assert "Pw-9x7q" not in runs_log and "description=judge http://***@h/v1" in runs_log
    runs = [json.loads(line) for line in runs_log.splitlines()]
    assert [len(r["trained"]) for r in runs] == [10, 0]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert {s: _judgment_lines(out / f"seed{s}" / "judgments.jsonl") for s in (0, 1)} == judged
    assert (out / "win_rates.md").read_text(encoding="utf-8") == win_rates

    # An interrupted stage (no completion marker) is trained again, and only it; no judgment is asked twice.
    (out / "seed1" / "spo" / "COMPLETE").unlink()
    (out / "seed1" / "generations" / "spo.jsonl").unlink()
    third = run_experiment(load_experiment(TINY, [*experiment.overrides, "jobs=1"]))  # the in-process path
    assert third.trained == ["seed1/spo"]
    assert _judgment_lines(out / "seed0" / "judgments.jsonl") == judged[0]
    keys = [tuple(json.loads(line)[k] for k in ("prompt_id", "model_a", "model_b"))
            for line in _judgment_lines(out / "seed1" / "judgments.jsonl")]
    assert len(keys) == len(set(keys)) == 10 * 24 * 2

    # A finished preference run older than the SFT run it should start from is refused, not reused.
    marker = out / "seed0" / "sft" / "COMPLETE"
    later = (out / "seed0" / "dpo" / "COMPLETE").stat().st_mtime + 60
    os.utime(marker, (later, later))
    with pytest.raises(ExperimentError, match="predates the SFT run"):
        run_experiment(load_experiment(TINY, [*experiment.overrides, "jobs=1"]))


def test_the_spec_and_the_report_never_import_the_runner() -> None:
    """experiment/spec (file, loading, plan) and experiment/report (tables) sit below experiment/runner
    (running): no import loop, and the plan needs no torch."""
    import ast

    for name in ("spec", "report"):
        tree = ast.parse((ROOT / "src" / "spo_align" / "experiment" / f"{name}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "spo_align.experiment.runner" not in imported, name


# ---------------------------------------------------------------- sweeps


SWEEP = GOOD.replace(
    f"  - {{name: spo, recipe: {ROOT}/recipes/tiny/spo.yaml}}",
    f"  - {{name: spo, recipe: {ROOT}/recipes/tiny/spo.yaml, set: [loss.beta=0.9], sweep: {{loss.beta: [0.05, 1.0e-5, 2]}}}}\n"
    f"  - {{name: dpo, recipe: {ROOT}/recipes/tiny/dpo.yaml}}",
)


def test_a_sweep_gives_one_named_run_per_value_its_override_last(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, SWEEP))
    assert experiment.stage_names == ["sft", "spo_beta0.05", "spo_beta1e-05", "spo_beta2", "dpo"]
    steps = plan_stages(experiment)
    assert [s.name for s in steps if s.seed == 1] == experiment.stage_names
    point = next(s for s in steps if s.name == "spo_beta1e-05" and s.seed == 0)
    assert point.output_dir == experiment.output_dir / "seed0" / "spo_beta1e-05"
    assert point.overrides.index("loss.beta=1e-05") > point.overrides.index("loss.beta=0.9")  # the sweep wins
    from spo_align.recipe.load import load_recipe

    assert load_recipe(point.recipe_path, point.overrides).loss.beta == 1e-5  # read back as a number
    assert load_recipe(next(s for s in steps if s.name == "spo_beta2").recipe_path,
                       next(s for s in steps if s.name == "spo_beta2").overrides).loss.beta == 2.0


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("{loss.beta: []}", "sweep 'loss.beta' lists no values"),
        ("{loss.beta: [0.1, 0.1]}", "sweep 'loss.beta' repeats a value"),
        ("{loss..beta: [0.1]}", "must be a recipe key path"),
        ("{loss.beta: [a b]}", "a sweep value makes the run name 'spo_betaa b'"),
        ("{loss.beta: [{a: 1}]}", "Input should be"),
        ("{output.dir: [a, b]}", "sweep key 'output.dir' cannot be swept: the experiment owns it"),
        ("{model.name_or_path: [a, b]}", "sweep key 'model.name_or_path' cannot be swept: the experiment owns it"),
    ],
)
def test_bad_sweeps_are_refused_at_their_line(tmp_path: Path, sweep: str, message: str) -> None:
    text = GOOD.replace("tiny/spo.yaml}", f"tiny/spo.yaml, sweep: {sweep}}}")
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, text))
    assert message in _messages(exc) and f"{tmp_path / 'exp.yaml'}:5:" in _messages(exc)


def test_sft_takes_no_sweep_and_point_names_must_not_collide(tmp_path: Path) -> None:
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, GOOD.replace("tiny/sft.yaml}", "tiny/sft.yaml, sweep: {training.max_steps: [1, 2]}}")))
    assert "the sft stage takes no sweep" in _messages(exc)
    clash = GOOD.replace(
        f"  - {{name: spo, recipe: {ROOT}/recipes/tiny/spo.yaml}}",
        f"  - {{name: spo_beta0.1, recipe: {ROOT}/recipes/tiny/spo.yaml}}\n"
        f"  - {{name: spo, recipe: {ROOT}/recipes/tiny/spo.yaml, sweep: {{loss.beta: [0.1]}}}}",
    )
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, clash))
    assert "stage names must be distinct; repeated: spo_beta0.1" in _messages(exc)


def test_a_recipe_error_of_a_swept_key_is_reported_once(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, GOOD.replace("tiny/spo.yaml}", "tiny/spo.yaml, sweep: {loss.beta: [-1, -2]}}")))
    with pytest.raises(RecipeErrors) as exc:
        plan_stages(experiment)
    errors = [e for e in exc.value.errors if e.key_path == "loss.beta"]
    assert len(errors) == 2  # one per bad value, not once more per seed
    assert all("[from --set loss.beta=" in e.message for e in errors)


def test_tiny_extended_sweeps_every_loss_over_three_points() -> None:
    from spo_align.losses.registry import CATALOGUE
    from spo_align.recipe.load import load_recipe

    experiment = load_experiment(ROOT / "experiments" / "tiny-extended.yaml")
    steps = plan_stages(experiment)
    assert len(experiment.spec.seeds) == 2 and len(steps) == 2 * (1 + 3 * len(experiment.spec.preference))
    assert all(len(stage.points()) == 3 for stage in experiment.spec.preference)
    losses = {}
    for step in steps:
        loss = load_recipe(step.recipe_path, step.overrides).loss
        if loss is not None:
            losses.setdefault(step.name.split("_")[0], set()).add(loss.type)
    assert {t for types in losses.values() for t in types} == set(CATALOGUE)  # every loss of the catalogue
    assert any(step.name.startswith("dpo-nll") for step in steps)
    # The paper experiments keep their grid: the new losses are there only as comments.
    for name in ("paper-qwen2.5-7b.yaml", "paper-llama-3.1-8b.yaml"):
        assert [s.name for s in load_experiment(ROOT / "experiments" / name).spec.preference] == ["dpo", "kto", "ipo", "spo"]


def test_sweep_table_lists_every_point_and_the_best_per_stage(tmp_path: Path) -> None:
    from spo_align.eval.table import Cell, WinRateTable
    from spo_align.experiment.report import sweep_markdown, sweep_scores

    experiment = load_experiment(_write(tmp_path, SWEEP))
    rows = [AccuracyRow(name, seed, "all", correct, 10) for seed in (0, 1)
            for name, correct in (("sft", 5), ("spo_beta0.05", 9), ("spo_beta1e-05", 7), ("spo_beta2", 9), ("dpo", 6))]
    scores, criterion = sweep_scores(experiment, rows, None)
    assert scores == {"spo_beta0.05": 90.0, "spo_beta1e-05": 70.0, "spo_beta2": 90.0, "dpo": 60.0}
    text = sweep_markdown(experiment, scores, criterion)
    assert "held-out accuracy on all prompts (%), mean over 2 seed(s)" in text
    assert "| **spo** | loss.beta | beta 0.05: 90.0 · beta 1e-05: 70.0 · beta 2: 90.0 | spo_beta0.05, spo_beta2 | 90.0 |" in text
    assert "| **dpo** | (no sweep) | dpo: 60.0 | dpo | 60.0 |" in text
    # Without reference answers the best is picked by the win rate against the SFT model.
    cells = {(n, "sft"): Cell(n, "sft", w, 0, 1, 10, 0, 0, 0) for n, w in (("spo_beta0.05", 0.6), ("spo_beta1e-05", 0.7), ("spo_beta2", 0.5), ("dpo", 0.55))}
    table = WinRateTable(tuple(experiment.stage_names), cells, "judge", "v1", 0.95, 10, 0, 0)
    scores, criterion = sweep_scores(experiment, [], table)
    assert scores["spo_beta1e-05"] == pytest.approx(70.0) and criterion.startswith("win rate (%) against sft")


def test_log_ratio_table_says_a_reference_free_loss_has_none() -> None:
    rows = [LogRatioRow("simpo_beta2.5", 0, None, None, None), LogRatioRow("spo", 0, 0.4, -1.4, 0.1)]
    text = log_ratio_markdown(rows, [0])
    assert "| **simpo_beta2.5** | n/a | n/a | n/a (reference-free loss) |" in text
    assert "| **spo** | +0.40 | -1.40 | 0.10 |" in text and "SimPO trains with no reference model" in text


@pytest.mark.parametrize("name", ["paper-qwen2.5-7b.yaml", "paper-llama-3.1-8b.yaml"])
def test_the_paper_experiments_commented_baselines_validate_when_uncommented(tmp_path: Path, name: str) -> None:
    text = (ROOT / "experiments" / name).read_text(encoding="utf-8")
    lines = [line.replace("  # - {name:", "  - {name:") for line in text.splitlines()]
    uncommented = "\n".join(lines).replace("../", f"{ROOT}/") + "\n"
    steps = plan_stages(load_experiment(_write(tmp_path, uncommented)))
    assert [s.name for s in steps] == ["sft", "dpo", "kto", "ipo", "spo", "dpop", "simpo", "dpo_nll"]


def test_log_ratio_rows_skip_damaged_metric_records(tmp_path: Path) -> None:
    from spo_align.experiment.report import log_ratio_rows

    text = GOOD.replace("seeds: [0, 1]", "seeds: [0]").replace("output_dir: out", f"output_dir: {tmp_path / 'out'}")
    experiment = load_experiment(_write(tmp_path, text))
    spo = next(step for step in plan_stages(experiment) if step.name == "spo")
    spo.output_dir.mkdir(parents=True)
    good = {"step": 1, "rewards/chosen": 0.2, "rewards/rejected": -0.4, "both_below_ref": 0.5}
    lines = [
        json.dumps(good).encode(), b"\xff not utf-8", json.dumps([1]).encode(),
        json.dumps({**good, "step": 2, "rewards/chosen": None}).encode(),
        json.dumps({**good, "step": 3, "rewards/chosen": "nan"}).encode(),
        json.dumps({**good, "step": 4, "both_below_ref": True}).encode(),
    ]
    (spo.output_dir / "metrics.jsonl").write_bytes(b"\n".join(lines))
    (row,) = log_ratio_rows(experiment)
    beta = 0.2  # recipes/tiny/spo.yaml: rewards are beta x log-ratio
    assert (row.chosen, row.rejected, row.both_below_ref) == pytest.approx((0.2 / beta, -0.4 / beta, 0.5))


@pytest.mark.parametrize(
    "content, message",
    [(b'{"id": "a", "carry": true}\n{"id": "b", "ca', r"p\.jsonl:2: not valid JSON"),
     (b'{"id": "a", "carry": true}\n\xff\n', r"p\.jsonl:2: not UTF-8 text"),
     (b'["a"]\n', r"p\.jsonl:1: each line must be a JSON object"),
     (b'{"carry": true}\n', r"p\.jsonl:1: missing 'id'")],
)
def test_a_damaged_prompt_file_is_a_located_error(tmp_path: Path, content: bytes, message: str) -> None:
    from spo_align.eval.records import EvalInputError

    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(EvalInputError, match=message):
        read_prompt_groups(path, "carry")


def test_a_swept_key_the_experiment_owns_is_refused_listing_what_can_be_swept(tmp_path: Path) -> None:
    text = GOOD.replace("tiny/spo.yaml}", "tiny/spo.yaml,\n      sweep: {output.dir: [a, b]}}")
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, text))
    assert f"{tmp_path / 'exp.yaml'}:6:" in _messages(exc)
    assert "a sweep can vary any other recipe key" in _messages(exc) and "training.seed" in _messages(exc)


@pytest.mark.parametrize(
    "where, entry, line",
    [("preference", "output.dir=x", 5), ("preference", "model.name_or_path=x", 5), ("sft", "output.dir=x", 3),
     ("recipe_set", "output.dir=x", 9)],
)
def test_a_set_of_a_key_the_experiment_owns_is_refused_at_its_line(tmp_path: Path, where: str, entry: str, line: int) -> None:
    if where == "recipe_set":
        text = GOOD + f"recipe_set: [{entry}]\n"
    else:
        name = "tiny/spo.yaml}" if where == "preference" else "tiny/sft.yaml}"
        text = GOOD.replace(name, name[:-1] + f", set: [{entry}]}}")
    with pytest.raises(RecipeErrors) as exc:
        load_experiment(_write(tmp_path, text))
    assert f"{tmp_path / 'exp.yaml'}:{line}:" in _messages(exc) and f"'{entry}' cannot be set" in _messages(exc)


def test_an_sft_stage_may_set_its_own_starting_model(tmp_path: Path) -> None:
    text = GOOD.replace("tiny/sft.yaml}", "tiny/sft.yaml, set: [model.name_or_path=tiny:arith]}")
    assert load_experiment(_write(tmp_path, text)).spec.sft.set == ["model.name_or_path=tiny:arith"]


def test_a_sweep_of_training_seed_trains_at_each_listed_seed(tmp_path: Path) -> None:
    from spo_align.recipe.load import load_recipe

    text = GOOD.replace("tiny/spo.yaml}", "tiny/spo.yaml, sweep: {training.seed: [1, 2]}}")
    steps = plan_stages(load_experiment(_write(tmp_path, text)))
    seeds = {(s.seed, s.name): load_recipe(s.recipe_path, s.overrides).training.seed for s in steps}
    assert seeds == {(0, "sft"): 0, (0, "spo_seed1"): 1, (0, "spo_seed2"): 2,
                     (1, "sft"): 1, (1, "spo_seed1"): 1, (1, "spo_seed2"): 2}


def test_sweep_values_reach_the_recipe_as_the_same_value(tmp_path: Path) -> None:
    """Floats (1e-05 too), booleans, text holding YAML's own characters, and lists: each read back unchanged."""
    from spo_align.recipe.load import load_recipe

    sweep = "{loss.beta: [1.0e-5, 0.25], training.gradient_checkpointing: [true, false]}"
    text = GOOD.replace("tiny/spo.yaml}", f"tiny/spo.yaml, sweep: {sweep}}}")
    steps = [s for s in plan_stages(load_experiment(_write(tmp_path, text))) if s.seed == 0 and s.name != "sft"]
    got = [(r.loss.beta, r.training.gradient_checkpointing) for r in (load_recipe(s.recipe_path, s.overrides) for s in steps)]
    assert got == [(1e-5, True), (1e-5, False), (0.25, True), (0.25, False)]
    described = GOOD.replace("tiny/spo.yaml}", "tiny/spo.yaml, sweep: {description: ['run #2: x', '5']}}")
    with pytest.raises(RecipeErrors, match="a sweep value makes the run name"):
        load_experiment(_write(tmp_path, described))
    from spo_align.experiment.spec import StagePoint

    text = "run #2: it's \"x\" \\ y"
    point = StagePoint("p", "s", (("description", text), ("output.report_to", ["none"]), ("x", "5")))
    from spo_align.recipe.yaml_positions import parse_yaml_value

    assert [parse_yaml_value(o.partition("=")[2]) for o in point.overrides] == [text, ["none"], "5"]
