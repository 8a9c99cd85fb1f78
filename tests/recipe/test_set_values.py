"""A `--set` value is one value: the whole text after the first `=`, never cut at ` #` or read as a mapping.

Only a value that is wholly a quoted string or wholly a flow list/mapping is read as YAML; any other text is
one scalar, typed the way a recipe file types a bare scalar (numbers, booleans, null) or kept as text."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_load import VALID, errors_of, write

from spo_align.recipe.load import load_recipe


def _loaded(tmp_path: Path, *overrides: str):
    return load_recipe(write(tmp_path / "r.yaml", VALID), list(overrides))


@pytest.mark.parametrize(
    "text",
    [
        "Run #2 with beta 0.3",
        "LoRA: run #2",
        "run #2: beta 0.3 # not a comment",
        "key: value, other: value",
        "- not a list item",
        "[draft] run 2",
        "{draft} run 2",
        "'quoted' head, plain tail",
        '"quoted" head # and a hash',
        "50% of the data & a * star",
        "*emphasis* and &amp",
        "ends with a colon:",
        "a | b > c",
        "%TAG like text",
        "@handle and `code`",
        "tab\tinside",
        "line one\nline two",
        "? a question-mark start",
        "trailing hash #",
        "#hashtag first",
        "beta=0.3 alpha=1",
        "'unclosed quote",
        "[unclosed bracket",
        "C:\\runs\\win path",
    ],
)
def test_a_text_value_is_kept_whole(tmp_path: Path, text: str) -> None:
    recipe = _loaded(tmp_path, f"description={text}")
    assert recipe.description == text


@pytest.mark.parametrize("folder", ["runs/run #2", "runs/a: b", "runs/[x] y", "runs/it's", "runs/50%", "runs/#1"])
def test_a_path_value_is_kept_whole(tmp_path: Path, folder: str) -> None:
    assert _loaded(tmp_path, f"output.dir={folder}").output.dir == Path(folder)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("loss.beta=0.3", ("loss", "beta"), 0.3),
        ("loss.beta=5e-2", ("loss", "beta"), 0.05),
        ("training.max_steps=12", ("training", "max_steps"), 12),
        ("data.packing=true", ("data", "packing"), True),
        ("description='Run #2'", ("description",), "Run #2"),
        ('description="say \\"hi\\" #2"', ("description",), 'say "hi" #2'),
        ("description='it''s'", ("description",), "it's"),
        ("description=   padded   ", ("description",), "padded"),
        ("description=null", ("description",), None),
        ("description=~", ("description",), None),
        ("description=", ("description",), None),
    ],
)
def test_typed_scalars_quoted_text_and_null_read_as_in_a_file(
    tmp_path: Path, override: str, key: tuple[str, ...], expected: object
) -> None:
    value: object = _loaded(tmp_path, override)
    for part in key:
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_flow_lists_and_mappings_are_still_read(tmp_path: Path) -> None:
    recipe = _loaded(tmp_path, "loss={type: dpo, beta: 0.2}", "adapter={type: lora, target_modules: [q_proj, v_proj]}")
    assert recipe.loss.type == "dpo" and recipe.loss.beta == 0.2
    assert recipe.adapter is not None and list(recipe.adapter.target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("written", ["1234567", "!!str 1234567", "!custom x"])
def test_a_value_that_is_not_text_says_why_and_names_the_set(tmp_path: Path, written: str) -> None:
    (error,) = errors_of(write(tmp_path / "r.yaml", VALID), (f"model.revision={written}",))
    assert f"--set model.revision={written}" in error.message or f"--set 'model.revision={written}'" in error.message
    if written.startswith("!"):
        assert "YAML tag" in error.message and "quote" in error.message
    else:
        assert "put it in quotes" in error.message


def test_a_list_written_with_a_comment_is_refused_as_text_not_cut(tmp_path: Path) -> None:
    """`[0, 1] # two` is not a whole flow list: it is text, and the schema says a list is expected."""
    (error,) = errors_of(write(tmp_path / "r.yaml", VALID), ("adapter={type: lora, target_modules: [q] # x}",))
    assert error.key_path == "adapter" and "--set adapter=" in error.message
