"""Recipe validation for users' own CI: the pre-commit hook and the example GitHub Actions workflow."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
HOOKS = REPO / ".pre-commit-hooks.yaml"
WORKFLOW = REPO / "examples" / "github-actions" / "validate-recipes.yml"


@pytest.fixture(scope="module")
def hook() -> dict:
    hooks = yaml.safe_load(HOOKS.read_text(encoding="utf-8"))
    assert isinstance(hooks, list) and hooks
    for entry in hooks:
        assert {"id", "name", "entry", "language"} <= set(entry), entry
    return next(h for h in hooks if h["id"] == "spo-validate")


def _cli():
    from typer.testing import CliRunner

    from spo_align.cli import app

    return CliRunner(), app


def test_hook_runs_spo_validate_from_the_base_install(hook):
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    assert shlex.split(hook["entry"]) == ["spo", "validate"]
    # language: python installs this repository's base package: it must provide `spo` and never need torch.
    assert hook["language"] == "python"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "spo" in project["scripts"]
    assert not any(re.match(r"torch\b", dep) for dep in project["dependencies"])
    runner, app = _cli()
    assert runner.invoke(app, ["validate", "--help"]).exit_code == 0


def test_hook_file_pattern_picks_recipes_only(hook):
    pattern = re.compile(hook["files"])
    recipes = sorted(p.relative_to(REPO).as_posix() for root in ("recipes", "spo_recipes") for p in (REPO / root).rglob("*.yaml"))
    assert recipes and all(pattern.search(path) for path in recipes)
    for other in (".pre-commit-hooks.yaml", "deepspeed_configs/zero3.json", "experiments/tiny.yaml", "docs/x.yaml"):
        assert not pattern.search(other), other
    assert pattern.search("my-project/recipes/nested/run.yml")


def test_hook_entry_accepts_many_files_and_fails_on_a_broken_recipe(hook, tmp_path):
    """pre-commit appends the changed file names to the entry: valid ones pass, a broken one fails the hook."""
    assert hook.get("pass_filenames", True)
    files = sorted(str(p) for p in (REPO / "recipes" / "tiny").glob("*.yaml"))
    assert len(files) >= 2
    runner, app = _cli()
    args = shlex.split(hook["entry"])[1:]
    ok = runner.invoke(app, [*args, *files])
    assert ok.exit_code == 0, ok.output
    broken = tmp_path / "recipes" / "broken.yaml"
    broken.parent.mkdir()
    broken.write_text((REPO / "recipes" / "tiny" / "spo.yaml").read_text(encoding="utf-8").replace("stage:", "stgae:", 1))
    bad = runner.invoke(app, [*args, files[0], str(broken)])
    assert bad.exit_code == 1
    assert "broken.yaml" in bad.output


def test_workflow_installs_the_base_package_only_and_validates_a_recipe_folder():
    import click
    import typer.main

    from spo_align.cli import app

    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    steps = workflow["jobs"]["validate"]["steps"]
    env = workflow["env"]
    assert "[" not in env["SPO_ALIGN_REQUIREMENT"]  # no extras: no torch
    assert env["SPO_ALIGN_REQUIREMENT"].startswith("spo-align")
    runs = [step["run"] for step in steps if "run" in step]
    assert any("pip install \"$SPO_ALIGN_REQUIREMENT\"" in run for run in runs)
    assert any("import torch" in run for run in runs)  # the workflow proves torch stayed out
    validate = [line.strip() for run in runs for line in run.splitlines() if line.strip().startswith("spo validate")]
    assert len(validate) == 1
    argv = shlex.split(validate[0].replace('"$RECIPE_DIR"', env["RECIPE_DIR"]))
    assert argv[:2] == ["spo", "validate"] and argv[-1] == env["RECIPE_DIR"]
    group = typer.main.get_command(app)
    with click.Context(group) as parent:
        group.commands["validate"].make_context("validate", list(argv[2:]), parent=parent)
    # and the command does what the workflow expects on this repository's own recipe folder
    runner, _ = _cli()
    result = runner.invoke(app, [*argv[1:-1], str(REPO / "recipes")])
    assert result.exit_code == 0, result.output
