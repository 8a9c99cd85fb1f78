"""Loading: positions, extends, --set, YAML pitfalls, error formats. Each test names the behaviour it protects."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError
from recipe_paths import REPO

from spo_align.losses.spo import SPOLoss
from spo_align.recipe.errors import RecipeError, RecipeErrors, did_you_mean
from spo_align.recipe.load import load_recipe, save_resolved, validate_files
from spo_align.recipe.resolve import resolve

VALID = """\
stage: preference
model:
  name_or_path: outputs/sft
data:
  train:
    - path: pairs.jsonl
      format: pairs
  max_length: 512
loss:
  type: spo
  beta: 0.1
training:
  learning_rate: 1.0e-6
output:
  dir: outputs/run
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path, overrides: tuple[str, ...] = ()) -> list[RecipeError]:
    with pytest.raises(RecipeErrors) as caught:
        load_recipe(path, overrides)
    return caught.value.errors


def test_valid_recipe_loads_frozen_with_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", VALID))
    assert isinstance(recipe.loss, SPOLoss) and recipe.loss.alpha == 1.0
    assert recipe.training.per_device_batch_size == 4
    with pytest.raises(ValidationError):
        recipe.stage = "sft"  # type: ignore[misc]


def test_every_error_of_a_file_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    text = VALID.replace("beta: 0.1", "beta: 0\n  alpah: 2").replace("max_length: 512", "max_length: x")
    errors = errors_of(write(tmp_path / "r.yaml", text))
    found = {(e.line, e.key_path) for e in errors}
    assert found == {(8, "data.max_length"), (11, "loss.beta"), (12, "loss.alpah")}
    assert "did you mean 'alpha'" in next(e.message for e in errors if e.key_path == "loss.alpah")


def test_errors_of_many_files_are_collected(tmp_path: Path) -> None:
    write(tmp_path / "pairs.jsonl", "{}\n")  # validation checks that local dataset files exist
    good = write(tmp_path / "good.yaml", VALID)
    bad1 = write(tmp_path / "bad1.yaml", VALID.replace("beta: 0.1", "beta: -1"))
    bad2 = write(tmp_path / "bad2.yaml", "")
    valid, errors = validate_files([good, bad1, bad2])
    assert valid == 1
    assert {Path(e.file).name for e in errors if e.severity == "error"} == {"bad1.yaml", "bad2.yaml"}
    assert [(Path(e.file).name, e.key_path) for e in errors if e.severity == "warning"] == [
        ("good.yaml", "model.name_or_path")  # outputs/sft: an earlier stage's output, not written yet
    ]


def test_extends_deep_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", VALID)
    child = write(
        tmp_path / "child.yaml",
        """\
        extends: base.yaml
        loss:
          type: spo
          alpha: 2.0
        data:
          train:
            - path: other.jsonl
              format: pairs
        """,
    )
    recipe = load_recipe(child)
    assert isinstance(recipe.loss, SPOLoss)
    assert (recipe.loss.beta, recipe.loss.alpha) == (0.1, 2.0)  # beta from the base: default is 0.1 too
    assert [s.path for s in recipe.data.train] == ["other.jsonl"]
    assert recipe.data.max_length == 512


def test_extends_errors_point_into_the_file_that_holds_the_key(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", VALID.replace("beta: 0.1", "beta: -3"))
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nloss:\n  type: spo\n  alpha: 0\n")
    errors = {(Path(e.file).name, e.line, e.key_path) for e in errors_of(child)}
    assert errors == {("base.yaml", 11, "loss.beta"), ("child.yaml", 4, "loss.alpha")}


def test_extends_rewrites_base_paths_relative_to_the_extending_file(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    write(tmp_path / "data" / "local.jsonl", "{}\n")
    base_text = VALID.replace("pairs.jsonl", "data/local.jsonl") + "distributed:\n  deepspeed: ds.json\n"
    write(tmp_path / "base.yaml", base_text)
    child = write(tmp_path / "deep" / "er" / "child.yaml", "extends: ../../base.yaml\n")
    recipe = load_recipe(child)
    assert str(recipe.distributed.deepspeed) == "../../ds.json"
    assert recipe.data.train[0].path == "../../data/local.jsonl"
    plan = resolve(recipe, child)
    assert plan.zero_stage == 2 and plan.deepspeed_config_path == (tmp_path / "ds.json").resolve()


def test_extends_cycle_and_missing_base_are_errors(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n" + VALID)
    write(tmp_path / "b.yaml", "# b\nextends: a.yaml\n")
    (error,) = errors_of(tmp_path / "a.yaml")
    assert (Path(error.file).name, error.line, error.key_path) == ("b.yaml", 2, "extends")
    assert "cycle" in error.message
    (error,) = errors_of(write(tmp_path / "c.yaml", "extends: c.yaml\n"))
    assert "cycle" in error.message
    (error,) = errors_of(write(tmp_path / "d.yaml", "stage: sft\nextends: nowhere.yaml\n"))
    assert (error.line, error.key_path) == (2, "extends") and "not found" in error.message


def test_set_overrides_are_coerced_through_the_schema(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", VALID)
    recipe = load_recipe(path, ["loss.beta=0.25", "data.train.0.split=train_prefs", "training.max_steps=10"])
    assert isinstance(recipe.loss, SPOLoss) and recipe.loss.beta == 0.25
    assert recipe.data.train[0].split == "train_prefs" and recipe.training.max_steps == 10
    recipe = load_recipe(path, ["loss={type: ipo, match_spo_beta: 0.2}"])
    assert recipe.loss is not None and recipe.loss.type == "ipo"


@pytest.mark.parametrize(
    ("override", "key_path", "fragment"),
    [
        ("loss.beta=-1", "loss.beta", "greater than 0"),
        ("training.learning_rate=fast", "training.learning_rate", "valid number"),
        ("training.lerning_rate=1", "training.lerning_rate", "did you mean 'learning_rate'"),
        ("data.train.3.split=x", "data.train.3.split", "not an index"),
        ("stage.x=1", "stage.x", "single value"),
        ("nonsense", "", "expected key.path=value"),
        ("loss.beta=[", "loss.beta", "got '[', text, not a number"),
        ("loss.beta=!!float 1", "", "a YAML tag is not read"),
    ],
)
def test_bad_set_override_is_an_error_naming_the_override(
    tmp_path: Path, override: str, key_path: str, fragment: str
) -> None:
    errors = errors_of(write(tmp_path / "r.yaml", VALID), (override,))
    assert any(e.key_path == key_path and fragment in e.message and override in e.message for e in errors), errors


def test_yaml_pitfalls_are_located_errors_not_tracebacks(tmp_path: Path) -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg")
    )
    cases = {
        "bomb.yaml": (laughs, "expands to over"),
        "recursive.yaml": ("a: &x [1, *x]\n", "recursive"),
        "tag.yaml": ("stage: !!python/object:os.system x\n", "cannot read this value"),
        "binary.yaml": (b"\xff\xfe stage".decode("latin-1"), None),
        "comment_only.yaml": ("# nothing\n\n", "empty"),
        "scalar.yaml": ("just text\n", "must be a YAML mapping"),
    }
    for name, (text, fragment) in cases.items():
        path = tmp_path / name
        if name == "binary.yaml":
            path.write_bytes(b"\xff\xfe\x00stage")
            fragment = "not UTF-8"
        else:
            path.write_text(text, encoding="utf-8")
        errors = errors_of(path)
        assert any(fragment in e.message for e in errors), (name, errors)
    (error,) = errors_of(tmp_path / "absent.yaml")
    assert "not found" in error.message


def test_yaml_merge_keys_and_norway_keys(tmp_path: Path) -> None:
    text = VALID.replace("training:\n  learning_rate: 1.0e-6\n", "x-common: &c\n  learning_rate: 1.0e-6\ntraining:\n  <<: *c\n  seed: 3\n")
    errors = errors_of(write(tmp_path / "merge.yaml", text))
    assert [e.key_path for e in errors] == ["x-common"]  # the anchor holder itself is an unknown key
    errors = errors_of(write(tmp_path / "on.yaml", VALID + "on: 1\n"))
    assert [e.key_path for e in errors] == ["on"]  # YAML 1.1 would read the key as True


def test_text_and_github_formats() -> None:
    error = RecipeError("r,1.yaml", 7, 3, "loss.beta", "Input should be > 0: 100%\nsecond line")
    assert error.format() == "r,1.yaml:7:3: loss.beta: Input should be > 0: 100%\nsecond line"
    github = error.format("github")
    assert github.startswith("::error file=r%2C1.yaml,line=7,col=3,")
    assert github.endswith("::loss.beta: Input should be > 0: 100%25%0Asecond line")
    assert RecipeError("f.yaml", None, None, "", "m").format() == "f.yaml: m"
    errors = RecipeErrors([error, RecipeError("a.yaml", 1, 1, "", "x")])
    assert errors.format().splitlines()[0] == "a.yaml:1:1: x"


def test_did_you_mean() -> None:
    assert did_you_mean("learnig_rate", ["learning_rate", "seed"]) == " (did you mean 'learning_rate'?)"
    assert did_you_mean("zzz", ["learning_rate"]) == ""


def test_saved_resolved_recipe_loads_back_identically_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = REPO / "spo_recipes" / "qwen2.5-7b-instruct" / "sweep" / "beta0.1_alpha4.yaml"
    plan = resolve(load_recipe(source), source, device="cuda")
    saved = tmp_path / "elsewhere" / "resolved_recipe.yaml"
    save_resolved(plan, saved)
    text = saved.read_text()
    assert "global_batch_size: 128" in text and "extends" not in text
    again = resolve(load_recipe(saved), saved, device="cuda")
    assert again.recipe.loss == plan.recipe.loss and again.recipe.training == plan.recipe.training
    assert again.output_dir == plan.output_dir == (tmp_path / "outputs/qwen2.5-7b-instruct/sweep/beta0.1_alpha4")
    assert again.model_path == plan.model_path


def test_load_positions_follow_extends(tmp_path: Path) -> None:
    from spo_align.recipe.load import load_positions

    write(tmp_path / "base.yaml", VALID)
    child = write(tmp_path / "sub" / "child.yaml", "# child\nextends: ../base.yaml\nloss:\n  type: spo\n  beta: 0.3\n")
    positions = load_positions(child)
    assert (Path(positions[("loss", "beta")].file).name, positions[("loss", "beta")].line) == ("child.yaml", 5)
    assert (Path(positions[("data", "max_length")].file).name, positions[("data", "max_length")].line) == ("base.yaml", 8)
    assert load_positions(tmp_path / "absent.yaml") == {}


def test_hidden_folders_are_not_searched(tmp_path: Path) -> None:
    from spo_align.recipe.load import find_recipe_files

    write(tmp_path / "r.yaml", VALID)
    write(tmp_path / ".ipynb_checkpoints" / "r-checkpoint.yaml", "junk: [")
    found, missing = find_recipe_files([tmp_path])
    assert [p.name for p in found] == ["r.yaml"] and not missing


# ---------------------------------------------------------------- a tagged section without its tag


def test_a_typo_of_type_is_reported_at_its_own_line_with_did_you_mean(tmp_path: Path) -> None:
    text = VALID.replace("  type: spo\n", "  tpye: kto\n")
    (error,) = errors_of(write(tmp_path / "r.yaml", text))
    assert (error.line, error.key_path) == (10, "loss.tpye")
    assert "unknown key 'tpye' in 'loss' (did you mean 'type'?)" in error.message
    from spo_align.losses.registry import TYPES

    assert ", ".join(TYPES) in error.message


def test_a_typo_of_type_from_set_names_the_override(tmp_path: Path) -> None:
    text = VALID.replace("loss:\n  type: spo\n  beta: 0.1\n", "")
    (error,) = errors_of(write(tmp_path / "r.yaml", text), ("loss.tyep=dpo",))
    assert error.key_path == "loss.tyep" and "did you mean 'type'?" in error.message
    assert "[from --set loss.tyep=dpo]" in error.message


def test_an_untagged_section_reports_each_unknown_key_and_the_missing_type(tmp_path: Path) -> None:
    text = VALID.replace("  type: spo\n  beta: 0.1\n", "  beta: 0.1\n  colour: red\n")
    errors = errors_of(write(tmp_path / "r.yaml", text))
    assert {(e.line, e.key_path) for e in errors} == {(9, "loss"), (11, "loss.colour")}
    assert any("needs a 'type' key" in e.message for e in errors)


# ---------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    ("key", "written", "fragment"),
    [
        ("training.max_steps", "true", "got true, a boolean: booleans are not numbers"),
        ("loss.beta", "true", "got true, a boolean: booleans are not numbers"),
        ("training.seed", "'7'", "got '7', quoted text: write the number without quotes"),
        ("training.per_device_batch_size", "2.0", "write a whole number"),
        ("data.packing", "1", "got 1: write true or false"),
        ("data.shuffle", "'true'", "write true or false"),
        ("model.revision", "1234567", "got 1234567, a number: put it in quotes if you mean the text"),
        ("data.train.0.split", "2024", "a number: put it in quotes"),
        ("output.dir", "2024", "a number: put it in quotes"),
        ("model.trust_remote_code", "1", "write true or false"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(tmp_path: Path, key: str, written: str, fragment: str) -> None:
    """Through --set here; the same values written in a file are in the broken-recipe corpus
    (boolean_as_number.yaml, number_as_text.yaml)."""
    (error,) = errors_of(write(tmp_path / "r.yaml", VALID), (f"{key}={written}",))
    assert error.key_path == key and fragment in error.message and f"--set {key}={written}" in error.message


def test_harmless_spellings_are_kept(tmp_path: Path) -> None:
    """An integer where a float is expected, and exponent floats that YAML 1.1 would read as text."""
    text = VALID.replace("learning_rate: 1.0e-6", "learning_rate: 5e-7\n  num_epochs: 3\n  warmup_ratio: 0")
    recipe = load_recipe(write(tmp_path / "r.yaml", text), ["loss.beta=1e-1", "training.max_grad_norm=1.0e0"])
    assert recipe.training.learning_rate == 5e-7 and recipe.training.num_epochs == 3.0
    assert isinstance(recipe.training.num_epochs, float) and recipe.training.warmup_ratio == 0.0
    assert isinstance(recipe.loss, SPOLoss) and recipe.loss.beta == 0.1 and recipe.training.max_grad_norm == 1.0
    hub = ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.revision='1234567'"]  # a quoted number is text
    assert load_recipe(write(tmp_path / "q.yaml", VALID), hub).model.revision == "1234567"


# ---------------------------------------------------------------- local paths that do not exist


def _chain(tmp_path: Path, model: str, sft_folder: str = "recipes") -> tuple[Path, Path]:
    """An SFT recipe writing outputs/sft and a preference recipe starting from `model`, with real data files."""
    write(tmp_path / "recipes" / "pairs.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    write(tmp_path / sft_folder / "chat.jsonl", '{"messages": []}\n')
    sft = write(
        tmp_path / sft_folder / "sft.yaml",
        "stage: sft\nmodel:\n  name_or_path: tiny:arith\ndata:\n  train:\n    - path: chat.jsonl\n"
        "training:\n  learning_rate: 1.0e-5\noutput:\n  dir: outputs/sft\n",
    )
    dpo = write(tmp_path / "recipes" / "dpo.yaml", VALID.replace("name_or_path: outputs/sft", f"name_or_path: {model}"))
    return sft, dpo


def errors_of_required(path: Path, overrides: tuple[str, ...] = ()) -> list[RecipeError]:
    with pytest.raises(RecipeErrors) as caught:
        load_recipe(path, overrides, require_local_paths=True)
    return caught.value.errors


def test_train_refuses_a_missing_local_model_at_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, dpo = _chain(tmp_path, "./outputs/sft")
    assert load_recipe(dpo).model.name_or_path == "./outputs/sft"  # the library loads a chain before it runs
    (error,) = errors_of_required(dpo)
    assert (error.line, error.key_path) == (3, "model.name_or_path")
    assert "model folder './outputs/sft' does not exist" in error.message
    assert str(tmp_path / "outputs" / "sft") in error.message and "run the stage that writes it first" in error.message
    (tmp_path / "outputs" / "sft").mkdir(parents=True)
    assert load_recipe(dpo, require_local_paths=True).model.name_or_path == "./outputs/sft"


def test_train_refuses_missing_tokenizer_reference_and_dataset_and_names_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    _, dpo = _chain(tmp_path, "./models/base")
    errors = errors_of_required(
        dpo, ("model.tokenizer=./models/bsae", "reference.model=/nowhere/ref", "data.train.0.path=./pairs.jsnol")
    )
    found = {e.key_path: e.message for e in errors}
    assert set(found) == {"model.tokenizer", "reference.model", "data.train.0.path"}
    assert "tokenizer folder './models/bsae' does not exist (did you mean 'base'?)" in found["model.tokenizer"]
    assert "[from --set model.tokenizer=./models/bsae]" in found["model.tokenizer"]
    assert "reference model folder '/nowhere/ref' does not exist" in found["reference.model"]
    assert "dataset './pairs.jsnol' not found (did you mean 'pairs.jsonl'?)" in found["data.train.0.path"]
    assert "relative to the recipe file" in found["data.train.0.path"]


def test_hub_ids_tiny_models_and_hub_datasets_are_not_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, dpo = _chain(tmp_path, "Qwen/Qwen2.5-7B-Instruct")
    overrides = ("model.tokenizer=tiny:arith", "data.train.0.path=HuggingFaceH4/ultrafeedback_binarized")
    assert load_recipe(dpo, overrides, require_local_paths=True).model.tokenizer == "tiny:arith"


def test_a_model_path_that_is_a_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "model.safetensors", "x")
    _, dpo = _chain(tmp_path, "./model.safetensors")
    (error,) = [e for e in validate_files([dpo])[1] if e.severity == "error"]
    assert error.key_path == "model.name_or_path" and "is a file, not a model folder" in error.message


def test_validate_accepts_a_chain_warns_on_an_unknown_output_and_refuses_other_missing_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sft, dpo = _chain(tmp_path, "outputs/sft/checkpoint-500", sft_folder="sft")
    assert validate_files([sft, dpo]) == (2, [])  # sft.yaml writes outputs/sft: an earlier stage's output
    valid, (warning,) = validate_files([dpo])
    assert valid == 1 and warning.severity == "warning" and (warning.line, warning.key_path) == (3, "model.name_or_path")
    assert "does not exist yet" in warning.message and "run that stage first" in warning.message
    valid, (error,) = validate_files([sft, dpo], strict=True)
    assert valid == 1 and error.severity == "error" and "does not exist" in error.message
    _, dpo = _chain(tmp_path, "./sft-model", sft_folder="sft")  # not under outputs/, no recipe writes it
    valid, (error,) = validate_files([sft, dpo])
    assert valid == 1 and error.severity == "error" and "validate that recipe together with this one" in error.message


def test_validate_finds_the_stage_that_writes_a_model_beside_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-commit hook passes only the changed files: the SFT recipe beside it still counts as the writer."""
    monkeypatch.chdir(tmp_path)
    _, dpo = _chain(tmp_path, "./outputs/sft")
    assert validate_files([dpo]) == (1, [])
    assert [e.severity for e in validate_files([dpo], strict=True)[1]] == ["error"]


def test_a_base_recipes_missing_dataset_is_reported_where_the_base_means_it(tmp_path: Path) -> None:
    write(tmp_path / "base" / "b.yaml", VALID.replace("pairs.jsonl", "data/pairs.jsonl"))
    child = write(tmp_path / "child" / "c.yaml", "extends: ../base/b.yaml\n")
    (error,) = [e for e in validate_files([child])[1] if e.severity == "error"]
    assert (Path(error.file).name, error.line) == ("b.yaml", 6)
    assert str(tmp_path / "base" / "data" / "pairs.jsonl") in error.message


# ---------------------------------------------------------------- output.dir against what the run reads


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (("model.name_or_path=./outputs/sft", "output.dir={cwd}/outputs/sft/"), "output.dir is the model the run starts from"),
        (("model.name_or_path=outputs/sft/checkpoint-500", "output.dir=outputs/sft"), "output.dir holds the model"),
        (("model.name_or_path=./outputs/sft", "output.dir=./outputs/sft/dpo"), "output.dir is inside the model"),
        (("reference.model={cwd}/outputs/ref", "output.dir=outputs/x/../ref"), "output.dir is the reference model"),
        (("model.tokenizer=./tok", "output.dir=tok/run"), "output.dir is inside the tokenizer"),
        (("output.dir={cwd}/recipes",), "output.dir holds a dataset the run reads (data.train.0.path: pairs.jsonl)"),
        (("model.name_or_path=./link/sft", "output.dir=outputs/sft"), "output.dir is the model the run starts from"),
    ],
)
def test_output_dir_may_not_equal_hold_or_sit_inside_what_the_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], fragment: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "outputs")  # another spelling of outputs/
    _, dpo = _chain(tmp_path, "outputs/sft")
    errors = errors_of(dpo, tuple(o.format(cwd=tmp_path) for o in overrides))
    assert any(e.key_path == "output.dir" and fragment in e.message for e in errors), errors


def test_output_dir_beside_the_model_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, dpo = _chain(tmp_path, "outputs/sft")
    assert load_recipe(dpo, ("output.dir=outputs/sft-dpo",)).output.dir == Path("outputs/sft-dpo")


# ---------------------------------------------------------------- precision


def test_float16_trains_only_with_float32_weights_to_update(tmp_path: Path) -> None:
    """Full fine-tuning in float16 is refused without DeepSpeed; LoRA (float32 adapters) and DeepSpeed with
    fp16 on (float32 masters) train; bfloat16 is never refused here."""
    path = write(tmp_path / "r.yaml", VALID)
    (error,) = errors_of(path, ("model.dtype=float16",))
    assert (error.line, error.key_path) == (None, "model.dtype") and "bfloat16" in error.message
    assert "[from --set model.dtype=float16]" in error.message
    (tmp_path / "auto.json").write_text('{"fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}')
    (tmp_path / "none.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "off.json").write_text('{"fp16": {"enabled": false}}')
    for overrides in (
        ("model.dtype=float16", "adapter={type: lora}"),
        ("model.dtype=float16", "distributed.deepspeed=auto.json"),
        ("model.dtype=float16", "distributed.deepspeed=none.json"),
        ("model.dtype=bfloat16",),
    ):
        load_recipe(path, overrides)
    (error,) = errors_of(path, ("model.dtype=float16", "adapter={type: lora}", "distributed.deepspeed=off.json"))
    assert error.key_path == "distributed.deepspeed" and "disables fp16" in error.message
