"""An experiment file or a DeepSpeed config given where a recipe belongs (and a recipe given to `spo experiment`)
is named for what it is, with the command that reads it, in one error: not a dozen unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipe_paths import REPO
from typer.testing import CliRunner

from spo_align.cli import app

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
DEEPSPEED = sorted((REPO / "deepspeed_configs").glob("*.json"))


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("command", ["validate", "train", "resolve"])
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_an_experiment_file_given_as_a_recipe_says_which_command_reads_it(command: str, experiment: Path):
    result = _run(command, str(experiment))
    assert result.exit_code == 1, result.output
    errors = [line for line in _lines(result) if line.startswith(str(experiment))]
    assert errors == [
        f"{experiment}:1:1: this is an experiment file (it has "
        + errors[0].split("(it has ", 1)[1].split(")", 1)[0]
        + f"), not a recipe: check it with `spo experiment {experiment} --dry-run`, run it with "
        f"`spo experiment {experiment}`"
    ], result.output
    assert ("sft" in errors[0] or "start" in errors[0]) and "preference" in errors[0]  # what the runs start from


@pytest.mark.parametrize("config", DEEPSPEED, ids=lambda p: p.name)
def test_a_deepspeed_config_given_as_a_recipe_says_where_it_belongs(config: Path):
    result = _run("validate", str(config))
    assert result.exit_code == 1
    errors = [line for line in _lines(result) if line.startswith(str(config))]
    assert len(errors) == 1 and "this is a DeepSpeed config (it has zero_optimization" in errors[0]
    assert "name it in a recipe as distributed.deepspeed" in errors[0]


def test_a_folder_of_experiments_is_one_error_per_file():
    result = _run("validate", str(REPO / "experiments"))
    assert result.exit_code == 1
    assert f"{len(EXPERIMENTS)} of {len(EXPERIMENTS)} recipe(s) invalid, {len(EXPERIMENTS)} error(s)" in result.output


@pytest.mark.parametrize("recipe", ["tiny/sft.yaml", "tiny/spo.yaml"])
def test_a_recipe_given_to_spo_experiment_says_which_commands_read_it(recipe: str):
    path = REPO / "recipes" / recipe
    result = _run("experiment", str(path), "--dry-run")
    assert result.exit_code == 1
    assert _lines(result) == [
        f"{path}:1:1: this is a recipe (stage: {'sft' if 'sft' in recipe else 'preference'}), not an experiment file: "
        f"check it with `spo validate {path}`, train it with `spo train {path}`"
    ]


def test_a_recipe_with_a_misspelt_stage_is_still_a_recipe_with_its_errors(tmp_path: Path):
    """Only a file with an experiment's own sections is called one: a broken recipe keeps its own errors."""
    path = tmp_path / "r.yaml"
    path.write_text("stgae: sft\nmodel: {name_or_path: org/m}\ndata: {train: [{path: org/d}]}\noutput: {dir: out}\n")
    result = _run("validate", str(path))
    assert "did you mean 'stage'" in result.output and "experiment" not in result.output
