"""The recipe commands: exit codes 0/1/2, formats, schema file up to date, `spo new`, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from recipe_paths import BROKEN, REPO, repo_recipes
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.recipe.load import load_recipe
from spo_align.recipe.schema import recipe_json_schema

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_validate_with_no_arguments_covers_both_recipe_trees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, out, err = invoke("validate")
    assert code == 0, out
    assert f"{len(repo_recipes())} recipe(s) valid" in err
    # Every later stage starts from an output folder that a recipe validated alongside writes: no warning.
    assert out == "" and "warning" not in err


def test_validate_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke("validate", str(REPO / "recipes" / "tiny"))[0] == 0
    code, out, _ = invoke("validate", str(BROKEN / "beta_negative.yaml"), str(REPO / "recipes"))
    assert code == 1 and "beta_negative.yaml:11:3: loss.beta: Input should be greater than 0" in out
    assert invoke("validate", str(tmp_path / "missing.yaml"))[0] == 2
    assert invoke("validate", str(tmp_path))[0] == 2  # a folder without recipes
    assert invoke("validate", "--format", "xml", str(BROKEN))[0] == 2
    monkeypatch.chdir(tmp_path)
    assert invoke("validate")[0] == 2  # no recipes/ or spo_recipes/ here


def test_validate_github_annotations() -> None:
    code, out, _ = invoke("validate", "--format", "github", str(BROKEN / "unknown_loss_type.yaml"))
    assert code == 1
    (line,) = out.splitlines()
    assert line.startswith("::error file=") and ",line=10,col=3," in line
    from spo_align.losses.registry import TYPES

    known = ", ".join(f"'{t}'" for t in TYPES)  # every loss type, in the registry's order
    assert line.endswith(f"::loss.type: unknown type 'spoo' (did you mean 'spo'?); expected one of: {known}")


def test_resolve_shows_derived_values() -> None:
    code, out, _ = invoke("resolve", str(REPO / "recipes" / "qwen2.5-7b-instruct" / "ipo.yaml"))
    assert code == 0
    assert "#   ipo_tau: 0.05" in out and "#   global_batch_size: 128" in out and "#   zero_stage: 3" in out
    resolved = yaml.safe_load(out)
    assert resolved["loss"] == {"type": "ipo", "tau": None, "match_spo_beta": 0.1, "nll_weight": 0.0}
    assert resolved["training"]["warmup_ratio"] == 0.1  # defaults filled
    code, out, _ = invoke(
        "resolve", str(REPO / "recipes" / "qwen2.5-7b-instruct" / "sft.yaml"), "--format", "json"
    )
    derived = json.loads(out)["derived"]
    assert derived["pack_length"] == {"cuda": 2048, "cpu": 1024}
    code, out, _ = invoke(
        "resolve", str(REPO / "recipes" / "qwen2.5-7b-instruct" / "sft.yaml"), "--device", "cpu", "--format", "json"
    )
    assert json.loads(out)["derived"]["pack_length"] == 1024


def test_resolve_applies_set_and_reports_bad_overrides() -> None:
    path = str(REPO / "spo_recipes" / "qwen2.5-7b-instruct" / "spo_lora.yaml")
    code, out, _ = invoke("resolve", path, "--set", "training.gradient_accumulation_steps=2", "--format", "json")
    assert code == 0 and json.loads(out)["derived"]["global_batch_size"] == 4 * 2 * 8
    code, out, _ = invoke("resolve", path, "--set", "loss.beta=zero")
    assert code == 1 and "loss.beta" in out and "--set loss.beta=zero" in out
    assert invoke("resolve", "nowhere.yaml")[0] == 2


def test_committed_json_schema_is_up_to_date() -> None:
    committed = json.loads((REPO / "recipe.schema.json").read_text())
    assert committed == recipe_json_schema(), "run: spo schema -o recipe.schema.json"
    code, out, _ = invoke("schema")
    assert code == 0 and json.loads(out) == committed


def test_new_copies_a_recipe_keeping_comments_and_relative_paths(tmp_path: Path) -> None:
    src = REPO / "spo_recipes" / "qwen2.5-7b-instruct" / "sweep" / "beta0.2_alpha1.yaml"
    dest = tmp_path / "mine" / "my_sweep.yaml"
    code, out, _ = invoke("new", str(src), str(dest))
    assert code == 0, out
    text = dest.read_text()
    assert text.splitlines()[1] == src.read_text().splitlines()[1]  # comments kept
    assert load_recipe(dest) == load_recipe(src).model_copy(update={"extends": load_recipe(dest).extends})
    assert invoke("new", str(src), str(dest))[0] == 2  # refuses to overwrite
    assert invoke("new", str(src), str(dest), "--force")[0] == 0
    full = REPO / "spo_recipes" / "qwen2.5-7b-instruct" / "spo_full_zero3.yaml"
    assert invoke("new", str(full), str(tmp_path))[0] == 0  # into a folder
    copied = load_recipe(tmp_path / "spo_full_zero3.yaml")
    assert (tmp_path / copied.distributed.deepspeed).resolve() == (REPO / "deepspeed_configs" / "zero3.json").resolve()
    assert invoke("new", str(tmp_path / "none.yaml"), str(tmp_path / "x.yaml"))[0] == 2


def test_recipe_commands_never_import_torch() -> None:
    """`spo validate/resolve/schema/new` run where only the base install exists."""
    code = f"""
import sys
from typer.testing import CliRunner
from spo_align.cli import app
r = CliRunner()
for args in (["validate", "{REPO / 'recipes'}", "{REPO / 'spo_recipes'}", "--gpu-memory", "80"],
             ["validate", "{BROKEN}"],
             ["resolve", "{REPO / 'recipes/qwen2.5-7b-instruct/ipo.yaml'}", "--gpu-memory", "h100"],
             ["resolve", "{REPO / 'spo_recipes/qwen2.5-7b-instruct/spo_full_zero3.yaml'}", "--format", "json"],
             ["schema"]):
    r.invoke(app, args)
heavy = sorted(m for m in ("torch", "transformers", "trl", "peft", "datasets", "deepspeed", "accelerate") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout


def test_editors_accept_every_shipped_recipe_and_flag_unknown_keys() -> None:
    """yaml-language-server checks files against recipe.schema.json: shipped recipes (including ones that
    only extend a base) must pass it, and a misspelt key must not."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "recipe.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for path in repo_recipes():
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path, errors)
    bad = yaml.safe_load((BROKEN / "typo_nested_key.yaml").read_text())
    assert any("learning_rat" in e.message for e in validator.iter_errors(bad))
    assert any("'stage' is a required property" in e.message for e in validator.iter_errors({"model": {}}))


def _chain(tmp_path: Path) -> Path:
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    spo = REPO / "tests" / "data" / "recipes" / "spo.yaml"
    text = spo.read_text().replace("tiny:arith", "outputs/test/sft").replace("../../../data/tiny/pairs_train.jsonl", "pairs.jsonl")
    recipe = tmp_path / "spo.yaml"
    recipe.write_text(text)
    return recipe


def test_validate_warns_about_a_model_not_written_yet_and_strict_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _chain(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke("validate", str(recipe))
    assert code == 0 and out.startswith(f"{recipe}:5:3: model.name_or_path: warning: model folder 'outputs/test/sft'")
    assert "1 recipe(s) valid, 1 warning(s)" in err
    code, out, _ = invoke("validate", "--format", "github", str(recipe))
    assert code == 0 and out.startswith(f"::warning file={recipe},line=5,col=3,")
    code, out, err = invoke("validate", "--strict", str(recipe))
    assert code == 1 and f"{recipe}:5:3: model.name_or_path: model folder 'outputs/test/sft' does not exist" in out
    assert "1 of 1 recipe(s) invalid, 1 error(s)" in err
    (tmp_path / "outputs" / "test" / "sft").mkdir(parents=True)
    assert invoke("validate", "--strict", str(recipe)) == (0, "", "1 recipe(s) valid\n")


def test_train_refuses_a_missing_local_model_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    recipe = _chain(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, _ = invoke("train", str(recipe))
    assert code == 1 and out.startswith(f"{recipe}:5:3: model.name_or_path: model folder 'outputs/test/sft' does not exist")
    assert not (tmp_path / "outputs" / "test" / "spo").exists()
    code, out, _ = invoke("train", str(recipe), "--set", "data.train.0.path=./missing.jsonl", "--dry-run")
    assert code == 0, out  # a dry run loads nothing: it may show a stage whose start is not written yet
    code, out, _ = invoke("train", str(recipe), "--set", "model.name_or_path=tiny:arith", "--set", "data.train.0.path=./missing.jsonl")
    assert code == 1 and "data.train.0.path: dataset './missing.jsonl' not found" in out
    assert "[from --set data.train.0.path=./missing.jsonl]" in out
