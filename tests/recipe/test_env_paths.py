"""`$VAR`, `${VAR}` and `~` in the keys that hold paths are expanded when a recipe or experiment is read; an unset
variable is an error at the key's line, never a folder literally named `$HOME`."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_load import VALID, errors_of, write

from spo_align.recipe.load import load_recipe
from spo_align.recipe.resolve import resolve

FULL = """\
stage: preference
model:
  name_or_path: {model}
  tokenizer: {tokenizer}
reference:
  model: {reference}
data:
  train:
    - path: {train}
      format: pairs
  eval:
    - path: {eval}
      format: pairs
loss:
  type: dpo
training:
  learning_rate: 1.0e-6
distributed:
  num_nodes: 2
  deepspeed: {deepspeed}
  hostfile: {hostfile}
output:
  dir: {out}
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "place with space"
    for name in ("models/base", "models/tok", "models/ref"):
        (root / name).mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "pairs.jsonl").write_text("{}\n")
    (root / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    (root / "hosts").write_text("localhost slots=1\n")
    monkeypatch.setenv("SPO_ROOT", str(root))
    monkeypatch.setenv("SPO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


@pytest.mark.parametrize("spell", ["$SPO_ROOT", "${SPO_ROOT}"])
def test_every_path_key_expands_both_spellings(env: Path, tmp_path: Path, spell: str) -> None:
    text = FULL.format(
        model=f"{spell}/models/base", tokenizer=f"{spell}/models/tok", reference=f"{spell}/models/ref",
        train=f"{spell}/data/pairs.jsonl", eval=f"{spell}/data/pairs.jsonl", deepspeed=f"{spell}/ds.json",
        hostfile=f"{spell}/hosts", out="${SPO_RUNS}/dpo",
    )
    path = write(tmp_path / "recipes" / "r.yaml", text)
    recipe = load_recipe(path, require_local_paths=True)
    assert recipe.model.name_or_path == f"{env}/models/base" and recipe.model.tokenizer == f"{env}/models/tok"
    assert recipe.reference.model == f"{env}/models/ref"
    assert recipe.data.train[0].path == recipe.data.eval[0].path == f"{env}/data/pairs.jsonl"
    assert recipe.distributed.deepspeed == env / "ds.json" and recipe.distributed.hostfile == env / "hosts"
    assert recipe.output.dir == tmp_path / "runs" / "dpo"
    plan = resolve(recipe, path, "cpu")
    assert plan.output_dir == tmp_path / "runs" / "dpo" and "$" not in plan.to_yaml().split("\n", 3)[3]


def test_home_and_tilde_expand_in_files_and_in_set(env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", "dir: $HOME/runs/a"))
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    assert load_recipe(path).output.dir == tmp_path / "home" / "runs" / "a"
    assert load_recipe(path, ["output.dir=~/runs/b"]).output.dir == tmp_path / "home" / "runs" / "b"
    recipe = load_recipe(path, ["output.dir=${HOME}/runs/c", "data.train.0.path=$SPO_ROOT/data/pairs.jsonl"])
    assert recipe.output.dir == tmp_path / "home" / "runs" / "c"
    assert recipe.data.train[0].path == f"{env}/data/pairs.jsonl"


def test_an_unset_variable_is_an_error_at_its_line_or_its_set(env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", "dir: $SPO_NOT_SET/run"))
    (error,) = errors_of(path)
    assert (error.line, error.key_path) == (15, "output.dir")
    assert "environment variable $SPO_NOT_SET is not set" in error.message
    path = write(tmp_path / "r2.yaml", VALID)
    (error,) = errors_of(path, ("model.name_or_path=${SPO_ALSO_NOT}/sft",))
    assert error.key_path == "model.name_or_path" and "$SPO_ALSO_NOT is not set" in error.message
    assert "[from --set model.name_or_path=${SPO_ALSO_NOT}/sft]" in error.message


@pytest.mark.parametrize(("written", "fragment"), [("${SPO_ROOT", "no closing '}'"), ("${}/x", "empty"),
                                                   ("${A B}/x", "not a variable name")])
def test_a_malformed_variable_is_an_error(env: Path, tmp_path: Path, written: str, fragment: str) -> None:
    (error,) = errors_of(write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", f"dir: '{written}'")))
    assert error.key_path == "output.dir" and fragment in error.message


def test_a_dollar_that_names_no_variable_and_other_keys_are_left_alone(env: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", "dir: outputs/cost$5-$") + "description: $HOME\n")
    recipe = load_recipe(path)
    assert recipe.output.dir == Path("outputs/cost$5-$") and recipe.description == "$HOME"


def test_a_base_recipe_elsewhere_keeps_its_variable_paths_unrebased(env: Path, tmp_path: Path) -> None:
    write(tmp_path / "base" / "base.yaml", VALID.replace("path: pairs.jsonl", "path: $SPO_ROOT/data/pairs.jsonl"))
    child = write(tmp_path / "child" / "c.yaml", "extends: ${SPO_BASE}/base.yaml\nloss:\n  type: spo\n  beta: 0.2\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPO_BASE", str(tmp_path / "base"))
        recipe = load_recipe(child)
    assert recipe.data.train[0].path == f"{env}/data/pairs.jsonl"


def test_experiment_paths_expand_and_an_unset_one_is_located(env: Path, tmp_path: Path) -> None:
    from spo_align.experiment.spec import load_experiment
    from spo_align.recipe.errors import RecipeErrors

    root = Path(__file__).resolve().parents[2]
    text = (
        "output_dir: $SPO_RUNS/exp\nseeds: [0]\n"
        "sft:\n  name: sft\n  recipe: ${SPO_REPO}/recipes/tiny/sft.yaml\n"
        "preference:\n  - {name: spo, recipe: $SPO_REPO/recipes/tiny/spo.yaml}\n"
        "eval:\n  prompts: $SPO_REPO/data/tiny/test.jsonl\n  judge: {type: reference}\n"
    )
    path = write(tmp_path / "exp.yaml", text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPO_REPO", str(root))
        loaded = load_experiment(path)
    assert loaded.output_dir == tmp_path / "runs" / "exp"
    assert loaded.spec.sft.recipe == root / "recipes" / "tiny" / "sft.yaml"
    assert loaded.spec.eval.prompts == f"{root}/data/tiny/test.jsonl"
    with pytest.raises(RecipeErrors) as caught:
        load_experiment(path)
    assert any(e.line == 5 and "$SPO_REPO is not set" in e.message for e in caught.value.errors)


@pytest.mark.parametrize(
    ("written", "env", "expected"),
    [
        ("${SPO_UNSET_X:-outputs/dflt}/run", {}, "outputs/dflt/run"),
        ("${SPO_EMPTY_X:-outputs/dflt}/run", {"SPO_EMPTY_X": ""}, "outputs/dflt/run"),
        ("${SPO_SET_X:-outputs/dflt}/run", {"SPO_SET_X": "/srv/runs"}, "/srv/runs/run"),
        ("${SPO_UNSET_X-outputs/dflt}/run", {}, "outputs/dflt/run"),
    ],
)
def test_a_default_is_used_as_in_the_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str, env: dict,
                                           expected: str) -> None:
    for name in ("SPO_UNSET_X", "SPO_EMPTY_X", "SPO_SET_X"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", f"dir: {written}"))
    assert load_recipe(path).output.dir == Path(expected)


def test_an_empty_variable_without_a_default_is_an_error_not_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPO_EMPTY_X", "")
    (error,) = errors_of(write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", "dir: $SPO_EMPTY_X/run")))
    assert error.key_path == "output.dir" and "environment variable $SPO_EMPTY_X is empty" in error.message
    monkeypatch.setenv("SPO_EMPTY_X", "")
    (error,) = errors_of(write(tmp_path / "r.yaml", VALID.replace("dir: outputs/run", "dir: ${SPO_EMPTY_X-x}/run")))
    assert "is empty" in error.message  # `-` (no colon) keeps a set-but-empty value, which is refused
